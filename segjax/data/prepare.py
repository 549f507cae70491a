"""Dataset preparation used by tools/ and the demo data: COCO person subsets and ROI class statistics,
COCO instances -> semantic class-index masks, P3M-10k + Supervisely Person folders -> memmaps,
road scenes: a pickle of records -> the folder layout, and seeded split lists."""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import shutil
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from segjax.data.coco import (
    NO_SEGMENTATION,
    PersonImage,
    annotations_with_images,
    clean_segmentation,
    instance_masks,
    person_category_ids,
    read_instances,
    to_rle,
)
from segjax.data.errors import IMAGE_MISSING, IMAGE_UNREADABLE, MASK_UNREADABLE, SIZE_MISMATCH, DataError, SkipReport
from segjax.data.files import (
    IMAGE_SUFFIXES,
    BadImage,
    SizeMismatch,
    decode,
    files_by_stem,
    pair_by_stem,
    read_rgb_sized,
    to_rgb,
    write_atomic,
)
from segjax.data.memmap import SIDECAR_FORMAT, SIDECAR_VERSION, STORAGE, storage_names
from segjax.data.transforms import letterbox_size, resize_letterbox, roi_targets
from segjax.data.voc import read_mask, save_mask, voc_palette

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- COCO person subsets, ROI stats


def person_only_subset(
    ann_file: str | os.PathLike, out_dir: str | os.PathLike, *, num_images: int | None = None, seed: int = 0
) -> Path:
    """Write a COCO file with only non-crowd person annotations and the images that have one.

    With num_images, a seeded random subset of that many images is kept. The output is named
    `<input stem>_person_only_no_crowd[_<N>].json` inside out_dir; its path is returned.
    """
    data = read_instances(ann_file)
    person_ids = person_category_ids(data, ann_file)
    image_ids = {image["id"] for image in data["images"]}
    annotations = [
        ann
        for ann in data["annotations"]
        if ann["category_id"] in person_ids and not ann.get("iscrowd", 0) and ann["image_id"] in image_ids
    ]
    with_person = {ann["image_id"] for ann in annotations}
    images = [image for image in data["images"] if image["id"] in with_person]
    name = f"{Path(ann_file).stem}_person_only_no_crowd"
    if num_images is not None:
        if num_images < 1:
            raise ValueError(f"num_images must be >= 1, got {num_images}")
        if num_images > len(images):
            logger.warning("asked for %d images but only %d have a person; keeping all", num_images, len(images))
        chosen = np.random.default_rng(seed).permutation(len(images))[:num_images]
        # Keep the file's own order so the subset reads like the original.
        images = [images[i] for i in sorted(chosen)]
        kept = {image["id"] for image in images}
        annotations = [ann for ann in annotations if ann["image_id"] in kept]
        name += f"_{len(images)}"
    crowd = sum(1 for a in data["annotations"] if a["category_id"] in person_ids and a.get("iscrowd", 0))
    logger.info(
        "%s: kept %d of %d images and %d person annotations (dropped %d crowd person and %d other annotations)",
        ann_file,
        len(images),
        len(data["images"]),
        len(annotations),
        crowd,
        len(data["annotations"]) - len(annotations) - crowd,
    )
    out = {
        "info": data.get("info"),
        "licenses": data.get("licenses", []),
        "images": images,
        "annotations": annotations,
        "categories": [c for c in data["categories"] if c["id"] in person_ids],
    }
    out_path = Path(out_dir) / f"{name}.json"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out_path, json.dumps(out))
    return out_path


def compute_roi_class_stats(
    images: Iterable[PersonImage], *, mask_size: int = 56, num_classes: int = 3
) -> dict[str, Any]:
    """Pixel counts of the ROI target classes over every person (plain boxes, no augmentation).

    class_weights = total / (num_classes * count), 0 for a class that never occurs.
    """
    counts = np.zeros(num_classes, dtype=np.int64)
    num_rois = 0
    for image in images:
        if not image.persons:
            continue
        person_masks, crowd_mask = instance_masks(image)
        boxes = np.array([p["bbox"] for p in image.persons], dtype=np.float64)
        boxes[:, 2:] += boxes[:, :2]
        targets = roi_targets(person_masks, crowd_mask, np.arange(len(boxes)), boxes, mask_size)
        if targets.max() >= num_classes:
            raise ValueError(f"targets hold class {targets.max()} but num_classes is {num_classes}")
        counts += np.bincount(targets.ravel(), minlength=num_classes)
        num_rois += len(boxes)
    total = int(counts.sum())
    return {
        "num_rois": num_rois,
        "pixel_counts": counts.tolist(),
        "class_frequencies": [float(c / total) if total else 0.0 for c in counts],
        "class_weights": [float(total / (num_classes * c)) if c else 0.0 for c in counts],
    }


def write_stats(stats: dict[str, Any], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(stats, indent=2))
    return path


def read_stats(path: str | os.PathLike) -> dict[str, Any]:
    """Read stats written by write_stats; DataError naming the file if they are malformed."""
    path = Path(path)
    try:
        stats = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read ROI class stats from {path}: {err}") from err
    lists = ("pixel_counts", "class_frequencies", "class_weights")
    if not (
        isinstance(stats, dict)
        and isinstance(stats.get("num_rois"), int)
        and all(isinstance(stats.get(k), list) and stats[k] for k in lists)
        and len({len(stats[k]) for k in lists}) == 1
        and all(isinstance(v, (int, float)) and math.isfinite(v) and v >= 0 for k in lists for v in stats[k])
    ):
        raise DataError(
            f"malformed ROI class stats in {path}: expected num_rois and equal-length non-negative lists {list(lists)}"
        )
    return stats


# ----------------------------------------------------------------------------- COCO instances -> semantic masks


BACKGROUND = "background"
IGNORE_INDEX = 255
CROWD_MODES = ("skip", "ignore")

# Skip reasons beyond the shared and COCO ones (IMAGE_MISSING, SIZE_MISMATCH, UNKNOWN_IMAGE, ...).
CROWD_SKIPPED = "crowd_skipped"  # annotation: iscrowd=1 with crowd="skip"
NO_VALID_ANNOTATION = "no_valid_annotation"  # image: no usable non-crowd annotation
EMPTY_MASK = "empty_mask"  # image: its annotations cover no pixel


def _class_ranks(names: Sequence[str], class_priority: Sequence[str] | None) -> list[int]:
    """Paint rank per class index: 0 if unlisted, else 1 + position in class_priority."""
    if not class_priority:
        return [0] * len(names)
    valid = list(names[1:])
    unknown = [n for n in class_priority if n not in valid]
    if unknown:
        raise DataError(f"unknown class(es) in class_priority: {unknown}; valid names: {valid}")
    if len(set(valid)) != len(valid):
        raise DataError("class_priority needs unique category names, but the annotation file repeats some")
    position = {name: i + 1 for i, name in enumerate(class_priority)}
    return [position.get(name, 0) for name in names]


def _usable_annotations(data: dict[str, Any], class_index: dict[int, int], crowd: str,
                        report: SkipReport) -> dict[int, list[tuple[int, Any, bool]]]:
    """image id -> [(class index, cleaned segmentation, iscrowd)]; every dropped annotation is counted."""
    usable: dict[int, list[tuple[int, Any, bool]]] = defaultdict(list)
    for ann, image in annotations_with_images(data, class_index, report):
        ann_id = ann["id"]
        iscrowd = bool(ann.get("iscrowd", 0))
        if iscrowd and crowd == "skip":
            report.add(CROWD_SKIPPED, ann_id)
            continue
        if "segmentation" not in ann:
            report.add(NO_SEGMENTATION, ann_id)
            continue
        seg = clean_segmentation(ann["segmentation"], image["height"], image["width"], ann_id, report)
        if seg is not None:
            usable[image["id"]].append((class_index[ann["category_id"]], seg, iscrowd))
    return usable


def paint_semantic_mask(height: int, width: int, objects: Sequence[tuple[int, Any, bool]],
                        ranks: Sequence[int]) -> np.ndarray:
    """Class-index mask uint8 [H, W] of (class index, cleaned segmentation, iscrowd) objects.

    Crowd regions are painted first, as IGNORE_INDEX, so every labelled object stays on top of
    them. Objects follow, ordered by (rank of their class, larger area first): a small object
    on a large one (a cup on a table) stays visible, and a class ranked higher by class_priority
    covers lower ones whatever their size. Same-class objects simply add up (union).
    """
    mask = np.zeros((height, width), dtype=np.uint8)
    rles = [to_rle(seg, height, width) for _, seg, _ in objects]
    areas = mask_utils.area(rles) if rles else []
    # Stable sort: equal keys keep the annotation file's order.
    order = sorted(range(len(objects)),
                   key=lambda k: (not objects[k][2], ranks[objects[k][0]], -int(areas[k])))
    for k in order:
        index, _, iscrowd = objects[k]
        mask[mask_utils.decode(rles[k]).astype(bool)] = IGNORE_INDEX if iscrowd else index
    return mask


def _inside_name(file_name: str) -> Path:
    """The image's relative path (sub-folders kept), or just its name where it would leave out_dir."""
    path = Path(file_name)
    return Path(path.name) if path.is_absolute() or ".." in path.parts else path


def _link_or_copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        dst.symlink_to(src.absolute())
    except OSError:  # file systems or platforms without symlinks
        shutil.copy2(src, dst)


def triptych(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """image | mask in VOC colours | image with labelled pixels half-tinted, side by side."""
    colour = voc_palette()[mask]
    labelled = (mask > 0)[:, :, None]
    overlay = np.where(labelled, image // 2 + colour // 2, image).astype(np.uint8)
    return np.concatenate([image, colour, overlay], axis=1)


def prepare_coco_semantic(
    ann: str | os.PathLike,
    img_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    crowd: str = "skip",
    class_priority: Sequence[str] | None = None,
    visualize: int = 0,
    link_images: bool = False,
    seed: int = 0,
) -> dict[str, Any]:
    """Write out_dir/masks/<image stem>.png, one class-index mask per usable image of a COCO file.

    Classes: the COCO categories in id order become 1..K, 0 is background; out_dir/classes.json
    maps index -> name. Overlaps: same-class objects are unioned; across classes larger objects
    are painted first and smaller ones on top, unless class_priority (category names, the
    highest priority last) is given: listed classes are painted after unlisted ones, in list
    order, and by size only among themselves. Crowd annotations are skipped (crowd="skip") or
    painted as 255 = ignore (crowd="ignore") beneath every object.
    Skipped, counted and logged: images missing, unreadable or of another size than the JSON says,
    images without a usable non-crowd annotation and masks that would be empty (never written).
    link_images puts the used images (symlinks, copies where those fail) into out_dir/images/;
    visualize saves that many seeded-random triptychs into out_dir/visualizations/.
    Returns the summary, also written to out_dir/summary.json.
    """
    if crowd not in CROWD_MODES:
        raise ValueError(f"crowd must be one of {CROWD_MODES}, got {crowd!r}")
    data = read_instances(ann)
    img_root = Path(img_dir)
    if not img_root.is_dir():
        raise DataError(f"image directory not found: {img_dir}")
    categories = sorted(data["categories"], key=lambda c: c["id"])
    if len(categories) >= IGNORE_INDEX:
        raise DataError(f"{ann}: {len(categories)} categories do not fit in 1..{IGNORE_INDEX - 1}")
    names = [BACKGROUND] + [str(c["name"]) for c in categories]
    ranks = _class_ranks(names, class_priority)
    ann_report, image_report = SkipReport(), SkipReport()
    usable = _usable_annotations(data, {c["id"]: i + 1 for i, c in enumerate(categories)}, crowd, ann_report)

    out = Path(out_dir)
    masks_dir, images_dir = out / "masks", out / "images"
    masks_dir.mkdir(parents=True, exist_ok=True)
    written: list[tuple[Path, Path, dict]] = []
    for image in data["images"]:
        image_id, height, width = image["id"], image["height"], image["width"]
        objects = usable.get(image_id, [])
        if all(iscrowd for _, _, iscrowd in objects):
            image_report.add(NO_VALID_ANNOTATION, image_id)
            continue
        path = img_root / image["file_name"]
        try:
            # A full decode: a truncated or mis-sized image is dropped here, not found in training.
            read_rgb_sized(path, height, width)
        except BadImage as err:
            reason = SIZE_MISMATCH if isinstance(err, SizeMismatch) else (
                IMAGE_MISSING if not path.is_file() else IMAGE_UNREADABLE)
            logger.warning("skipping image %d: %s", image_id, err)
            image_report.add(reason, image_id)
            continue
        mask = paint_semantic_mask(height, width, objects, ranks)
        if not ((mask > 0) & (mask != IGNORE_INDEX)).any():
            image_report.add(EMPTY_MASK, image_id)
            continue
        name = _inside_name(image["file_name"])
        mask_path = (masks_dir / name).with_suffix(".png")
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        save_mask(mask_path, mask)
        if link_images:
            _link_or_copy(path, images_dir / name)
        written.append((path, mask_path, image))

    classes_file = out / "classes.json"
    classes_file.write_text(json.dumps({str(i): name for i, name in enumerate(names)}, indent=1))
    summary = {
        "images": len(data["images"]),
        "written": len(written),
        "skipped_images": image_report.as_dict(),
        "skipped_annotations": ann_report.as_dict(),
        "num_classes": len(names),
        "crowd": crowd,
        "class_priority": list(class_priority) if class_priority else None,
        "masks_dir": str(masks_dir),
        "images_dir": str(images_dir) if link_images else None,
        "classes_file": str(classes_file),
        "visualizations": _visualize(written, out / "visualizations", visualize, seed),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    ann_report.log(logger, f"{ann} annotations")
    image_report.log(logger, f"{ann} images")
    logger.info("wrote %d of %d masks into %s", len(written), len(data["images"]), masks_dir)
    return summary


def _visualize(written: list[tuple[Path, Path, dict]], folder: Path, count: int, seed: int) -> list[str]:
    """Save `count` seeded-random triptychs of written masks; return their paths."""
    if count <= 0 or not written:
        return []
    folder.mkdir(parents=True, exist_ok=True)
    chosen = np.random.default_rng(seed).choice(len(written), size=min(count, len(written)), replace=False)
    paths = []
    for k in sorted(chosen):
        image_path, mask_path, image = written[k]
        pixels = read_rgb_sized(image_path, image["height"], image["width"])
        out = folder / f"{mask_path.stem}.png"
        Image.fromarray(triptych(pixels, read_mask(mask_path))).save(out)
        paths.append(str(out))
    return paths


def load_class_names(classes_file: str | os.PathLike) -> list[str]:
    """Class names by index from a classes.json written by prepare_coco_semantic."""
    try:
        mapping = json.loads(Path(classes_file).read_text())
        names = [mapping[str(i)] for i in range(len(mapping))]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(
            f"cannot read class names from {classes_file}: expected {{'0': name, '1': ...}} ({err})"
        ) from err
    return names


# ----------------------------------------------------------------------------- P3M + Supervisely -> memmaps


def read_binary_mask(path: str | os.PathLike, threshold: int) -> np.ndarray:
    """A portrait mask as HxW uint8 in {0, 1} (rules in segjax.data.memmap's docstring); BadImage if unreadable."""

    def binarise(img: Image.Image) -> np.ndarray:
        if img.mode == "P":
            return np.asarray(img) > 0
        # Stored orientation: mask tools do not write EXIF rotations.
        return to_rgb(img).max(axis=2) >= threshold

    return decode(path, binarise).astype(np.uint8)


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


def _write_memmaps(
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
                    mask = read_binary_mask(mask_path, mask_threshold)
                    image = read_rgb_sized(image_path, *mask.shape)
                except BadImage as err:
                    reason = (SIZE_MISMATCH if isinstance(err, SizeMismatch)
                              else MASK_UNREADABLE if err.path == os.fspath(mask_path) else IMAGE_UNREADABLE)
                    report.add(reason, err.path)
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
            write_atomic(f"{final}.json", json.dumps(sidecar))
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
            found = pair_by_stem(files_by_stem(image_dir, IMAGE_SUFFIXES), files_by_stem(mask_dir, IMAGE_SUFFIXES),
                                 report)
            pairs += [(image, mask) for _, image, mask in found]
        result = _write_memmaps(split, pairs, out_dir, size=size, dtype=dtype, mask_threshold=mask_threshold,
                              resize=resize, report=report)
        report.log(logger, f"{split} memmaps")
        summary["splits"][split] = {**result, "skipped": report.as_dict()}
    if not any(s["count"] for s in summary["splits"].values()):
        raise DataError(f"no usable image/mask pairs under {p3m_root}" + (
            f" or {supervisely_root}" if supervisely_root is not None else ""))
    return summary


# ----------------------------------------------------------------------------- road-scene pickle -> folder layout


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


# ----------------------------------------------------------------------------- road-scene split lists


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
