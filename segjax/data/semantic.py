"""Semantic segmentation data: VOC and image/mask folder sources, class-index masks, joint transforms."""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

from segjax.data.errors import DataError, SkipReport
from segjax.data.images import SIZE_MISMATCH, BadImage, read_rgb_sized, resize_letterbox

logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
MASK_SUFFIX = ".png"

# Skip reasons of the loaders (SIZE_MISMATCH too: image and mask sizes differ).
IMAGE_MISSING = "image_missing"  # listed id without its JPEG
MASK_MISSING = "mask_missing"  # listed id without its mask PNG
UNREADABLE = "unreadable"  # image or mask header cannot be read
IMAGE_WITHOUT_MASK = "image_without_mask"  # folder image with no mask of the same stem
MASK_WITHOUT_IMAGE = "mask_without_image"  # folder mask with no image of the same stem
DUPLICATE_STEM = "duplicate_stem"  # two images (e.g. x.jpg and x.png) for one stem: ambiguous

# Mask modes whose pixel values are the class indices.
_INDEX_MODES = ("P", "L", "1")


@dataclasses.dataclass(frozen=True)
class SegPair:
    """An image and its class-index mask."""

    image_path: str
    mask_path: str
    id: str


class SegmentationSource:
    """grain random-access source: one SegPair per record."""

    def __init__(self, pairs: Sequence[SegPair]):
        self.pairs = list(pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> SegPair:
        return self.pairs[index]

    def __repr__(self) -> str:
        return f"SegmentationSource({len(self.pairs)} pairs)"


def voc_palette() -> np.ndarray:
    """The standard PASCAL VOC colour map uint8 [256, 3] (index 255, the void border, is 224,224,192).

    Bits 0, 1, 2 of the index set the top bit of R, G, B; bits 3, 4, 5 the next bit; and so on.
    """
    index = np.arange(256)
    palette = np.zeros((256, 3), dtype=np.int64)
    for level in range(3):  # an 8-bit index has 3 groups of (up to) 3 bits
        for channel in range(3):
            palette[:, channel] |= ((index >> (3 * level + channel)) & 1) << (7 - level)
    return palette.astype(np.uint8)


def save_mask(path: str | os.PathLike, mask: np.ndarray) -> None:
    """Write a uint8 class-index mask as a palette PNG in VOC colours; read_mask reads the indices back."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8))  # mode L; putpalette makes it P
    image.putpalette(voc_palette().tobytes())
    image.save(path)


def read_mask(path: str | os.PathLike) -> np.ndarray:
    """Read a class-index mask as uint8 [H, W]; 255 (ignore) is kept as is.

    Palette (P) PNGs give their palette indices, not their colours; L gives its values and 1 gives
    0/1. Colour (RGB) and 16-bit masks raise BadImage rather than being guessed: a colour code is
    dataset specific (CamVid's road colour is also a VOC palette entry), so convert those to
    indices first.
    """
    if not os.path.isfile(path):
        raise BadImage(path, "file not found")
    try:
        with Image.open(path) as img:
            img.load()
            mode = img.mode
            values = np.asarray(img) if mode in _INDEX_MODES else None
    # PIL reports corrupt files through many exception types (OSError, ValueError, SyntaxError, ...).
    except Exception as err:  # noqa: BLE001
        raise BadImage(path, f"cannot decode ({type(err).__name__}: {err})") from err
    if values is None:
        raise BadImage(
            path,
            f"mask mode {mode} is not a class-index mask: expected a palette (P) or 8-bit greyscale (L) PNG "
            "whose pixel values are class indices; convert colour-coded or 16-bit masks to that first",
        )
    return np.ascontiguousarray(values, dtype=np.uint8)


def voc_root(path: str | os.PathLike) -> Path:
    """The VOC2012 folder (with JPEGImages/ and SegmentationClass/) at, or under, `path`.

    Accepts that folder itself, VOCdevkit/, or the folder holding VOCdevkit/VOC2012.
    """
    path = Path(path)
    for candidate in (path, path / "VOC2012", path / "VOCdevkit" / "VOC2012"):
        if (candidate / "JPEGImages").is_dir() and (candidate / "SegmentationClass").is_dir():
            return candidate
    raise DataError(
        f"{path} is not a PASCAL VOC folder: expected JPEGImages/ and SegmentationClass/ in it, "
        "in VOC2012/ or in VOCdevkit/VOC2012/ under it"
    )


def load_voc_split(root: str | os.PathLike, split: str, *, report: SkipReport | None = None) -> list[SegPair]:
    """Pairs of ImageSets/Segmentation/<split>.txt: JPEGImages/<id>.jpg + SegmentationClass/<id>.png.

    Ids with a missing or unreadable file, or an image and mask of different sizes, are skipped,
    counted in `report` (a fresh one if None) and logged; DataError if no pair is left.
    """
    base = voc_root(root)
    list_file = base / "ImageSets" / "Segmentation" / f"{split}.txt"
    if not list_file.is_file():
        available = sorted(p.stem for p in list_file.parent.glob("*.txt"))
        raise DataError(f"split list {list_file} not found (available splits: {available})")
    report = SkipReport() if report is None else report
    pairs = []
    for line in list_file.read_text().splitlines():
        if not line.strip():
            continue
        # Other VOC lists carry a second column (a flag); the id is always the first.
        pair_id = line.split()[0]
        pair = checked_pair(base / "JPEGImages" / f"{pair_id}.jpg", base / "SegmentationClass" / f"{pair_id}.png",
                             pair_id, report)
        if pair is not None:
            pairs.append(pair)
    return _finish(pairs, report, f"VOC {split} ({list_file})")


def load_folder_pairs(
    img_dir: str | os.PathLike, mask_dir: str | os.PathLike, *, mask_suffix: str = "",
    report: SkipReport | None = None,
) -> list[SegPair]:
    """Pair images with `.png` masks by their path relative to the folder, without the extension.

    Sub-folders are searched too. A mask's name may end in `mask_suffix` before `.png` (CamVid:
    `images/X.png` with `labels/X_P.png` is mask_suffix="_P"). Unmatched images and masks,
    ambiguous stems, unreadable files and size mismatches are skipped, counted in `report` (a
    fresh one if None) and logged; DataError if no pair is left.
    """
    report = SkipReport() if report is None else report
    images = _files_by_stem(img_dir, IMAGE_SUFFIXES, "", report)
    masks = _files_by_stem(mask_dir, (MASK_SUFFIX,), mask_suffix, report)
    for stem in sorted(images.keys() - masks.keys()):
        report.add(IMAGE_WITHOUT_MASK, stem)
    for stem in sorted(masks.keys() - images.keys()):
        report.add(MASK_WITHOUT_IMAGE, stem)
    pairs = []
    for stem in sorted(images.keys() & masks.keys()):
        pair = checked_pair(images[stem], masks[stem], stem, report)
        if pair is not None:
            pairs.append(pair)
    return _finish(pairs, report, f"folders {img_dir} + {mask_dir}")


def _files_by_stem(folder: str | os.PathLike, suffixes: tuple[str, ...], name_suffix: str,
                   report: SkipReport) -> dict[str, Path]:
    """Files with one of `suffixes`, keyed by relative path without extension and `name_suffix`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder}")
    found: dict[str, Path] = {}
    duplicates = set()
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() not in suffixes or not path.is_file():
            continue
        stem = path.relative_to(folder).with_suffix("").as_posix()
        if name_suffix:
            if not stem.endswith(name_suffix):
                continue
            stem = stem[: -len(name_suffix)]
        if stem in found:
            duplicates.add(stem)
        found[stem] = path
    for stem in sorted(duplicates):
        report.add(DUPLICATE_STEM, stem)
        del found[stem]
    return found


def _header_sizes(path: Path) -> set[tuple[int, int]]:
    """(width, height) as stored and, for EXIF-rotated images, as shown (read_rgb_sized accepts both)."""
    with Image.open(path) as img:
        width, height = img.size
        rotated = img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    return {(width, height), (height, width)} if rotated else {(width, height)}


def checked_pair(image_path: Path, mask_path: Path, pair_id: str, report: SkipReport) -> SegPair | None:
    """The pair if both files exist and their headers agree on the size, else None (counted)."""
    if not image_path.is_file():
        report.add(IMAGE_MISSING, pair_id)
        return None
    if not mask_path.is_file():
        report.add(MASK_MISSING, pair_id)
        return None
    # Headers only: decoding every image here would make loading as slow as an epoch.
    try:
        image_sizes = _header_sizes(image_path)
        with Image.open(mask_path) as mask:
            mask_size = mask.size
    except Exception:  # noqa: BLE001  (PIL raises many types for corrupt headers)
        report.add(UNREADABLE, pair_id)
        return None
    if mask_size not in image_sizes:
        report.add(SIZE_MISMATCH, pair_id)
        return None
    # Absolute, not resolved: a prepared images/ folder of symlinks keeps its own paths.
    return SegPair(str(image_path.absolute()), str(mask_path.absolute()), pair_id)


def _finish(pairs: list[SegPair], report: SkipReport, what: str) -> list[SegPair]:
    report.log(logger, what)
    if not pairs:
        raise DataError(f"no usable image/mask pairs in {what}; skipped: {report.as_dict()}")
    logger.info("%s: %d pairs", what, len(pairs))
    return pairs


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
    try:
        mask = read_mask(pair.mask_path)
        image = read_rgb_sized(pair.image_path, *mask.shape)
    except BadImage as err:
        logger.warning("skipping %s (pair %s): %s", err.path, pair.id, err.reason)
        return {
            "image": np.zeros((size, size, 3), dtype=np.uint8),
            "mask": np.full((size, size), ignore_index, dtype=np.uint8),
            "image_ok": np.asarray(False),
        }
    if rng is None:
        image, _ = resize_letterbox(image, size)
        mask, _ = resize_letterbox(mask, size, fill=ignore_index, resample=Image.Resampling.NEAREST)
    else:
        image, mask, _ = random_scale_crop_flip(image, mask, rng, (size, size), scale, flip, ignore_index)
    return {"image": image, "mask": mask, "image_ok": np.asarray(True)}
