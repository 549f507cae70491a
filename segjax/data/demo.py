"""Small deterministic demo data sets in real on-disk formats, written into a cache directory."""
from __future__ import annotations

import colorsys
import json
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

logger = logging.getLogger(__name__)

# Bump when the generated content changes, so cached copies are rewritten.
COCO_PERSON_DEMO_VERSION = 1
_MARKER = "segjax_coco_person_demo.json"
_CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 2, "name": "bicycle"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "sports", "id": 37, "name": "sports ball"},
]
_SPORTS_BALL = 37
# COCO numbers crowd annotations far above the instance ids (beyond int32); so do we.
_CROWD_ID_BASE = 900_000_000_000
# Train and val get disjoint image ids that do not start at 0 or 1.
_IMAGE_ID_BASE = {"train2017": 1_000, "val2017": 500_000}


def default_demo_root() -> Path:
    """Cache directory for demo data: $SEGJAX_DEMO_ROOT or ~/.cache/segjax/demo."""
    return Path(os.environ.get("SEGJAX_DEMO_ROOT", Path.home() / ".cache" / "segjax" / "demo"))


def _ellipse(cx: float, cy: float, rx: float, ry: float, points: int = 20) -> list[float]:
    angles = np.linspace(0.0, 2.0 * np.pi, points, endpoint=False)
    return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1).ravel().tolist()


def _person_parts(cx: float, top: float, height: float, shoulders: float, lean: float) -> list[list[float]]:
    """Head ellipse and one torso+legs polygon, as COCO polygon parts."""
    h, s = height, shoulders
    head = _ellipse(cx + lean, top + 0.1 * h, 0.085 * h, 0.1 * h)
    body = [
        (cx + lean - 0.12 * s, top + 0.19 * h),
        (cx + lean + 0.12 * s, top + 0.19 * h),
        (cx + 0.5 * lean + 0.5 * s, top + 0.23 * h),
        (cx + 0.4 * s, top + 0.58 * h),
        (cx + 0.45 * s, top + h),
        (cx + 0.08 * s, top + h),
        (cx, top + 0.64 * h),
        (cx - 0.08 * s, top + h),
        (cx - 0.45 * s, top + h),
        (cx - 0.4 * s, top + 0.58 * h),
        (cx + 0.5 * lean - 0.5 * s, top + 0.23 * h),
    ]
    return [head, [float(v) for point in body for v in point]]


def _rasterise(parts: list[list[float]], height: int, width: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(parts, height, width))).astype(bool)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Muted low-frequency colour field plus pixel noise: texture the model must ignore."""
    coarse = rng.uniform(70, 180, size=(4, 5, 1)) + rng.uniform(-25, 25, size=(4, 5, 3))
    coarse = coarse.astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return field + rng.normal(0.0, 14.0, size=(height, width, 3))


def _colour(rng: np.random.Generator, hue: float) -> np.ndarray:
    rgb = colorsys.hsv_to_rgb(hue % 1.0, rng.uniform(0.75, 1.0), rng.uniform(0.75, 1.0))
    return np.array(rgb, dtype=np.float32) * 255.0


def _place_people(rng: np.random.Generator, height: int, width: int) -> list[list[list[float]]]:
    """1-4 big people, usually overlapping a neighbour, each at least 40% visible."""
    people: list[list[list[float]]] = []
    visible: list[np.ndarray] = []  # what is still seen of each placed person
    areas: list[int] = []
    centres: list[float] = []
    for _ in range(int(rng.integers(1, 5))):
        for _attempt in range(10):
            person_h = rng.uniform(0.6, 0.92) * height
            shoulders = 0.36 * person_h * rng.uniform(0.85, 1.15)
            if centres and rng.random() < 0.7:
                cx = centres[-1] + rng.choice([-1.0, 1.0]) * rng.uniform(0.35, 0.8) * shoulders
            else:
                cx = rng.uniform(0.0, width)
            cx = float(np.clip(cx, shoulders / 2 + 1, width - shoulders / 2 - 1))
            top = rng.uniform(1.0, height - person_h - 1.0)
            parts = _person_parts(cx, top, person_h, shoulders, rng.uniform(-0.05, 0.05) * person_h)
            mask = _rasterise(parts, height, width)
            # The new person is drawn in front: everyone behind must stay recognisable.
            remaining = [v & ~mask for v in visible]
            if all(r.sum() >= 0.4 * area for r, area in zip(remaining, areas)):
                people.append(parts)
                visible = remaining + [mask]
                areas.append(int(mask.sum()))
                centres.append(cx)
                break
    return people


def _crowd_parts(rng: np.random.Generator, height: int, width: int) -> list[list[float]]:
    """A band of small distant heads and shoulders along the top of the image."""
    parts = []
    for x in np.arange(rng.uniform(4, 10), width - 4, rng.uniform(9, 13)):
        y = rng.uniform(0.1, 0.2) * height
        parts.append(_ellipse(float(x), y, 3.5, 4.0, points=10))
        parts.append(_ellipse(float(x), y + 8.0, 5.5, 4.5, points=10))
    return parts


def _render_image(rng: np.random.Generator, height: int, width: int, with_crowd: bool) -> tuple[np.ndarray, list[dict]]:
    """Pixels and the annotations (without ids) of one demo image."""
    pixels = _background(rng, height, width)
    # Layers back to front: (category, parts, iscrowd, colour).
    layers: list[tuple[int, list[list[float]], int, np.ndarray]] = []
    if with_crowd:
        layers.append((1, _crowd_parts(rng, height, width), 1, _colour(rng, rng.random()) * 0.6))
    if rng.random() < 0.3:
        radius = rng.uniform(6, 11)
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(height * 0.6, height - radius)
        ball = _ellipse(cx, cy, radius, radius, 24)
        layers.append((_SPORTS_BALL, [ball], 0, np.array([240.0, 240.0, 240.0])))
    people = _place_people(rng, height, width)
    hue = rng.random()
    for k, parts in enumerate(people):
        # Hues spread around the colour wheel keep neighbours distinct.
        layers.append((1, parts, 0, _colour(rng, hue + k / len(people) + rng.uniform(-0.05, 0.05))))

    masks = [_rasterise(parts, height, width) for _, parts, _, _ in layers]
    for mask, (_, _, _, colour) in zip(masks, layers):
        shade = 1.0 + rng.normal(0.0, 0.06, size=(int(mask.sum()), 1))
        pixels[mask] = colour * shade
    annotations = []
    for k, (category, parts, iscrowd, _) in enumerate(layers):
        visible = masks[k].copy()
        for front in masks[k + 1 :]:
            visible &= ~front
        if not visible.any():
            continue
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        if iscrowd:
            # Real COCO crowd regions use uncompressed RLE (counts as a list).
            segmentation: Any = _uncompressed_rle(visible)
        elif visible.sum() == masks[k].sum() and rng.random() < 0.8:
            segmentation = [[round(v, 2) for v in part] for part in parts]
        else:
            segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
        annotations.append(
            {
                "segmentation": segmentation,
                "area": float(visible.sum()),
                "iscrowd": iscrowd,
                "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
                "category_id": category,
            }
        )
    return np.clip(pixels, 0, 255).astype(np.uint8), annotations


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with a background run, as in COCO crowd annotations."""
    flat = mask.T.ravel().astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _write_split(root: Path, split: str, count: int, size: tuple[int, int], seed: int) -> None:
    width, height = size
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    next_ann_id = 1
    for i in range(count):
        image_id = _IMAGE_ID_BASE[split] + i
        # One generator per image: the content of image i does not depend on the split size.
        rng = np.random.default_rng([seed, _IMAGE_ID_BASE[split], i])
        pixels, anns = _render_image(rng, height, width, with_crowd=i % 5 == 2)
        file_name = f"{image_id:012d}.jpg"
        Image.fromarray(pixels).save(image_dir / file_name, quality=92)
        images.append({"license": 1, "file_name": file_name, "height": height, "width": width, "id": image_id})
        for ann in anns:
            if ann["iscrowd"]:
                ann_id = _CROWD_ID_BASE + image_id
            else:
                ann_id, next_ann_id = next_ann_id, next_ann_id + 1
            annotations.append({**ann, "image_id": image_id, "id": ann_id})
    data = {
        "info": {"description": "segjax synthetic COCO person demo", "version": str(COCO_PERSON_DEMO_VERSION)},
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": _CATEGORIES,
    }
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = ann_file.with_name(ann_file.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, ann_file)


def write_coco_person_demo(
    root: str | os.PathLike,
    *,
    num_train: int = 96,
    num_val: int = 24,
    image_size: tuple[int, int] = (160, 128),
    seed: int = 0,
) -> dict[str, str]:
    """Write (or reuse) a synthetic COCO-2017-layout person data set; image_size is (width, height).

    Returns the paths {train_ann, val_ann, train_img_dir, val_img_dir}.
    """
    root = Path(root)
    paths = {
        "train_ann": str(root / "annotations" / "instances_train2017.json"),
        "val_ann": str(root / "annotations" / "instances_val2017.json"),
        "train_img_dir": str(root / "train2017"),
        "val_img_dir": str(root / "val2017"),
    }
    params = {
        "version": COCO_PERSON_DEMO_VERSION,
        "num_train": num_train,
        "num_val": num_val,
        "image_size": list(image_size),
        "seed": seed,
    }
    marker = root / _MARKER
    if _is_complete(marker, params, paths):
        logger.info("reusing COCO person demo data in %s", root)
        return paths
    logger.info("writing COCO person demo data (%d train, %d val images) into %s", num_train, num_val, root)
    marker.unlink(missing_ok=True)
    for split, count in (("train2017", num_train), ("val2017", num_val)):
        _write_split(root, split, count, tuple(image_size), seed)
    # Written last: its presence means everything before it is complete.
    marker.write_text(json.dumps(params))
    return paths


def _is_complete(marker: Path, params: dict, paths: dict[str, str]) -> bool:
    try:
        if json.loads(marker.read_text()) != params:
            return False
    except (OSError, ValueError):
        return False
    dirs = {
        "train2017": (paths["train_img_dir"], params["num_train"]),
        "val2017": (paths["val_img_dir"], params["num_val"]),
    }
    return all(Path(paths[k]).is_file() for k in ("train_ann", "val_ann")) and all(
        (Path(folder) / f"{_IMAGE_ID_BASE[split] + i:012d}.jpg").is_file()
        for split, (folder, count) in dirs.items()
        for i in range(count)
    )
