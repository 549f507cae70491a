"""Portrait segmentation data (P3M-10k + Supervisely Person) as fixed-size memory-mapped arrays.

Preparation (`prepare_memmaps`) decodes every image/mask pair once, resizes it to size x size and
streams it, record by record, into one image memmap and one mask memmap per split. Each memmap
`X.mmap` has a JSON sidecar `X.mmap.json`:

    format, version, kind ("images" | "masks"), split, count, shape, dtype, layout, size, resize,
    mask_threshold, source_files (this file's inputs, in record order), records

`records[i]` = {"orig_size": [H, W], "scale": [sy, sx], "pad": [top, bottom, left, right]}: the
content of record i fills rows top..size-bottom and columns left..size-right, so a prediction is
mapped back to the original image by cropping that box and resizing it to orig_size. Letterbox
scales the long side to `size` (sy == sx) and pads bottom/right with 0; stretch has no padding.

Layouts: uint8 (the default) stores images NHWC in 0..255 and masks NHW in {0, 1}, named
`{split}_{size}_u8_{images,masks}.mmap`. float16 reproduces the original PyTorch pipeline's files
`{split}_{size}_fp16_{images,masks}.mmap`: its writer and its `P3MMemmapDataset` use
np.memmap(float16, shape=(N, 3, H, W)) for images in [0, 1] and (N, 1, H, W) for masks in {0, 1},
so ours are NCHW and N1HW too and either side reads the other's files.

Masks are binarised: grey value >= mask_threshold -> 1. 16-bit masks are first scaled to 8 bits
(v / 257), RGB(A) masks use their brightest colour channel, and palette (mode P) masks are read
as indices with every index > 0 foreground (the threshold does not apply to them).

`MemmapSource` reads these files, or sidecar-less ones from the original pipeline given their
dtype/layout/size, and always yields {"image": uint8 [S, S, 3], "mask": uint8 [S, S]}.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from segjax.data.errors import DataError, SkipReport
from segjax.data.images import (SIZE_MISMATCH, BadImage, SizeMismatch, letterbox_size, read_rgb, read_rgb_sized,
                                 resize_letterbox)

logger = logging.getLogger(__name__)

SIDECAR_FORMAT = "segjax-memmap"
SIDECAR_VERSION = 1
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# Skip-report reasons of prepare_memmaps (plus images.SIZE_MISMATCH).
MISSING_MASK = "missing_mask"
MISSING_IMAGE = "missing_image"
DUPLICATE_STEM = "duplicate_stem"
BAD_IMAGE = "bad_image"
BAD_MASK = "bad_mask"
# Storage per dtype: (file-name tag, image layout, mask layout).
STORAGE = {"uint8": ("u8", "NHWC", "NHW"), "float16": ("fp16", "NCHW", "N1HW")}
_IMAGE_LAYOUTS = ("NHWC", "NCHW")
_READ_DTYPES = ("uint8", "float16", "float32")


# ----------------------------------------------------------------------------- preparation


def read_mask(path: str | os.PathLike, threshold: int) -> np.ndarray:
    """A mask file as HxW uint8 in {0, 1} (rules in the module docstring); BadImage if unreadable."""
    try:
        with Image.open(path) as img:
            if img.mode == "P":
                img.load()
                return (np.asarray(img) > 0).astype(np.uint8)
    # PIL reports corrupt files through many exception types (OSError, ValueError, SyntaxError, ...).
    except Exception as err:  # noqa: BLE001
        raise BadImage(path, f"cannot decode ({type(err).__name__}: {err})") from err
    # Stored orientation: mask tools do not write EXIF rotations.
    grey = read_rgb(path, exif_transpose=False).max(axis=2)
    return (grey >= threshold).astype(np.uint8)


def _files_by_stem(folder: Path) -> dict[str, list[Path]]:
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_EXTENSIONS:
            found.setdefault(path.stem, []).append(path)
    return found


def pair_by_stem(image_dir: Path, mask_dir: Path, report: SkipReport) -> list[tuple[Path, Path]]:
    """(image, mask) pairs with equal file stems, sorted by stem; the rest goes to `report`."""
    images, masks = _files_by_stem(image_dir), _files_by_stem(mask_dir)
    pairs = []
    for stem in sorted(images.keys() | masks.keys()):
        image, mask = images.get(stem, []), masks.get(stem, [])
        if len(image) > 1 or len(mask) > 1:
            report.add(DUPLICATE_STEM, str(image_dir / stem))
        elif not mask:
            report.add(MISSING_MASK, str(image[0]))
        elif not image:
            report.add(MISSING_IMAGE, str(mask[0]))
        else:
            pairs.append((image[0], mask[0]))
    return pairs


def _p3m_dir(p3m_root: Path) -> Path:
    """The P3M-10k folder: p3m_root itself, or its P3M-10k/ child (the archive's top folder)."""
    for candidate in (p3m_root, p3m_root / "P3M-10k"):
        if (candidate / "train" / "blurred_image").is_dir() and (candidate / "train" / "mask").is_dir():
            return candidate
    raise DataError(f"{p3m_root}: no P3M-10k layout here (expected train/blurred_image/ and train/mask/)")


def supervisely_folders(root: str | os.PathLike) -> list[tuple[Path, Path]]:
    """Every directory named `images` under root that has a sibling `masks`, as (images, masks).

    This covers the Supervisely Person Clean release (`.../images` + `.../masks`) however deeply
    it was unpacked; files are then paired by stem inside each pair of folders.
    """
    root = Path(root)
    folders = sorted(
        (d, d.parent / "masks") for d in [root, *root.rglob("images")]
        if d.name == "images" and d.is_dir() and (d.parent / "masks").is_dir()
    )
    if not folders:
        raise DataError(f"{root}: no directory named images/ with a sibling masks/ found")
    return folders


def _fit(image: np.ndarray, mask: np.ndarray, size: int, resize: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Resize a pair to size x size; returns it with its record (original size, scale, padding)."""
    height, width = mask.shape
    if resize == "stretch":
        image = np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize((size, size), Image.Resampling.NEAREST))
        return image, mask, {"orig_size": [height, width], "scale": [size / height, size / width], "pad": [0, 0, 0, 0]}
    image, _ = resize_letterbox(image, size)
    mask, _ = resize_letterbox(mask, size, resample=Image.Resampling.NEAREST)
    content_h, content_w, scale = letterbox_size(height, width, size)  # top-left; bottom/right padded
    record = {"orig_size": [height, width], "scale": [scale, scale], "pad": [0, size - content_h, 0, size - content_w]}
    return image, mask, record


def storage_names(split: str, size: int, dtype: str) -> tuple[str, str]:
    tag = STORAGE[dtype][0]
    return f"{split}_{size}_{tag}_images.mmap", f"{split}_{size}_{tag}_masks.mmap"


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


def _write_split(
    split: str, pairs: list[tuple[Path, Path]], out_dir: Path, *, size: int, dtype: str, mask_threshold: int,
    resize: str, report: SkipReport
) -> dict:
    """Stream `pairs` into the split's two memmaps (temp names, renamed when complete)."""
    names = storage_names(split, size, dtype)
    finals = [out_dir / name for name in names]
    tmps = [path.with_name(f"{path.name}.tmp{os.getpid()}") for path in finals]
    _, image_layout, mask_layout = STORAGE[dtype]
    image_shape = (size, size, 3) if image_layout == "NHWC" else (3, size, size)
    mask_shape = (size, size) if mask_layout == "NHW" else (1, size, size)
    kept: list[tuple[Path, Path]] = []
    records: list[dict] = []
    try:
        if pairs:
            # Sized for every pair; records that fail are skipped and the files truncated at the end.
            images = np.memmap(tmps[0], dtype=dtype, mode="w+", shape=(len(pairs), *image_shape))
            masks = np.memmap(tmps[1], dtype=dtype, mode="w+", shape=(len(pairs), *mask_shape))
            for image_path, mask_path in pairs:
                try:
                    mask = read_mask(mask_path, mask_threshold)
                    image = read_rgb_sized(image_path, *mask.shape)
                except SizeMismatch as err:
                    report.add(SIZE_MISMATCH, str(image_path))
                    logger.warning("%s: skipped, image and mask sizes differ (%s)", split, err)
                    continue
                except BadImage as err:
                    report.add(BAD_MASK if err.path == os.fspath(mask_path) else BAD_IMAGE, err.path)
                    logger.warning("%s: skipped %s", split, err)
                    continue
                image, mask, record = _fit(image, mask, size, resize)
                if dtype == "float16":
                    image = (image.transpose(2, 0, 1) / 255.0).astype(np.float16)
                    mask = mask[None].astype(np.float16)
                images[len(kept)] = image
                masks[len(kept)] = mask
                kept.append((image_path, mask_path))
                records.append(record)
                if len(kept) % 1000 == 0:
                    logger.info("%s: %d of %d pairs written", split, len(kept), len(pairs))
            images.flush()
            masks.flush()
            del images, masks  # unmap before truncating
        if not kept:
            logger.warning("%s: no usable pairs, no files written", split)
            return {"count": 0, "images": None, "masks": None}
        itemsize = np.dtype(dtype).itemsize
        for tmp, shape in zip(tmps, (image_shape, mask_shape)):
            os.truncate(tmp, len(kept) * int(np.prod(shape)) * itemsize)
        common = {
            "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION, "split": split, "count": len(kept),
            "dtype": dtype, "size": size, "resize": resize, "mask_threshold": mask_threshold, "records": records,
        }
        sidecars = [
            {**common, "kind": "images", "shape": [len(kept), *image_shape], "layout": image_layout,
             "source_files": [os.path.abspath(i) for i, _ in kept]},
            {**common, "kind": "masks", "shape": [len(kept), *mask_shape], "layout": mask_layout,
             "source_files": [os.path.abspath(m) for _, m in kept]},
        ]
        # Old sidecars go first: a data file is never beside a sidecar that describes other data.
        for final in finals:
            Path(f"{final}.json").unlink(missing_ok=True)
        for tmp, final in zip(tmps, finals):
            os.replace(tmp, final)
        for final, sidecar in zip(finals, sidecars):
            _write_json(Path(f"{final}.json"), sidecar)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return {"count": len(kept), "images": str(finals[0]), "masks": str(finals[1])}


def prepare_memmaps(
    p3m_root: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    supervisely_root: str | os.PathLike | None = None,
    size: int = 640,
    dtype: str = "uint8",
    mask_threshold: int = 128,
    resize: str = "letterbox",
) -> dict:
    """Write train and val memmaps (+ sidecars) from P3M-10k and, for training, Supervisely Person.

    train = P3M-10k train/{blurred_image,mask} + every Supervisely images/ + masks/ folder pair;
    val = P3M-10k validation/P3M-500-P/{blurred_image,mask} (a missing val folder is logged).
    Unpaired, unreadable and size-mismatched files are skipped, counted and logged. Returns
    {"out_dir", "size", "dtype", "resize", "mask_threshold",
     "splits": {split: {"count", "images", "masks", "skipped": {reason: {"count", "examples"}}}}}.
    """
    if dtype not in STORAGE:
        raise ValueError(f"dtype must be one of {list(STORAGE)}, got {dtype!r}")
    if resize not in ("letterbox", "stretch"):
        raise ValueError(f"resize must be 'letterbox' or 'stretch', got {resize!r}")
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    if not 1 <= mask_threshold <= 255:
        raise ValueError(f"mask_threshold must be in 1..255, got {mask_threshold}")
    p3m = _p3m_dir(Path(p3m_root))
    folders = {
        "train": [(p3m / "train" / "blurred_image", p3m / "train" / "mask")],
        "val": [(p3m / "validation" / "P3M-500-P" / "blurred_image", p3m / "validation" / "P3M-500-P" / "mask")],
    }
    if supervisely_root is not None:
        folders["train"] += supervisely_folders(supervisely_root)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict[str, Any] = {
        "out_dir": str(out_dir), "size": size, "dtype": dtype, "resize": resize, "mask_threshold": mask_threshold,
        "splits": {},
    }
    for split, split_folders in folders.items():
        report = SkipReport()
        pairs = []
        for image_dir, mask_dir in split_folders:
            if not (image_dir.is_dir() and mask_dir.is_dir()):
                logger.warning("%s: %s or %s missing; nothing read from there", split, image_dir, mask_dir)
                continue
            pairs += pair_by_stem(image_dir, mask_dir, report)
        result = _write_split(split, pairs, out_dir, size=size, dtype=dtype, mask_threshold=mask_threshold,
                              resize=resize, report=report)
        report.log(logger, f"{split} memmaps")
        summary["splits"][split] = {**result, "skipped": report.as_dict()}
    if not any(s["count"] for s in summary["splits"].values()):
        raise DataError(f"no usable image/mask pairs under {p3m_root}" + (
            f" or {supervisely_root}" if supervisely_root is not None else ""))
    return summary


# ----------------------------------------------------------------------------- reading


def read_sidecar(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a memmap; DataError if it is unreadable or not ours."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read memmap sidecar {path}: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise DataError(f"{path} is not a {SIDECAR_FORMAT} sidecar")
    return meta


def _file_bytes(path: str) -> int:
    if not os.path.isfile(path):
        raise DataError(f"memmap file not found: {path}")
    return os.path.getsize(path)


def _check_bytes(path: str, count: int, record_shape: tuple[int, ...], dtype: np.dtype, layout: str) -> None:
    expected = count * int(np.prod(record_shape)) * dtype.itemsize
    actual = _file_bytes(path)
    if actual != expected:
        raise DataError(
            f"{path}: expected {expected} bytes ({count} records of {layout} {record_shape} {dtype.name}), "
            f"found {actual} bytes; the declared count/size/dtype is wrong or the file is incomplete"
        )


class MemmapSource:
    """grain random-access source over an image memmap and a mask memmap.

    Reads `<image_path>.json` (and `<mask_path>.json`) when present, or `meta` (a sidecar dict or
    path). Memmaps without a sidecar, e.g. from the original PyTorch pipeline, need dtype
    ("uint8" | "float16" | "float32"), layout ("NHWC" | "NCHW") and size; count defaults to what
    the file size implies. Masks share the images' dtype; float masks are cut at 0.5 (some of the
    original pipeline's were resized bilinearly). Arguments given beside a sidecar must agree with
    it. Files whose byte size does not match are refused (DataError).
    The memmaps are opened lazily in the process that reads and are never pickled.
    """

    def __init__(
        self,
        image_path: str | os.PathLike,
        mask_path: str | os.PathLike,
        *,
        meta: dict | str | os.PathLike | None = None,
        dtype: str | None = None,
        layout: str | None = None,
        count: int | None = None,
        size: int | None = None,
    ):
        self.image_path, self.mask_path = os.fspath(image_path), os.fspath(mask_path)
        if meta is None and os.path.isfile(f"{self.image_path}.json"):
            meta = f"{self.image_path}.json"
        if isinstance(meta, (str, os.PathLike)):
            meta = read_sidecar(meta)
        declared = {"dtype": dtype, "layout": layout, "count": count, "size": size}
        if meta is not None:
            for key, value in declared.items():
                if value is not None and value != meta.get(key):
                    raise DataError(f"{self.image_path}: {key}={value!r} given, but its sidecar says {meta.get(key)!r}")
            dtype, layout, count, size = (meta.get(k) for k in declared)
        elif dtype is None or layout is None or size is None:
            raise DataError(f"{self.image_path} has no sidecar ({self.image_path}.json): pass dtype, layout and size")
        if dtype not in _READ_DTYPES or layout not in _IMAGE_LAYOUTS or not isinstance(size, int) or size < 1:
            raise DataError(
                f"{self.image_path}: unsupported dtype={dtype!r} / layout={layout!r} / size={size!r} "
                f"(dtype one of {list(_READ_DTYPES)}, layout one of {list(_IMAGE_LAYOUTS)}, size >= 1)"
            )
        self.size = size
        self.layout = layout
        self.dtype = np.dtype(dtype)
        image_record = (size, size, 3) if layout == "NHWC" else (3, size, size)
        if count is None:
            count = self._implied_count(self.image_path, image_record, self.dtype)
        self.count = int(count)
        if os.path.isfile(f"{self.mask_path}.json"):
            mask_meta = read_sidecar(f"{self.mask_path}.json")
            found = tuple(mask_meta.get(k) for k in ("count", "size", "dtype"))
            if found != (self.count, size, self.dtype.name):
                raise DataError(
                    f"{self.mask_path}: its sidecar says count, size, dtype = {found}, "
                    f"the images are {(self.count, size, self.dtype.name)}"
                )
        # Every mask layout (NHW, N1HW) holds one value per pixel in the same order.
        _check_bytes(self.image_path, self.count, image_record, self.dtype, layout)
        _check_bytes(self.mask_path, self.count, (size, size), self.dtype, "mask")
        self._arrays: tuple[np.memmap, np.memmap] | None = None

    def _implied_count(self, path: str, record: tuple[int, ...], dtype: np.dtype) -> int:
        record_bytes = int(np.prod(record)) * dtype.itemsize
        actual = _file_bytes(path)
        if actual == 0 or actual % record_bytes:
            raise DataError(
                f"{path}: {actual} bytes is not a whole, non-zero number of {self.layout} {record} "
                f"{dtype.name} records ({record_bytes} bytes each); check dtype, layout and size"
            )
        return actual // record_bytes

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:
        # Only paths and shapes travel to grain workers; each opens its own mapping on first read.
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> tuple[np.memmap, np.memmap]:
        if self._arrays is None:
            record = (self.size, self.size, 3) if self.layout == "NHWC" else (3, self.size, self.size)
            # One attribute assigned at once, so reader threads never see half of the pair.
            self._arrays = (
                np.memmap(self.image_path, dtype=self.dtype, mode="r", shape=(self.count, *record)),
                np.memmap(self.mask_path, dtype=self.dtype, mode="r", shape=(self.count, self.size, self.size)),
            )
        return self._arrays

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.count:
            raise IndexError(f"record {index} out of range for {self.count} records")
        images, masks = self._open()
        image = np.array(images[index])  # copies just this record out of the mapping
        mask = np.array(masks[index])
        if self.layout == "NCHW":
            image = image.transpose(1, 2, 0)
        if self.dtype != np.uint8:
            image = np.clip(np.rint(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
            mask = (mask >= 0.5).astype(np.uint8)
        return {"image": np.ascontiguousarray(image), "mask": mask}


# ----------------------------------------------------------------------------- transforms


def _zoom(array: np.ndarray, zoom: float, resample: Image.Resampling) -> np.ndarray:
    """Scale about the image centre keeping the size: > 1 crops in, < 1 shrinks and pads with 0."""
    height, width = array.shape[:2]
    inv = 1.0 / zoom
    # PIL's affine maps output pixel centres to input coordinates; the centre maps to itself.
    coeffs = (inv, 0.0, width / 2 * (1 - inv), 0.0, inv, height / 2 * (1 - inv))
    img = Image.fromarray(np.ascontiguousarray(array))
    return np.asarray(img.transform((width, height), Image.Transform.AFFINE, coeffs, resample=resample, fillcolor=0))


def _jitter_colour(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation factors each drawn from [1 - strength, 1 + strength]."""
    brightness, contrast, saturation = rng.uniform(1.0 - strength, 1.0 + strength, size=3)
    luma = np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = image.astype(np.float32) * brightness
    mean = float((x @ luma).mean())
    x = (x - mean) * contrast + mean
    grey = (x @ luma)[..., None]
    x = grey + (x - grey) * saturation
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def augment_portrait(
    record: dict,
    rng: np.random.Generator,
    *,
    flip: bool = True,
    scale: tuple[float, float] | None = (0.75, 1.25),
    color_jitter: float = 0.2,
) -> dict:
    """Training transform: horizontal flip, zoom about the centre, colour jitter (image only).

    The image is resampled bilinearly and the mask with nearest, through the same transform, so
    they stay aligned; the size is unchanged. Deterministic for a given rng state.
    """
    image, mask = np.asarray(record["image"]), np.asarray(record["mask"])
    if flip and rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if scale is not None:
        zoom = float(rng.uniform(*scale))
        image = _zoom(image, zoom, Image.Resampling.BILINEAR)
        mask = _zoom(mask, zoom, Image.Resampling.NEAREST)
    if color_jitter:
        image = _jitter_colour(image, rng, color_jitter)
    return {"image": np.ascontiguousarray(image), "mask": np.ascontiguousarray(mask), "image_ok": np.bool_(True)}


def eval_portrait(record: dict) -> dict:
    """Evaluation transform: the record unchanged, flagged as a usable image."""
    return {**record, "image_ok": np.bool_(True)}
