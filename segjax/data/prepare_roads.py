"""Preparing road-scene data: a pickle of records into the folder layout, and seeded split lists."""
from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from segjax.data.errors import SIZE_MISMATCH, DataError, SkipReport

logger = logging.getLogger(__name__)

IMAGE_KEYS = ("image", "img", "pixel_values", "images", "rgb")
LABEL_KEYS = ("label", "mask", "annotation", "segmentation_map", "seg_map", "semantic_map", "labels", "masks")
NAME_KEYS = ("file_name", "filename", "name", "stem")
SUBDIR_KEYS = ("subdir", "folder", "sequence", "city")
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.855, 0.045, 0.1)

# Skip reasons of the converter (SIZE_MISMATCH too: image and label sizes differ).
NO_IMAGE_OR_LABEL = "no_image_or_label"  # a record without a recognised image and label
BAD_ARRAY = "bad_array"  # an image or label that cannot be written as such (shape, type, values)
DUPLICATE_NAME = "duplicate_name"  # two records would write the same file


# ---------------------------------------------------------------- pickle -> folder layout


def load_pickle(path: str | os.PathLike, *, trust: bool) -> Any:
    """Unpickle `path`, but only when the caller trusts it: unpickling runs code the file names."""
    if not trust:
        raise DataError(f"refusing to unpickle {path}: loading a pickle runs whatever code the file asks for, so a "
                        "file from an untrusted source can take over this machine; pass --trust_pickle only if you "
                        "made the file or trust where it came from")
    try:
        with open(path, "rb") as f:
            return pickle.load(f)
    except FileNotFoundError as err:
        raise DataError(f"pickle not found: {path}") from err
    except Exception as err:  # noqa: BLE001  (unpickling fails in many ways: missing modules, truncation)
        raise DataError(f"cannot unpickle {path}: {type(err).__name__}: {err}") from err


def _first(record: Mapping, keys: Sequence[str]) -> Any:
    return next((record[k] for k in keys if k in record), None)


def iter_records(data: Any) -> Iterable[tuple[int, Any]]:
    """(index, record) of a sequence of records, or of a mapping of columns ({"image": [...], "label": [...]})."""
    if isinstance(data, Mapping):
        images, labels = _first(data, IMAGE_KEYS), _first(data, LABEL_KEYS)
        if images is None or labels is None or len(images) != len(labels):
            raise DataError(f"a mapping at the top of the pickle needs equally long image and label columns (keys "
                            f"{IMAGE_KEYS} and {LABEL_KEYS}); it has keys {sorted(map(str, data))[:10]}")
        extra = {k: data[k] for k in (*NAME_KEYS, *SUBDIR_KEYS) if k in data}
        return ((i, {"image": img, "label": lab, **{k: v[i] for k, v in extra.items()}})
                for i, (img, lab) in enumerate(zip(images, labels)))
    if isinstance(data, (list, tuple)):
        return enumerate(data)
    raise DataError(f"expected a sequence of records (or a mapping of columns) in the pickle, "
                    f"got {type(data).__name__}")


def image_array(value: Any) -> np.ndarray:
    """HxWx3 uint8 from a PIL image or an array (HWC or CHW, grey, uint8 or 0..1 / 0..255 floats)."""
    if isinstance(value, Image.Image):
        return np.asarray(value.convert("RGB"))
    array = np.asarray(value)
    if array.ndim == 4 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)  # CHW, as image processors give pixel_values
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4) or array.size == 0:
        raise ValueError(f"image of shape {array.shape} is not HxW, HxWxC or CxHxW")
    array = np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
    if array.dtype == np.uint8:
        return np.ascontiguousarray(array)
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"image of dtype {array.dtype}")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 255:
        raise ValueError(f"image values span {low:g}..{high:g}: normalised pixels cannot be written back as an image")
    if np.issubdtype(array.dtype, np.floating) and high <= 1.0:
        array = array * 255.0
    return np.clip(np.rint(array), 0, 255).astype(np.uint8)


def label_array(value: Any) -> np.ndarray:
    """HxW uint8 class indices from a PIL image (L, P, 1) or an integer-valued array of 0..255."""
    if isinstance(value, Image.Image):
        if value.mode not in ("L", "P", "1"):
            raise ValueError(f"label image mode {value.mode} holds no class indices")
        return np.asarray(value, dtype=np.uint8)
    array = np.asarray(value)
    while array.ndim > 2 and array.shape[0] == 1:
        array = array[0]
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim != 2 or array.size == 0:
        raise ValueError(f"label of shape {array.shape} is not HxW")
    if not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)
            or array.dtype == bool):
        raise ValueError(f"label of dtype {array.dtype}")
    if array.min() < 0 or array.max() > 255 or not np.array_equal(array, np.rint(array)):
        raise ValueError(f"label values span {array.min()}..{array.max()}: not class indices 0..255")
    return array.astype(np.uint8)


def _file_part(value: Any, what: str) -> str:
    """The last component of a name or path (records often keep their original file path)."""
    name = PurePosixPath(str(value).replace("\\", "/")).name
    if name in ("", ".", ".."):
        raise ValueError(f"{what} {value!r} names no file")
    return name


def convert_records(data: Any, out_root: str | os.PathLike, *, subdir: str = "pool",
                    report: SkipReport | None = None) -> dict:
    """Write records (image + segmentation map each) as out_root/images/{subdir}/{stem}.png and
    out_root/labels/{subdir}/{stem}.png, the folder layout the road-scene source reads.

    A record is a mapping (image under one of IMAGE_KEYS, label under one of LABEL_KEYS, an
    optional name and subdirectory) or an (image, label) pair. Unusable records are skipped and
    counted in `report`. Returns {"records", "written", "skipped", "images_dir", "labels_dir"}.
    """
    report = SkipReport() if report is None else report
    root = Path(out_root)
    written: set[tuple[str, str]] = set()
    total = 0
    for index, record in iter_records(data):
        total += 1
        if isinstance(record, Mapping):
            image, label = _first(record, IMAGE_KEYS), _first(record, LABEL_KEYS)
            name, folder = _first(record, NAME_KEYS), _first(record, SUBDIR_KEYS)
        elif isinstance(record, (list, tuple)) and len(record) == 2:
            (image, label), name, folder = record, None, None
        else:
            image = label = name = folder = None
        if image is None or label is None:
            report.add(NO_IMAGE_OR_LABEL, index)
            continue
        try:
            pixels, classes = image_array(image), label_array(label)
            stem = Path(_file_part(name, "name")).stem if name is not None else f"{index:06d}"
            folder = _file_part(folder, "subdirectory") if folder is not None else subdir
        except ValueError as err:
            logger.warning("record %d: %s", index, err)
            report.add(BAD_ARRAY, index)
            continue
        if pixels.shape[:2] != classes.shape:
            report.add(SIZE_MISMATCH, index)
            continue
        if (folder, stem) in written:
            report.add(DUPLICATE_NAME, index)
            continue
        written.add((folder, stem))
        for kind, array in (("images", pixels), ("labels", classes)):
            path = root / kind / folder / f"{stem}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(array).save(path)
    report.log(logger, f"records -> {root}")
    if not written:
        raise DataError(f"no usable record (image + segmentation map) among {total}; skipped: {report.as_dict()}")
    return {"records": total, "written": len(written), "skipped": report.as_dict(),
            "images_dir": str(root / "images"), "labels_dir": str(root / "labels")}


# ---------------------------------------------------------------- split lists


def split_pool(paths: Sequence[str], *, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0,
               by_subdir: bool = False) -> dict[str, list[str]]:
    """{"train", "val", "test"}: a seeded split of image paths, each list sorted.

    Without by_subdir, the shuffled pool is cut at round(N * fraction) for val and test, train
    keeping the rest. With by_subdir, whole immediate subdirectories are dealt out in a seeded
    order, each to the split furthest below its target count relative to that target, so no
    folder spans two splits and each split with a share gets a folder while folders last.
    """
    if len(fractions) != len(SPLITS) or min(fractions) < 0 or abs(sum(fractions) - 1.0) > 1e-6:
        raise DataError(f"split fractions must be three non-negative numbers summing to 1, got {list(fractions)}")
    if len(set(paths)) != len(paths):
        raise DataError("the pool lists an image twice")
    rng = np.random.default_rng(seed)
    ordered = sorted(paths)
    out: dict[str, list[str]] = {name: [] for name in SPLITS}
    if not by_subdir:
        shuffled = [ordered[i] for i in rng.permutation(len(ordered))]
        num_val, num_test = round(len(ordered) * fractions[1]), round(len(ordered) * fractions[2])
        out["val"] = shuffled[:num_val]
        out["test"] = shuffled[num_val : num_val + num_test]
        out["train"] = shuffled[num_val + num_test :]
    else:
        groups: dict[str, list[str]] = {}
        for path in ordered:
            groups.setdefault(str(PurePosixPath(path).parent), []).append(path)
        names = sorted(groups)
        targets = np.asarray(fractions) * len(ordered)
        for group in (names[i] for i in rng.permutation(len(names))):
            counts = np.asarray([len(out[s]) for s in SPLITS])
            # Relative shortfall: every split with a share gets one of the first groups.
            shortfall = np.where(targets > 0, (targets - counts) / np.maximum(targets, 1e-9), -np.inf)
            out[SPLITS[int(np.argmax(shortfall))]].extend(groups[group])
    for name in SPLITS:
        out[name].sort()
        if not out[name] and fractions[SPLITS.index(name)] > 0:
            logger.warning("split %s is empty (pool of %d images%s)", name, len(ordered),
                           ", whole subdirectories" if by_subdir else "")
    return out


def write_lists(lists: Mapping[str, Sequence[str]], out_dir: str | os.PathLike) -> dict[str, str]:
    """One `{name}.txt` per list (paths relative to the data root, one a line); returns the files."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, paths in lists.items():
        files[name] = str(out / f"{name}.txt")
        Path(files[name]).write_text("".join(f"{p}\n" for p in paths))
    return files
