"""Small file helpers every format shares: robust image decoding, pairing files by stem, atomic writes."""
from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import ExifTags, Image, ImageOps

from segjax.data.errors import (
    DUPLICATE_STEM,
    IMAGE_WITHOUT_MASK,
    MASK_WITHOUT_IMAGE,
    SIZE_MISMATCH,
    DataError,
    SkipReport,
)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")
# 16-bit and 32-bit integer greyscale modes; their values span 0..65535.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


class BadImage(Exception):
    """An image that cannot be used: missing, unreadable, truncated or of the wrong size."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


class SizeMismatch(BadImage):
    """An image whose decoded size differs from the size its annotation (or mask) has."""


def decode[T](path: str | os.PathLike, convert: Callable[[Image.Image], T]) -> T:
    """`convert` applied to the fully decoded image at `path`; BadImage if that is not possible."""
    if not os.path.isfile(path):
        raise BadImage(path, "file not found")
    try:
        with Image.open(path) as img:
            # A full decode now, so a truncated file fails here and not half-way into training.
            img.load()
            return convert(img)
    # PIL reports corrupt files through many exception types (OSError, ValueError, SyntaxError, ...).
    except Exception as err:  # noqa: BLE001
        raise BadImage(path, f"cannot decode ({type(err).__name__}: {err})") from err


def to_rgb(img: Image.Image) -> np.ndarray:
    """Convert any PIL mode to HxWx3 uint8, dropping alpha rather than compositing it."""
    if img.mode in _WIDE_GREY_MODES:
        # PIL's own I;16 -> L conversion clips at 255 (a white image); rescale the full range.
        grey = np.asarray(img).astype(np.float64)
        grey = np.clip(np.rint(grey / 257.0), 0, 255).astype(np.uint8)
        return np.repeat(grey[:, :, None], 3, axis=2)
    if img.mode == "P":
        # Via RGBA so a palette transparency entry is understood, then the alpha is dropped.
        img = img.convert("RGBA")
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8)


def read_rgb(path: str | os.PathLike, exif_transpose: bool = True) -> np.ndarray:
    """Read an image fully as HxWx3 uint8 RGB; raise BadImage if that is not possible."""
    pixels = decode(path, lambda img: to_rgb(ImageOps.exif_transpose(img) if exif_transpose else img))
    if pixels.ndim != 3 or pixels.shape[0] == 0 or pixels.shape[1] == 0:
        raise BadImage(path, f"empty image of shape {pixels.shape}")
    return np.ascontiguousarray(pixels)


def read_rgb_sized(path: str | os.PathLike, height: int, width: int) -> np.ndarray:
    """read_rgb at an expected size, falling back to the stored (non-EXIF) orientation.

    Annotations are often made on the stored pixels by tools that ignore the EXIF rotation.
    Raises SizeMismatch if neither orientation has the expected size.
    """
    pixels = read_rgb(path)
    if pixels.shape[:2] != (height, width):
        raw = read_rgb(path, exif_transpose=False)
        if raw.shape[:2] != (height, width):
            raise SizeMismatch(
                path,
                f"{SIZE_MISMATCH}: decoded {pixels.shape[1]}x{pixels.shape[0]}, annotation says {width}x{height}",
            )
        pixels = raw
    return pixels


def header_sizes(path: Path) -> set[tuple[int, int]]:
    """(width, height) as stored and, for EXIF-rotated images, as shown (read_rgb_sized accepts both)."""
    with Image.open(path) as img:
        width, height = img.size
        rotated = img.getexif().get(ExifTags.Base.Orientation, 1) in (5, 6, 7, 8)
    return {(width, height), (height, width)} if rotated else {(width, height)}


def files_by_stem(folder: str | os.PathLike, suffixes: tuple[str, ...], *, recursive: bool = False,
                  name_suffix: str = "") -> dict[str, list[Path]]:
    """Files with one of `suffixes` (hidden ones aside), keyed by relative path without extension and `name_suffix`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"folder not found: {folder}")
    found: dict[str, list[Path]] = {}
    for path in sorted(folder.rglob("*") if recursive else folder.iterdir()):
        if path.suffix.lower() not in suffixes or path.name.startswith(".") or not path.is_file():
            continue
        stem = path.relative_to(folder).with_suffix("").as_posix()
        if name_suffix:
            if not stem.endswith(name_suffix):
                continue
            stem = stem[: -len(name_suffix)]
        found.setdefault(stem, []).append(path)
    return found


def pair_by_stem(images: dict[str, list[Path]], masks: dict[str, list[Path]],
                 report: SkipReport) -> list[tuple[str, Path, Path]]:
    """(stem, image, mask) for each stem with one image and one mask, by stem; the rest goes to `report`."""
    pairs = []
    for stem in sorted(images.keys() | masks.keys()):
        image, mask = images.get(stem, []), masks.get(stem, [])
        if len(image) > 1 or len(mask) > 1:
            report.add(DUPLICATE_STEM, stem)
        elif not mask:
            report.add(IMAGE_WITHOUT_MASK, stem)
        elif not image:
            report.add(MASK_WITHOUT_IMAGE, stem)
        else:
            pairs.append((stem, image[0], mask[0]))
    return pairs


def write_atomic(path: str | os.PathLike, data: str | bytes | Callable[[BinaryIO], object]) -> None:
    """Write `data` (or let it write itself) so that a reader sees the whole file or none.

    A hidden temp file beside `path` is written, synced and renamed over it; a failure Python sees
    removes the temp file.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    # os.open with 0o666, not mkstemp: the file gets the umask's permissions, not 0600.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            if callable(data):
                data(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
