"""COCO instances files: reading and cleaning annotations, the person index, instance masks, ROI sources."""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import defaultdict
from collections.abc import Container, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from pycocotools import mask as mask_utils

from segjax.data.errors import IMAGE_MISSING, DataError, SkipReport

PERSON = "person"
# ROI target classes.
BACKGROUND, THIS_PERSON, OTHER_PERSON = 0, 1, 2

# Skip reasons: one name per rule so every dropped record is accounted for.
UNKNOWN_CATEGORY = "unknown_category"  # annotation's category_id is not in `categories`
UNKNOWN_IMAGE = "unknown_image"  # annotation's image_id is not in `images`
NO_SEGMENTATION = "no_segmentation"  # bbox-only person annotation
POLYGON_PART_DROPPED = "polygon_part_dropped"  # a polygon part with < 3 points (or odd length)
EMPTY_POLYGON = "empty_polygon"  # no polygon part left: annotation skipped
BAD_SEGMENTATION = "bad_segmentation"  # unknown format, RLE of another size or bad counts
DEGENERATE_BOX = "degenerate_box"  # bbox missing, non-finite, or w/h < 1 px inside the image
NO_PERSON = "no_person"  # image without a valid person (with require_persons)


@dataclasses.dataclass(frozen=True)
class PersonImage:
    """One image with its valid person annotations (ROIs) and crowd person regions."""

    image_id: int
    path: str
    height: int
    width: int
    persons: tuple[dict[str, Any], ...]
    crowds: tuple[dict[str, Any], ...]


def read_instances(ann_file: str | os.PathLike) -> dict[str, Any]:
    """Read a COCO instances JSON file, raising DataError if it is not one."""
    ann_file = Path(ann_file)
    if not ann_file.is_file():
        raise DataError(f"annotation file not found: {ann_file}")
    try:
        with open(ann_file, encoding="utf-8") as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DataError(f"annotation file {ann_file} is not valid JSON: {err}") from err
    if isinstance(data, list):
        raise DataError(
            f"{ann_file} holds a JSON list, like a COCO results file; expected a COCO instances file "
            "(a dict with 'images', 'annotations' and 'categories')"
        )
    if not isinstance(data, dict):
        raise DataError(f"{ann_file} is not a COCO instances file: top level is {type(data).__name__}")
    missing = [k for k in ("images", "annotations", "categories") if not isinstance(data.get(k), list)]
    if missing:
        raise DataError(f"{ann_file} is not a COCO instances file: missing or non-list key(s) {missing}")
    _check_entries(ann_file, data["images"], "images", ("id", "file_name", "height", "width"))
    _check_entries(ann_file, data["annotations"], "annotations", ("id", "image_id", "category_id"))
    _check_entries(ann_file, data["categories"], "categories", ("id", "name"))
    for i, image in enumerate(data["images"]):
        if not all(isinstance(image[k], int) and image[k] > 0 for k in ("height", "width")):
            size = f"{image['width']}x{image['height']}"
            raise DataError(f"{ann_file}: images[{i}] (id {image['id']}) has a bad size {size}")
    ids = [image["id"] for image in data["images"]]
    if len(set(ids)) != len(ids):
        raise DataError(f"{ann_file}: duplicate image ids")
    return data


def _check_entries(ann_file: Path, entries: list, key: str, required: tuple[str, ...]) -> None:
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or any(k not in entry for k in required):
            raise DataError(f"{ann_file}: {key}[{i}] is not a dict with keys {list(required)}: {str(entry)[:200]}")


def person_category_ids(data: dict[str, Any], ann_file: str | os.PathLike) -> set[int]:
    """Ids of the categories named 'person'; DataError if there is none."""
    ids = {c["id"] for c in data["categories"] if c["name"] == PERSON}
    if not ids:
        names = sorted(str(c["name"]) for c in data["categories"])
        raise DataError(f"{ann_file} has no '{PERSON}' category (categories: {names[:20]})")
    return ids


def _clean_polygons(parts: list, ann_id: int, report: SkipReport) -> list[list[float]]:
    """Keep the polygon parts pycocotools can rasterise: >= 3 points, x/y pairs, finite numbers."""
    kept = []
    for part in parts:
        # A 4-number part is read by pycocotools as a box (or crashes it), and < 6 has no area.
        if (
            isinstance(part, list)
            and len(part) >= 6
            and len(part) % 2 == 0
            and all(isinstance(v, (int, float)) and math.isfinite(v) for v in part)
        ):
            kept.append([float(v) for v in part])
        else:
            report.add(POLYGON_PART_DROPPED, ann_id)
    return kept


def _compressed_rle_total(counts: str) -> int | None:
    """Pixels covered by a compressed COCO RLE string; None if it is cut short or a run is negative.

    Follows rleFrString of the COCO mask API: 5-bit groups with a continuation bit, runs
    after the second stored as differences to the run two before. Re-implemented because
    pycocotools neither validates nor exposes the runs: it decodes a bad string to garbage or aborts.
    """
    runs: list[int] = []
    pos = 0
    while pos < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if pos >= len(counts):
                return None
            c = ord(counts[pos]) - 48
            value |= (c & 0x1F) << shift
            more = bool(c & 0x20)
            pos += 1
            shift += 5
            if not more and c & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        if value < 0:
            return None
        runs.append(value)
    return sum(runs)


def clean_segmentation(seg: Any, height: int, width: int, ann_id: int, report: SkipReport) -> Any | None:
    """Cleaned polygons or an RLE dict checked against the image size; None (counted) if unusable."""
    if isinstance(seg, list):
        parts = _clean_polygons(seg, ann_id, report)
        if not parts:
            report.add(EMPTY_POLYGON, ann_id)
            return None
        return parts
    if isinstance(seg, dict) and "counts" in seg and list(seg.get("size", ())) == [height, width]:
        # Runs must cover the image exactly: pycocotools decodes other uncompressed counts to
        # garbage and raises mid-epoch on bad compressed ones.
        counts = seg["counts"]
        if isinstance(counts, str):
            if _compressed_rle_total(counts) == height * width:
                return {"size": [height, width], "counts": counts}
        if isinstance(counts, list) and all(isinstance(c, int) and c >= 0 for c in counts):
            if sum(counts) == height * width:
                return {"size": [height, width], "counts": counts}
    report.add(BAD_SEGMENTATION, ann_id)
    return None


def _clean_box(bbox: Any, height: int, width: int) -> list[float] | None:
    """The [x, y, w, h] box clipped to the image, or None if it is degenerate."""
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
        return None
    x, y, w, h = (float(v) for v in bbox)
    if not all(math.isfinite(v) for v in (x, y, w, h)):
        return None
    x1, y1 = max(x, 0.0), max(y, 0.0)
    x2, y2 = min(x + w, float(width)), min(y + h, float(height))
    if x2 - x1 < 1 or y2 - y1 < 1:
        return None
    return [x1, y1, x2 - x1, y2 - y1]


def annotations_with_images(data: dict[str, Any], category_ids: Container[int],
                            report: SkipReport) -> Iterator[tuple[dict, dict]]:
    """(annotation, its image entry) pairs; annotations of unknown images or categories are counted."""
    images = {image["id"]: image for image in data["images"]}
    for ann in data["annotations"]:
        image = images.get(ann["image_id"])
        if image is None:
            report.add(UNKNOWN_IMAGE, ann["id"])
        elif ann["category_id"] not in category_ids:
            report.add(UNKNOWN_CATEGORY, ann["id"])
        else:
            yield ann, image


def load_person_index(
    ann_file: str | os.PathLike, img_dir: str | os.PathLike, *, require_persons: bool = True
) -> tuple[list[PersonImage], SkipReport]:
    """Index the images of a COCO instances file by their valid person annotations.

    Every dropped annotation or image is counted in the returned SkipReport under a reason.
    """
    data = read_instances(ann_file)
    img_root = Path(img_dir).resolve()
    if not img_root.is_dir():
        raise DataError(f"image directory not found: {img_dir}")
    person_ids = person_category_ids(data, ann_file)
    category_ids = {c["id"] for c in data["categories"]}
    report = SkipReport()
    persons: dict[int, list[dict]] = defaultdict(list)
    crowds: dict[int, list[dict]] = defaultdict(list)

    for ann, image in annotations_with_images(data, category_ids, report):
        ann_id = ann["id"]
        if ann["category_id"] not in person_ids:
            continue
        if "segmentation" not in ann:
            report.add(NO_SEGMENTATION, ann_id)
            continue
        height, width = image["height"], image["width"]
        if ann.get("iscrowd", 0):
            # Crowd regions only mark "other people" pixels, so their box does not matter.
            seg = clean_segmentation(ann["segmentation"], height, width, ann_id, report)
            if seg is not None:
                crowds[image["id"]].append({"id": ann_id, "segmentation": seg})
            continue
        box = _clean_box(ann.get("bbox"), height, width)
        if box is None:
            report.add(DEGENERATE_BOX, ann_id)
            continue
        seg = clean_segmentation(ann["segmentation"], height, width, ann_id, report)
        if seg is not None:
            persons[image["id"]].append({"id": ann_id, "bbox": box, "segmentation": seg})

    index = []
    for image in data["images"]:
        image_id = image["id"]
        if require_persons and not persons.get(image_id):
            report.add(NO_PERSON, image_id)
            continue
        path = img_root / image["file_name"]
        if not path.is_file():
            report.add(IMAGE_MISSING, image_id)
            continue
        index.append(
            PersonImage(
                image_id=image_id,
                path=str(path),
                height=image["height"],
                width=image["width"],
                persons=tuple(persons.get(image_id, ())),
                crowds=tuple(crowds.get(image_id, ())),
            )
        )
    return index, report


def to_rle(seg: Any, height: int, width: int) -> dict:
    """One compressed RLE for cleaned polygons, an uncompressed RLE or a compressed RLE."""
    if isinstance(seg, list):
        return mask_utils.merge(mask_utils.frPyObjects(seg, height, width))
    if isinstance(seg["counts"], list):
        return mask_utils.frPyObjects(seg, height, width)
    return seg


def instance_masks(image: PersonImage) -> tuple[np.ndarray, np.ndarray]:
    """Person masks uint8 [P, H, W] (order of `persons`) and the union crowd mask uint8 [H, W]."""
    h, w = image.height, image.width
    if image.persons:
        rles = [to_rle(p["segmentation"], h, w) for p in image.persons]
        person_masks = np.ascontiguousarray(np.transpose(mask_utils.decode(rles), (2, 0, 1)))
    else:
        person_masks = np.zeros((0, h, w), dtype=np.uint8)
    if image.crowds:
        crowd_rle = mask_utils.merge([to_rle(c["segmentation"], h, w) for c in image.crowds])
        crowd_mask = np.ascontiguousarray(mask_utils.decode(crowd_rle))
    else:
        crowd_mask = np.zeros((h, w), dtype=np.uint8)
    return person_masks, crowd_mask


class PersonRoiSource:
    """Random-access source of (PersonImage, person indices), one entry per chunk of <= max_rois persons."""

    def __init__(self, images: Sequence[PersonImage], max_rois: int):
        if max_rois < 1:
            raise ValueError(f"max_rois must be >= 1, got {max_rois}")
        self.images = list(images)
        self.max_rois = max_rois
        # (image index, first person) per entry; images with more people than max_rois get several.
        self._entries = np.array(
            [(i, start) for i, image in enumerate(self.images) for start in range(0, len(image.persons), max_rois)],
            dtype=np.int64,
        ).reshape(-1, 2)

    def __len__(self) -> int:
        return len(self._entries)

    def __getitem__(self, index: int) -> tuple[PersonImage, tuple[int, ...]]:
        image_index, start = (int(v) for v in self._entries[index])
        image = self.images[image_index]
        return image, tuple(range(start, min(start + self.max_rois, len(image.persons))))

    def __repr__(self) -> str:
        return f"PersonRoiSource({len(self.images)} images, {len(self)} entries, max_rois={self.max_rois})"
