"""Dataset preparation used by tools/: person-only COCO subsets and ROI class statistics."""
from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from segjax.data.coco import PersonImage, instance_masks, person_category_ids, read_instances, roi_targets
from segjax.data.errors import DataError

logger = logging.getLogger(__name__)


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
    tmp = out_path.with_name(out_path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(out))
    os.replace(tmp, out_path)
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
