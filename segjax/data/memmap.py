"""Portrait segmentation data (P3M-10k + Supervisely Person) as fixed-size memory-mapped arrays.

Preparation (`segjax.data.prepare.prepare_memmaps`) decodes every image/mask pair once, resizes
it to size x size and streams it, record by record, into one image memmap and one mask memmap per split. Each memmap
`X.mmap` has a JSON sidecar `X.mmap.json`:

    format, version, kind ("images" | "masks"), split, count, shape, dtype, layout, size, resize,
    mask_threshold, source_files (this file's inputs, in record order), records

`records[i]` = {"orig_size": [H, W], "scale": [sy, sx], "pad": [top, bottom, left, right]}: the
content of record i fills rows top..size-bottom and columns left..size-right, so a prediction is
mapped back to the original image by cropping that box and resizing it to orig_size. Letterbox
scales the long side to `size` (sy == sx) and pads bottom/right with 0; stretch has no padding.

Layouts: uint8 (the default) stores images NHWC in 0..255 and masks NHW in {0, 1}, named
`{split}_{size}_u8_{images,masks}.mmap`. float16 reproduces the original PyTorch pipeline's files
`{split}_{size}_fp16_{images,masks}.mmap`: its writer and its `P3MMemmapDataset` use
np.memmap(float16, shape=(N, 3, H, W)) for images in [0, 1] and (N, 1, H, W) for masks in {0, 1},
so ours are NCHW and N1HW too and either side reads the other's files.

Masks are binarised: grey value >= mask_threshold -> 1. 16-bit masks are first scaled to 8 bits
(v / 257), RGB(A) masks use their brightest colour channel, and palette (mode P) masks are read
as indices with every index > 0 foreground (the threshold does not apply to them).

`MemmapSource` reads these files, or sidecar-less ones from the original pipeline given their
dtype/layout/size, and always yields {"image": uint8 [S, S, 3], "mask": uint8 [S, S]}.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from segjax.data.errors import DataError

SIDECAR_FORMAT = "segjax-memmap"
SIDECAR_VERSION = 1
# Storage per dtype: (file-name tag, image layout, mask layout).
STORAGE = {"uint8": ("u8", "NHWC", "NHW"), "float16": ("fp16", "NCHW", "N1HW")}
_IMAGE_LAYOUTS = ("NHWC", "NCHW")
_READ_DTYPES = ("uint8", "float16", "float32")


def storage_names(split: str, size: int, dtype: str) -> tuple[str, str]:
    tag = STORAGE[dtype][0]
    return f"{split}_{size}_{tag}_images.mmap", f"{split}_{size}_{tag}_masks.mmap"


def read_sidecar(path: str | os.PathLike) -> dict:
    """The JSON sidecar of a memmap; DataError if it is unreadable or not ours."""
    try:
        meta = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise DataError(f"cannot read memmap sidecar {path}: {err}") from err
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise DataError(f"{path} is not a {SIDECAR_FORMAT} sidecar")
    return meta


def _file_bytes(path: str) -> int:
    if not os.path.isfile(path):
        raise DataError(f"memmap file not found: {path}")
    return os.path.getsize(path)


def _check_bytes(path: str, count: int, record_shape: tuple[int, ...], dtype: np.dtype, layout: str) -> None:
    expected = count * int(np.prod(record_shape)) * dtype.itemsize
    actual = _file_bytes(path)
    if actual != expected:
        raise DataError(
            f"{path}: expected {expected} bytes ({count} records of {layout} {record_shape} {dtype.name}), "
            f"found {actual} bytes; the declared count/size/dtype is wrong or the file is incomplete"
        )


class MemmapSource:
    """grain random-access source over an image memmap and a mask memmap.

    Reads `<image_path>.json` (and `<mask_path>.json`) when present, or `meta` (a sidecar dict or
    path). Memmaps without a sidecar, e.g. from the original PyTorch pipeline, need dtype
    ("uint8" | "float16" | "float32"), layout ("NHWC" | "NCHW") and size; count defaults to what
    the file size implies. Masks share the images' dtype; float masks are cut at 0.5 (some of the
    original pipeline's were resized bilinearly). Arguments given beside a sidecar must agree with
    it. Files whose byte size does not match are refused (DataError).
    The memmaps are opened lazily in the process that reads and are never pickled.
    """

    def __init__(
        self,
        image_path: str | os.PathLike,
        mask_path: str | os.PathLike,
        *,
        meta: dict | str | os.PathLike | None = None,
        dtype: str | None = None,
        layout: str | None = None,
        count: int | None = None,
        size: int | None = None,
    ):
        self.image_path, self.mask_path = os.fspath(image_path), os.fspath(mask_path)
        if meta is None and os.path.isfile(f"{self.image_path}.json"):
            meta = f"{self.image_path}.json"
        if isinstance(meta, (str, os.PathLike)):
            meta = read_sidecar(meta)
        declared = {"dtype": dtype, "layout": layout, "count": count, "size": size}
        if meta is not None:
            for key, value in declared.items():
                if value is not None and value != meta.get(key):
                    raise DataError(f"{self.image_path}: {key}={value!r} given, but its sidecar says {meta.get(key)!r}")
            dtype, layout, count, size = (meta.get(k) for k in declared)
        elif dtype is None or layout is None or size is None:
            raise DataError(f"{self.image_path} has no sidecar ({self.image_path}.json): pass dtype, layout and size")
        if dtype not in _READ_DTYPES or layout not in _IMAGE_LAYOUTS or not isinstance(size, int) or size < 1:
            raise DataError(
                f"{self.image_path}: unsupported dtype={dtype!r} / layout={layout!r} / size={size!r} "
                f"(dtype one of {list(_READ_DTYPES)}, layout one of {list(_IMAGE_LAYOUTS)}, size >= 1)"
            )
        self.size = size
        self.layout = layout
        self.dtype = np.dtype(dtype)
        image_record = (size, size, 3) if layout == "NHWC" else (3, size, size)
        if count is None:
            count = self._implied_count(self.image_path, image_record, self.dtype)
        self.count = int(count)
        if os.path.isfile(f"{self.mask_path}.json"):
            mask_meta = read_sidecar(f"{self.mask_path}.json")
            found = tuple(mask_meta.get(k) for k in ("count", "size", "dtype"))
            if found != (self.count, size, self.dtype.name):
                raise DataError(
                    f"{self.mask_path}: its sidecar says count, size, dtype = {found}, "
                    f"the images are {(self.count, size, self.dtype.name)}"
                )
        # Every mask layout (NHW, N1HW) holds one value per pixel in the same order.
        _check_bytes(self.image_path, self.count, image_record, self.dtype, layout)
        _check_bytes(self.mask_path, self.count, (size, size), self.dtype, "mask")
        self._arrays: tuple[np.memmap, np.memmap] | None = None

    def _implied_count(self, path: str, record: tuple[int, ...], dtype: np.dtype) -> int:
        record_bytes = int(np.prod(record)) * dtype.itemsize
        actual = _file_bytes(path)
        if actual == 0 or actual % record_bytes:
            raise DataError(
                f"{path}: {actual} bytes is not a whole, non-zero number of {self.layout} {record} "
                f"{dtype.name} records ({record_bytes} bytes each); check dtype, layout and size"
            )
        return actual // record_bytes

    def __len__(self) -> int:
        return self.count

    def __getstate__(self) -> dict:
        # Only paths and shapes travel to grain workers; each opens its own mapping on first read.
        return {**self.__dict__, "_arrays": None}

    def _open(self) -> tuple[np.memmap, np.memmap]:
        if self._arrays is None:
            record = (self.size, self.size, 3) if self.layout == "NHWC" else (3, self.size, self.size)
            # One attribute assigned at once, so reader threads never see half of the pair.
            self._arrays = (
                np.memmap(self.image_path, dtype=self.dtype, mode="r", shape=(self.count, *record)),
                np.memmap(self.mask_path, dtype=self.dtype, mode="r", shape=(self.count, self.size, self.size)),
            )
        return self._arrays

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        index = int(index)
        if not 0 <= index < self.count:
            raise IndexError(f"record {index} out of range for {self.count} records")
        images, masks = self._open()
        image = np.array(images[index])  # copies just this record out of the mapping
        mask = np.array(masks[index])
        if self.layout == "NCHW":
            image = image.transpose(1, 2, 0)
        if self.dtype != np.uint8:
            image = np.clip(np.rint(image.astype(np.float32) * 255.0), 0, 255).astype(np.uint8)
            mask = (mask >= 0.5).astype(np.uint8)
        return {"image": np.ascontiguousarray(image), "mask": mask}
