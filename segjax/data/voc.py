"""PASCAL VOC and VOC-style image/mask folders: class names, palette, class-index mask PNGs, pair sources."""
from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from segjax.data.errors import (
    IMAGE_MISSING,
    IMAGE_UNREADABLE,
    MASK_MISSING,
    MASK_UNREADABLE,
    SIZE_MISMATCH,
    DataError,
    SkipReport,
)
from segjax.data.files import IMAGE_SUFFIXES, BadImage, decode, files_by_stem, header_sizes, pair_by_stem

logger = logging.getLogger(__name__)

VOC_CLASSES = (
    "background", "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
MASK_SUFFIX = ".png"

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
    mode, values = decode(path, lambda img: (img.mode, np.asarray(img) if img.mode in _INDEX_MODES else None))
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
    images = files_by_stem(img_dir, IMAGE_SUFFIXES, recursive=True)
    masks = files_by_stem(mask_dir, (MASK_SUFFIX,), recursive=True, name_suffix=mask_suffix)
    pairs = [pair for stem, image, mask in pair_by_stem(images, masks, report)
             if (pair := checked_pair(image, mask, stem, report)) is not None]
    return _finish(pairs, report, f"folders {img_dir} + {mask_dir}")


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
        image_sizes = header_sizes(image_path)
    except Exception:  # noqa: BLE001  (PIL raises many types for corrupt headers)
        report.add(IMAGE_UNREADABLE, pair_id)
        return None
    try:
        with Image.open(mask_path) as mask:
            mask_size = mask.size
    except Exception:  # noqa: BLE001
        report.add(MASK_UNREADABLE, pair_id)
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
