"""COCO instances -> semantic class-index masks, one PNG per image, for the folder loader."""
from __future__ import annotations

import json
import logging
import os
import shutil
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from segjax.data.coco import (
    IMAGE_MISSING,
    NO_SEGMENTATION,
    annotations_with_images,
    clean_segmentation,
    read_instances,
    to_rle,
)
from segjax.data.errors import DataError, SkipReport
from segjax.data.images import SIZE_MISMATCH, BadImage, SizeMismatch, read_rgb_sized
from segjax.data.semantic import read_mask, save_mask, voc_palette

logger = logging.getLogger(__name__)

BACKGROUND = "background"
IGNORE_INDEX = 255
CROWD_MODES = ("skip", "ignore")

# Skip reasons beyond the COCO ones (IMAGE_MISSING, SIZE_MISMATCH, UNKNOWN_IMAGE, ...).
CROWD_SKIPPED = "crowd_skipped"  # annotation: iscrowd=1 with crowd="skip"
IMAGE_UNREADABLE = "image_unreadable"  # image: cannot be decoded
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
