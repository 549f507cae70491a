"""Reading images robustly as RGB uint8 and letterboxing them."""
from __future__ import annotations

import os

import numpy as np
from PIL import Image, ImageOps

# 16-bit and 32-bit integer greyscale modes; their values span 0..65535.
_WIDE_GREY_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
# Reason prefix of SizeMismatch, also a skip-report reason of the loaders.
SIZE_MISMATCH = "size_mismatch"


class BadImage(Exception):
    """An image that cannot be used: missing, unreadable, truncated or of the wrong size."""

    def __init__(self, path: str | os.PathLike, reason: str):
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = os.fspath(path)
        self.reason = reason


class SizeMismatch(BadImage):
    """An image whose decoded size differs from the size its annotation (or mask) has."""


def _to_rgb(img: Image.Image) -> np.ndarray:
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
    if not os.path.isfile(path):
        raise BadImage(path, "file not found")
    try:
        with Image.open(path) as img:
            # A full decode now, so a truncated file fails here and not half-way into training.
            img.load()
            if exif_transpose:
                img = ImageOps.exif_transpose(img)
            pixels = _to_rgb(img)
    # PIL reports corrupt files through many exception types (OSError, ValueError, SyntaxError, ...).
    except Exception as err:  # noqa: BLE001
        raise BadImage(path, f"cannot decode ({type(err).__name__}: {err})") from err
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


def letterbox_size(height: int, width: int, size: int) -> tuple[int, int, float]:
    """(content height, content width, scale) of an image letterboxed into size x size."""
    scale = size / max(height, width)
    return min(size, max(1, round(height * scale))), min(size, max(1, round(width * scale))), scale


def resize_letterbox(
    image: np.ndarray, size: int, *, fill: int = 0, resample: Image.Resampling = Image.Resampling.BILINEAR
) -> tuple[np.ndarray, float]:
    """Resize the long side to `size` and pad bottom/right with `fill` to size x size.

    Works for HxWxC images and HxW label maps (pass NEAREST so no new label appears).
    Returns the padded array and the scale applied to pixel coordinates.
    """
    height, width = image.shape[:2]
    new_h, new_w, scale = letterbox_size(height, width, size)
    if (new_h, new_w) != (height, width):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), resample))
    out = np.full((size, size, *image.shape[2:]), fill, dtype=image.dtype)
    out[:new_h, :new_w] = image
    return out, scale
