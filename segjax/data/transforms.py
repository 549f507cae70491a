"""Per-record transforms: letterboxing, seeded augmentations and the fixed-shape examples every task trains on.

Random transforms take a numpy Generator that grain seeds per record, so a run is reproducible.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from segjax.data.coco import BACKGROUND, OTHER_PERSON, THIS_PERSON, PersonImage, instance_masks
from segjax.data.files import BadImage, read_rgb_sized
from segjax.data.roads import IGNORE
from segjax.data.voc import SegPair, read_mask

logger = logging.getLogger(__name__)


def letterbox_size(height: int, width: int, size: int | tuple[int, int]) -> tuple[int, int, float]:
    """(content height, content width, scale) of an image letterboxed into size x size (or a
    (height, width) size)."""
    size_h, size_w = (size, size) if isinstance(size, int) else size
    scale = min(size_h / height, size_w / width)
    return min(size_h, max(1, round(height * scale))), min(size_w, max(1, round(width * scale))), scale


def resize_letterbox(
    image: np.ndarray, size: int | tuple[int, int], *, fill: int = 0,
    resample: Image.Resampling = Image.Resampling.BILINEAR,
) -> tuple[np.ndarray, float]:
    """Resize to fit `size` (an int: size x size, or (height, width)) and pad bottom/right with `fill`.

    Works for HxWxC images and HxW label maps (pass NEAREST so no new label appears).
    Returns the padded array and the scale applied to pixel coordinates.
    """
    height, width = image.shape[:2]
    new_h, new_w, scale = letterbox_size(height, width, size)
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
    out = np.full(((size, size) if isinstance(size, int) else tuple(size)) + image.shape[2:], fill, dtype=image.dtype)
    out[:new_h, :new_w] = image
    return out, scale

# ----------------------------------------------------------------- semantic (image + class-index mask)


def _read_pair(pair: SegPair, lut: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """(image uint8 [H, W, 3], mask uint8 [H, W]) of a pair, the mask's values through `lut`
    (roads.label_lut) when given; None, logged, when a file is unreadable or the sizes differ:
    never an exception mid-epoch, the example is flagged and masked out downstream."""
    try:
        mask = read_mask(pair.mask_path) if lut is None else read_label(pair.mask_path, lut)
        return read_rgb_sized(pair.image_path, *mask.shape), mask
    except BadImage as err:
        logger.warning("skipping %s (record %s): %s", err.path, pair.id, err.reason)
        return None


def _unusable(size: tuple[int, int], ignore_index: int, **more: np.ndarray) -> dict[str, np.ndarray]:
    """The example standing in for an unreadable record: zeros, a mask of ignore, image_ok False."""
    return {"image": np.zeros((*size, 3), np.uint8), "mask": np.full(size, ignore_index, np.uint8), **more,
            "image_ok": np.asarray(False)}


def random_scale_crop_flip(
    image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, crop: tuple[int, int],
    scale: tuple[float, float], flip: bool, ignore_index: int, base_factor: float = 1.0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Joint random resize, crop (padding when smaller) and horizontal flip of image and mask.

    The resize factor is base_factor times a uniform draw from `scale`; crop is (height, width).
    Returns the image, the mask and a bool map of the pixels that came from the image (False on
    padding), all [crop_h, crop_w].
    """
    height, width = mask.shape
    crop_h, crop_w = crop
    factor = base_factor * rng.uniform(*scale)
    new_h, new_w = max(1, round(height * factor)), max(1, round(width * factor))
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BILINEAR))
        # Nearest for labels: interpolating class indices would invent classes at boundaries.
        mask = np.asarray(Image.fromarray(mask).resize((new_w, new_h), Image.Resampling.NEAREST))
    valid = np.ones((new_h, new_w), dtype=bool)
    pad_h, pad_w = max(crop_h - new_h, 0), max(crop_w - new_w, 0)
    if pad_h or pad_w:
        # Padded pixels are ignored by the loss and metrics, whatever the model predicts there.
        image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
        mask = np.pad(mask, ((0, pad_h), (0, pad_w)), constant_values=ignore_index)
        valid = np.pad(valid, ((0, pad_h), (0, pad_w)))
    top = int(rng.integers(0, mask.shape[0] - crop_h + 1))
    left = int(rng.integers(0, mask.shape[1] - crop_w + 1))
    window = (slice(top, top + crop_h), slice(left, left + crop_w))
    image, mask, valid = image[window], mask[window], valid[window]
    if flip and rng.random() < 0.5:
        image, mask, valid = image[:, ::-1], mask[:, ::-1], valid[:, ::-1]
    return np.ascontiguousarray(image), np.ascontiguousarray(mask), np.ascontiguousarray(valid)


def make_seg_example(
    pair: SegPair,
    *,
    rng: np.random.Generator | None = None,
    crop_size: int = 224,
    scale: tuple[float, float] = (0.9, 1.1),
    flip: bool = True,
    eval_size: int | None = None,
    ignore_index: int = 255,
) -> dict[str, np.ndarray]:
    """Fixed-shape example {image uint8 [S,S,3], mask uint8 [S,S], image_ok bool}.

    Training (rng given, S = crop_size): resize image (bilinear) and mask (nearest) by a random
    factor in `scale`, random crop (image padded with 0, mask with ignore_index when smaller),
    horizontal flip with probability 0.5. Evaluation (rng None, S = eval_size or crop_size):
    letterbox, the long side to S, the padding ignore_index in the mask so it never counts.
    An unreadable image or mask (or one of another size) is logged and gives zeros, a mask of
    ignore_index and image_ok False, never an exception mid-epoch.
    """
    size = crop_size if rng is not None or eval_size is None else eval_size
    read = _read_pair(pair)
    if read is None:
        return _unusable((size, size), ignore_index)
    image, mask = read
    if rng is None:
        image, _ = resize_letterbox(image, size)
        mask, _ = resize_letterbox(mask, size, fill=ignore_index, resample=Image.Resampling.NEAREST)
    else:
        image, mask, _ = random_scale_crop_flip(image, mask, rng, (size, size), scale, flip, ignore_index)
    return {"image": image, "mask": mask, "image_ok": np.asarray(True)}


# ----------------------------------------------------------------- portraits (memmap records)

def _zoom(array: np.ndarray, zoom: float, resample: Image.Resampling) -> np.ndarray:
    """Scale about the image centre keeping the size: > 1 crops in, < 1 shrinks and pads with 0."""
    height, width = array.shape[:2]
    inv = 1.0 / zoom
    # PIL's affine maps output pixel centres to input coordinates; the centre maps to itself.
    coeffs = (inv, 0.0, width / 2 * (1 - inv), 0.0, inv, height / 2 * (1 - inv))
    img = Image.fromarray(np.ascontiguousarray(array))
    return np.asarray(img.transform((width, height), Image.Transform.AFFINE, coeffs, resample=resample, fillcolor=0))


def _jitter_colour(image: np.ndarray, rng: np.random.Generator, strength: float) -> np.ndarray:
    """Brightness, contrast and saturation factors each drawn from [1 - strength, 1 + strength].

    In float with one rounding at the end; PIL's ImageEnhance would round and clip to uint8 after each step.
    """
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


# ----------------------------------------------------------------- COCO person ROIs


def _bin_centres(lo: np.ndarray, hi: np.ndarray, bins: int, limit: int) -> tuple[np.ndarray, np.ndarray]:
    """Nearest pixel index of each bin centre [R, bins] and whether it lies inside [0, limit)."""
    centres = lo[:, None] + (np.arange(bins) + 0.5)[None, :] * ((hi - lo) / bins)[:, None]
    index = np.floor(centres).astype(np.int64)
    inside = (index >= 0) & (index < limit)
    return np.clip(index, 0, limit - 1), inside


def roi_targets(
    person_masks: np.ndarray,
    crowd_mask: np.ndarray,
    person_ids: Sequence[int] | np.ndarray,
    boxes: np.ndarray,
    mask_size: int = 56,
) -> np.ndarray:
    """ROI mask targets uint8 [R, mask_size, mask_size]: 1 this person, 2 other people, 0 rest.

    boxes are [R, 4] x1, y1, x2, y2 in the masks' pixel space; each bin centre samples its
    nearest pixel, and bins outside the image are background.
    """
    person_ids = np.asarray(person_ids, dtype=np.int64)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    height, width = crowd_mask.shape
    # How many people cover each pixel (crowd included): "others" = that count minus one's own mask.
    people = person_masks.astype(np.int32).sum(axis=0) + (crowd_mask > 0)
    ys, y_in = _bin_centres(boxes[:, 1], boxes[:, 3], mask_size, height)
    xs, x_in = _bin_centres(boxes[:, 0], boxes[:, 2], mask_size, width)
    inside = y_in[:, :, None] & x_in[:, None, :]
    rows, cols = ys[:, :, None], xs[:, None, :]
    own = person_masks[person_ids[:, None, None], rows, cols] > 0
    others = people[rows, cols] - own > 0
    targets = np.where(own, THIS_PERSON, np.where(others, OTHER_PERSON, BACKGROUND)).astype(np.uint8)
    return np.where(inside, targets, BACKGROUND).astype(np.uint8)


def jitter_boxes(boxes: np.ndarray, rng: np.random.Generator, jitter: float, height: int, width: int) -> np.ndarray:
    """Move each side by up to jitter x box size, clip to the image, keep >= 1 px wide and high."""
    boxes = np.asarray(boxes, dtype=np.float64)
    size = np.concatenate([boxes[:, 2:] - boxes[:, :2]] * 2, axis=1)
    boxes = boxes + rng.uniform(-jitter, jitter, size=boxes.shape) * size
    limits = np.array([width, height], dtype=np.float64)
    lo = np.clip(boxes[:, :2], 0.0, limits - 1.0)
    hi = np.clip(np.maximum(boxes[:, 2:], lo + 1.0), 1.0, limits)
    return np.concatenate([lo, hi], axis=1)


def _empty_example(image_id: int, image_size: int, max_rois: int, mask_size: int) -> dict[str, np.ndarray]:
    return {
        "image": np.zeros((image_size, image_size, 3), dtype=np.uint8),
        "rois": np.zeros((max_rois, 4), dtype=np.float32),
        "roi_valid": np.zeros((max_rois,), dtype=bool),
        "targets": np.zeros((max_rois, mask_size, mask_size), dtype=np.uint8),
        "image_ok": np.asarray(False),
        "image_id": np.asarray(image_id, dtype=np.int64),
    }


def make_roi_example(
    entry: tuple[PersonImage, tuple[int, ...]],
    *,
    image_size: int,
    max_rois: int,
    mask_size: int = 56,
    rng: np.random.Generator | None = None,
    jitter: float = 0.1,
    flip: bool = True,
) -> dict[str, np.ndarray]:
    """Fixed-shape numpy example for one source entry; rng None means validation (no augmentation).

    A bad image does not raise: it is logged and comes back with image_ok False and no valid ROI.
    """
    image, person_ids = entry
    if len(person_ids) > max_rois:
        raise ValueError(f"entry has {len(person_ids)} persons but max_rois is {max_rois}")
    example = _empty_example(image.image_id, image_size, max_rois, mask_size)
    try:
        pixels = read_rgb_sized(image.path, image.height, image.width)
    except BadImage as err:
        logger.warning("skipping image %s (id %d): %s", err.path, image.image_id, err.reason)
        return example
    person_masks, crowd_mask = instance_masks(image)
    boxes = np.array([image.persons[i]["bbox"] for i in person_ids], dtype=np.float64).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    if rng is not None and jitter > 0:
        boxes = jitter_boxes(boxes, rng, jitter, image.height, image.width)
    targets = roi_targets(person_masks, crowd_mask, person_ids, boxes, mask_size)
    if rng is not None and flip and rng.random() < 0.5:
        # Mirroring the targets equals sampling flipped masks with the flipped boxes, bin for bin.
        pixels = pixels[:, ::-1]
        boxes = np.stack([image.width - boxes[:, 2], boxes[:, 1], image.width - boxes[:, 0], boxes[:, 3]], axis=1)
        targets = targets[:, :, ::-1]
    example["image"], scale = resize_letterbox(np.ascontiguousarray(pixels), image_size)
    count = len(person_ids)
    example["rois"][:count] = boxes * scale
    example["roi_valid"][:count] = True
    example["targets"][:count] = targets
    example["image_ok"] = np.asarray(True)
    return example


# ----------------------------------------------------------------- road scenes (label values through a lut)


def read_label(path: str | os.PathLike, lut: np.ndarray) -> np.ndarray:
    """A label map as class indices uint8 [H, W]: values outside the classes become ignore
    (roads.scan_labels has already refused them unless asked to ignore them)."""
    return np.where(lut < 0, IGNORE, lut).astype(np.uint8)[read_mask(path)]


def make_train_example(pair: SegPair, rng: np.random.Generator, *, lut: np.ndarray, crop: tuple[int, int],
                       base_height: int = 0, scale: tuple[float, float] = (0.5, 2.0),
                       flip: bool = True) -> dict[str, np.ndarray]:
    """{image uint8 [h, w, 3], mask uint8 [h, w], pixel_mask bool [h, w], image_ok bool}, (h, w) = crop.

    The image is resized (bilinear; the label nearest, never interpolated) to base_height times
    a random factor from `scale` (base_height 0: the original height), cropped at random (padded
    with 0 and ignore when smaller; pixel_mask False there) and flipped with probability 0.5.
    """
    read = _read_pair(pair, lut)
    if read is None:
        return _unusable(crop, IGNORE, pixel_mask=np.zeros(crop, bool))
    image, label = read
    base_factor = base_height / label.shape[0] if base_height else 1.0
    image, label, valid = random_scale_crop_flip(image, label, rng, crop, scale, flip, IGNORE, base_factor)
    return {"image": image, "mask": label, "pixel_mask": valid, "image_ok": np.asarray(True)}


def make_eval_example(pair: SegPair, *, lut: np.ndarray, size: tuple[int, int],
                      full_size: tuple[int, int]) -> dict[str, np.ndarray]:
    """{image uint8 [h, w, 3] and mask uint8 [h, w] resized to size = (h, w); mask_full uint8
    [H, W] the label at its original size in the top-left of a full_size canvas of ignore;
    orig_size int32 [2]; image_ok bool}. Metrics at full resolution compare predictions resized
    to orig_size with mask_full."""
    read = _read_pair(pair, lut)
    if read is not None and (read[1].shape[0] > full_size[0] or read[1].shape[1] > full_size[1]):
        logger.warning("skipping %s: label %s larger than the evaluation canvas %s", pair.id, read[1].shape, full_size)
        read = None
    if read is None:
        return _unusable(size, IGNORE, mask_full=np.full(full_size, IGNORE, np.uint8), orig_size=np.zeros(2, np.int32))
    image, label = read
    height, width = label.shape
    full = np.full(full_size, IGNORE, np.uint8)
    full[:height, :width] = label
    if (height, width) != tuple(size):
        image = np.asarray(Image.fromarray(image).resize(size[::-1], Image.Resampling.BILINEAR))
        label = np.asarray(Image.fromarray(label).resize(size[::-1], Image.Resampling.NEAREST))
    return {"image": np.ascontiguousarray(image), "mask": np.ascontiguousarray(label), "mask_full": full,
            "orig_size": np.asarray([height, width], np.int32), "image_ok": np.asarray(True)}
