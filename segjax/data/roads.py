"""Road-scene semantic segmentation data: Cityscapes-style and folder layouts, class sets and label
scans (the transforms are in transforms.py, the preparation in prepare.py).

Layouts (image paths relative to ROOT identify every record, in list files too):
- "cityscapes" (IDD, IDD Lite, Cityscapes): ROOT/leftImg8bit/{split}/{subdir}/{stem}{image_suffix}
  with ROOT/gtFine/{split}/{subdir}/{stem}{label_suffix};
- "folders": ROOT/images/{subdir}/{stem}.{jpg,png,...} with ROOT/labels/{subdir}/{stem}{label_suffix},
  one pool of images and split lists ROOT/splits/{split}.txt (tools/split_dataset.py writes them).
Label PNGs hold class indices 0..K-1 and 255 (ignore); a Cityscapes `_gtFine_labelIds.png` (ids
0-33) is mapped to the 19 train ids on the fly with label_ids="cityscapes".
"""
from __future__ import annotations

import argparse
import colorsys
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm import tqdm

from segjax.data.errors import MASK_UNREADABLE, DataError, SkipReport
from segjax.data.files import IMAGE_SUFFIXES, BadImage, decode
from segjax.data.voc import SegPair, checked_pair, read_mask

logger = logging.getLogger(__name__)

IGNORE = 255
# Skip reason beyond the shared ones (image_missing, mask_missing, *_unreadable, size_mismatch).
ALL_IGNORE = "all_ignore"  # label map without a single class pixel: nothing to learn from

LABEL_IDS = ("train", "cityscapes")
UNKNOWN_LABELS = ("error", "ignore")


# ---------------------------------------------------------------- class sets


@dataclasses.dataclass(frozen=True)
class ClassSet:
    """Class names by index and their RGB colours (for overlays)."""

    names: tuple[str, ...]
    colours: tuple[tuple[int, int, int], ...]

    def __post_init__(self):
        if not self.names or len(self.names) > IGNORE:
            raise DataError(f"a class set needs 1..{IGNORE} classes, got {len(self.names)}")
        if len(self.colours) != len(self.names):
            raise DataError(f"{len(self.names)} class names but {len(self.colours)} colours")

    def palette(self) -> np.ndarray:
        """uint8 [256, 3]: the class colours, black for ignore and unused values."""
        palette = np.zeros((256, 3), dtype=np.uint8)
        palette[: len(self.colours)] = self.colours
        return palette


def spread_colours(count: int) -> tuple[tuple[int, int, int], ...]:
    """Distinct colours for classes that come without any: hues by the golden ratio."""
    return tuple(tuple(int(255 * v) for v in colorsys.hsv_to_rgb((0.61803398875 * i) % 1.0, 0.75, 0.9))
                 for i in range(count))


def _class_set(entries: Sequence[tuple[str, tuple[int, int, int]]]) -> ClassSet:
    return ClassSet(tuple(name for name, _ in entries), tuple(colour for _, colour in entries))


# IDD level-3 ids (the 26 evaluated classes) with the IDD/AutoNUE colours.
IDD_LEVEL3 = _class_set([
    ("road", (128, 64, 128)), ("drivable fallback", (81, 0, 81)), ("sidewalk", (244, 35, 232)),
    ("non-drivable fallback", (152, 251, 152)), ("person", (220, 20, 60)), ("rider", (255, 0, 0)),
    ("motorcycle", (0, 0, 230)), ("bicycle", (119, 11, 32)), ("autorickshaw", (255, 204, 54)),
    ("car", (0, 0, 142)), ("truck", (0, 0, 70)), ("bus", (0, 60, 100)), ("vehicle fallback", (136, 143, 153)),
    ("curb", (220, 190, 40)), ("wall", (102, 102, 156)), ("fence", (190, 153, 153)),
    ("guard rail", (180, 165, 180)), ("billboard", (174, 64, 67)), ("traffic sign", (220, 220, 0)),
    ("traffic light", (250, 170, 30)), ("pole", (153, 153, 153)), ("obs-str-bar-fallback", (169, 187, 214)),
    ("building", (70, 70, 70)), ("bridge", (150, 100, 100)), ("vegetation", (107, 142, 35)),
    ("sky", (70, 130, 180)),
])
# IDD level-1 ids (IDD Lite's 7 classes).
IDD_LEVEL1 = _class_set([
    ("drivable", (128, 64, 128)), ("non-drivable", (244, 35, 232)), ("living things", (220, 20, 60)),
    ("vehicles", (0, 0, 142)), ("roadside objects", (220, 220, 0)), ("far objects", (70, 70, 70)),
    ("sky", (70, 130, 180)),
])
# Cityscapes train ids 0..18.
CITYSCAPES = _class_set([
    ("road", (128, 64, 128)), ("sidewalk", (244, 35, 232)), ("building", (70, 70, 70)), ("wall", (102, 102, 156)),
    ("fence", (190, 153, 153)), ("pole", (153, 153, 153)), ("traffic light", (250, 170, 30)),
    ("traffic sign", (220, 220, 0)), ("vegetation", (107, 142, 35)), ("terrain", (152, 251, 152)),
    ("sky", (70, 130, 180)), ("person", (220, 20, 60)), ("rider", (255, 0, 0)), ("car", (0, 0, 142)),
    ("truck", (0, 0, 70)), ("bus", (0, 60, 100)), ("train", (0, 80, 100)), ("motorcycle", (0, 0, 230)),
    ("bicycle", (119, 11, 32)),
])
CLASS_SETS = {"idd_level3": IDD_LEVEL3, "idd_level1": IDD_LEVEL1, "cityscapes": CITYSCAPES}

# Cityscapes labelIds (0..33) -> train ids; every other id of 0..33 is ignored in training.
CITYSCAPES_TRAIN_ID = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11, 25: 12,
                       26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
CITYSCAPES_NUM_LABEL_IDS = 34


def load_class_set(spec: str) -> ClassSet:
    """A built-in class set by name, or a classes.json file.

    The file holds a list of names, {"names": [...], "colours": [[r, g, b], ...]} (colours
    optional), or {"0": name, "1": ...} as tools/prepare_coco_semantic.py writes it.
    """
    if spec in CLASS_SETS:
        return CLASS_SETS[spec]
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"class set {spec!r} is neither a built-in ({', '.join(CLASS_SETS)}) nor a classes.json file")
    try:
        data = json.loads(path.read_text())
        colours = None
        if isinstance(data, dict) and "names" in data:
            names, colours = data["names"], data.get("colours", data.get("colors"))
        elif isinstance(data, dict):
            names = [data[str(i)] for i in range(len(data))]
        else:
            names = data
        names = tuple(str(n) for n in names)
        colours = spread_colours(len(names)) if colours is None else tuple(tuple(int(v) for v in c) for c in colours)
        if any(len(c) != 3 or not all(0 <= v <= 255 for v in c) for c in colours):
            raise ValueError("colours must be [r, g, b] triples of 0..255")
        return ClassSet(names, colours)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise DataError(f"cannot read classes from {path}: expected a list of names, {{'names': [...], "
                        f"'colours': [[r, g, b], ...]}} or {{'0': name, ...}} ({err})") from err


def label_lut(num_classes: int, label_ids: str = "train") -> np.ndarray:
    """int16 [256]: stored label value -> class index, IGNORE, or -1 for a value that is neither.

    label_ids="train": values 0..num_classes-1 are the classes; "cityscapes": Cityscapes labelIds
    0..33 go to their train ids (num_classes must be 19), the rest of 0..33 to ignore.
    """
    lut = np.full(256, -1, dtype=np.int16)
    lut[IGNORE] = IGNORE
    if label_ids == "train":
        lut[:num_classes] = np.arange(num_classes)
    elif label_ids == "cityscapes":
        if num_classes != len(CITYSCAPES.names):
            raise DataError(f"label_ids='cityscapes' maps to the 19 Cityscapes train ids, but the class set has "
                            f"{num_classes} classes")
        lut[:CITYSCAPES_NUM_LABEL_IDS] = IGNORE
        for label_id, train_id in CITYSCAPES_TRAIN_ID.items():
            lut[label_id] = train_id
    else:
        raise DataError(f"label_ids must be one of {LABEL_IDS}, got {label_ids!r}")
    return lut


# ---------------------------------------------------------------- layouts and record lists


# Suffixes of each layout kind when none are given: IDD level-3 labels; folders: any image, `.png` labels.
DEFAULT_SUFFIXES = {"cityscapes": ("_leftImg8bit.png", "_gtFine_labellevel3Ids.png"), "folders": ("", ".png")}


@dataclasses.dataclass(frozen=True)
class RoadLayout:
    """Where images and labels are; "" suffixes mean the kind's DEFAULT_SUFFIXES.

    kind "auto" picks "cityscapes" when ROOT/leftImg8bit exists, else "folders" when ROOT/images
    does. A folder-layout image_suffix of "" accepts every common image extension.
    """

    kind: Literal["auto", "cityscapes", "folders"] = "auto"
    image_suffix: str = ""
    label_suffix: str = ""

    def resolve(self, root: str | os.PathLike) -> RoadLayout:
        """This layout with its kind detected (if "auto") and its default suffixes filled in."""
        kind = self.kind
        if kind == "auto":
            if (Path(root) / "leftImg8bit").is_dir():
                kind = "cityscapes"
            elif (Path(root) / "images").is_dir():
                kind = "folders"
            else:
                raise DataError(f"{root} holds neither leftImg8bit/ + gtFine/ (Cityscapes-style layout) nor "
                                "images/ + labels/ (folder layout)")
        if kind not in DEFAULT_SUFFIXES:
            raise DataError(f"layout must be auto, cityscapes or folders, got {kind!r}")
        image_suffix, label_suffix = DEFAULT_SUFFIXES[kind]
        return RoadLayout(kind, self.image_suffix or image_suffix, self.label_suffix or label_suffix)

    def label_of(self, image: str) -> str:
        """The label path (relative to ROOT) of an image path relative to ROOT."""
        parts = Path(image).parts
        top = {"cityscapes": ("leftImg8bit", "gtFine"), "folders": ("images", "labels")}[self.kind]
        if len(parts) < 2 or parts[0] != top[0]:
            raise DataError(f"image path {image!r} is not under {top[0]}/ of the {self.kind} layout")
        name = parts[-1]
        if self.kind == "cityscapes":
            if not name.endswith(self.image_suffix):
                raise DataError(f"image {image!r} does not end in {self.image_suffix!r} (the image suffix)")
            stem = name[: -len(self.image_suffix)]
        else:
            stem = Path(name).stem
        return Path(top[1], *parts[1:-1], stem + self.label_suffix).as_posix()

    def _is_image(self, name: str) -> bool:
        if self.image_suffix:
            return name.endswith(self.image_suffix)
        return Path(name).suffix.lower() in IMAGE_SUFFIXES

    def pool(self, root: str | os.PathLike, split: str = "") -> list[str]:
        """Image paths relative to ROOT, sorted: leftImg8bit/{split}/ of the Cityscapes layout, or the
        folder layout's split list (the whole images/ pool when split is "")."""
        root = Path(root)
        if self.kind == "cityscapes":
            if not split:
                raise DataError("the Cityscapes-style layout needs a split (a folder of leftImg8bit/) or a list file")
            folder = root / "leftImg8bit" / split
            if not folder.is_dir():
                available = sorted(p.name for p in (root / "leftImg8bit").glob("*") if p.is_dir())
                raise DataError(f"split folder {folder} not found (available: {available})")
        else:
            if split:
                return read_list(root, root / "splits" / f"{split}.txt")
            folder = root / "images"
            if not folder.is_dir():
                raise DataError(f"folder not found: {folder}")
        found = [p.relative_to(root).as_posix() for p in folder.rglob("*") if self._is_image(p.name) and p.is_file()]
        if not found:
            raise DataError(f"no images ending in {self.image_suffix or IMAGE_SUFFIXES} under {folder}")
        return sorted(found)


def read_list(root: str | os.PathLike, list_file: str | os.PathLike) -> list[str]:
    """Image paths relative to ROOT, one a line, in file order (blank lines and # comments skipped)."""
    list_file = Path(list_file)
    if not list_file.is_file():
        hint = " (tools/split_dataset.py writes split lists)" if list_file.parent.name == "splits" else ""
        raise DataError(f"list file {list_file} not found{hint}")
    lines = [line.strip() for line in list_file.read_text().splitlines()]
    entries = [line for line in lines if line and not line.startswith("#")]
    for entry in entries:
        if Path(entry).is_absolute() or ".." in Path(entry).parts:
            raise DataError(f"{list_file}: {entry!r} is not a path relative to the data root {root}")
    if len(set(entries)) != len(entries):
        raise DataError(f"{list_file}: an image is listed twice")
    return entries


def list_pairs(root: str | os.PathLike, layout: RoadLayout, images: Sequence[str],
               report: SkipReport) -> list[SegPair]:
    """Pairs of the given image paths (relative to ROOT) and their labels, in the given order.

    Missing images or labels, unreadable headers and size mismatches are counted in `report`.
    """
    root = Path(root)
    pairs = []
    for image in images:
        pair = checked_pair(root / image, root / layout.label_of(image), image, report)
        if pair is not None:
            pairs.append(pair)
    return pairs


# ---------------------------------------------------------------- label scans


@dataclasses.dataclass
class LabelScan:
    """The usable pairs with what their labels hold: class pixel counts [N, K] and (height, width) [N, 2]."""

    pairs: list[SegPair]
    class_pixels: np.ndarray
    sizes: np.ndarray
    # Labels whose values outside the classes became ignore: id -> those values.
    unknown: dict[str, list[int]] = dataclasses.field(default_factory=dict)


def label_histogram(path: str | os.PathLike) -> tuple[np.ndarray, tuple[int, int]]:
    """Counts of the 256 stored label values and the label's (height, width); BadImage if unusable."""
    # PIL counts in C (palette indices for P): far faster than numpy on full-HD maps.
    found = decode(path, lambda img: (np.asarray(img.histogram(), np.int64), (img.height, img.width))
                   if img.mode in ("L", "P") else None)
    if found is not None:
        return found
    values = read_mask(path)  # other modes: read_mask accepts 1 and explains the rest
    return np.bincount(values.ravel(), minlength=256), values.shape


def _histogram_or_error(path: str) -> tuple[np.ndarray, tuple[int, int]] | BadImage:
    try:
        return label_histogram(path)
    except BadImage as err:
        return err


def scan_labels(pairs: Sequence[SegPair], num_classes: int, *, label_ids: str = "train", unknown: str = "error",
                report: SkipReport | None = None, workers: int = 0, progress: bool = False) -> LabelScan:
    """Read every label (in threads; PIL decodes without the GIL) and keep the usable pairs.

    Unreadable labels and labels with no class pixel (all ignore) are skipped and counted in
    `report`. A value that is neither a class nor 255 raises DataError naming the file and value,
    or, with unknown="ignore", counts as ignore (LabelScan.unknown lists those files).
    """
    if unknown not in UNKNOWN_LABELS:
        raise DataError(f"unknown must be one of {UNKNOWN_LABELS}, got {unknown!r}")
    report = SkipReport() if report is None else report
    lut = label_lut(num_classes, label_ids)
    known = (lut >= 0) & (lut != IGNORE)
    workers = workers or min(16, os.cpu_count() or 1)
    kept, counts, sizes, unknown_found = [], [], [], {}
    pool = ThreadPoolExecutor(workers)
    try:
        results = pool.map(_histogram_or_error, [p.mask_path for p in pairs])
        for pair, result in tqdm(zip(pairs, results), total=len(pairs), desc="reading labels", unit="label",
                                 disable=not progress, dynamic_ncols=True):
            if isinstance(result, BadImage):
                logger.warning("skipping %s: %s", result.path, result.reason)
                report.add(MASK_UNREADABLE, pair.id)
                continue
            hist, size = result
            bad = np.flatnonzero((hist > 0) & (lut < 0))
            if bad.size and unknown == "error":
                raise DataError(
                    f"{pair.mask_path}: label value {int(bad[0])} ({int(hist[bad[0]])} pixels) is neither a class "
                    f"(0..{num_classes - 1}) nor {IGNORE} (ignore); fix the label, choose the right class set or "
                    "label ids, or count such values as ignore (--unknown_labels ignore)")
            if bad.size:
                unknown_found[pair.id] = bad.tolist()
            per_class = np.bincount(lut[known], weights=hist[known], minlength=num_classes).astype(np.int64)
            if not per_class.any():
                report.add(ALL_IGNORE, pair.id)
                continue
            kept.append(pair)
            counts.append(per_class)
            sizes.append(size)
    finally:
        pool.shutdown(cancel_futures=True)  # after an error, the labels not yet read stay unread
    if unknown_found:
        logger.warning("%d label maps hold values outside the classes, counted as ignore, e.g. %s",
                       len(unknown_found), dict(list(unknown_found.items())[:3]))
    return LabelScan(kept, np.asarray(counts, dtype=np.int64).reshape(-1, num_classes),
                     np.asarray(sizes, dtype=np.int64).reshape(-1, 2), unknown_found)


def load_road_data(root: str | os.PathLike, *, layout: RoadLayout | None = None, split: str = "",
                   list_file: str | os.PathLike = "", num_classes: int, label_ids: str = "train",
                   unknown: str = "error", report: SkipReport | None = None, workers: int = 0,
                   progress: bool = False) -> LabelScan:
    """The usable records of a split (or of a list file, in its order), labels read and checked.

    Every skip (image_missing, mask_missing, unreadable, size_mismatch, all_ignore) is counted in
    `report` and logged; DataError if nothing is left.
    """
    layout = (layout or RoadLayout()).resolve(root)
    report = SkipReport() if report is None else report
    images = read_list(root, list_file) if list_file else layout.pool(root, split)
    what = f"{root} ({list_file or split or 'all images'})"
    scan = scan_labels(list_pairs(root, layout, images, report), num_classes, label_ids=label_ids, unknown=unknown,
                       report=report, workers=workers, progress=progress)
    report.log(logger, what)
    if not scan.pairs:
        raise DataError(f"no usable image/label pairs in {what}; skipped: {report.as_dict()}")
    logger.info("%s: %d image/label pairs", what, len(scan.pairs))
    return scan


# ---------------------------------------------------------------- options shared by the road-scene tools


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """--data_root and the layout, suffix and class-set options of tools/{split_dataset,select_subset}.py."""
    parser.add_argument("--data_root", required=True, help="ROOT holding leftImg8bit/ + gtFine/, or images/ + labels/")
    parser.add_argument("--layout", choices=("auto", "cityscapes", "folders"), default="auto",
                        help="auto: cityscapes if ROOT/leftImg8bit exists, else folders")
    parser.add_argument("--image_suffix", default="",
                        help=f"default {DEFAULT_SUFFIXES['cityscapes'][0]!r} (IDD Lite: '_image.jpg'); "
                             "folders: any image extension")
    parser.add_argument("--label_suffix", default="",
                        help=f"default {DEFAULT_SUFFIXES['cityscapes'][1]!r}; Cityscapes '_gtFine_labelTrainIds.png'"
                             " (or '_gtFine_labelIds.png' with --label_ids cityscapes); IDD Lite '_label.png'; "
                             "folders '.png'")
    parser.add_argument("--classes", default="idd_level3",
                        help=f"class set: {', '.join(CLASS_SETS)} or a classes.json file")
    parser.add_argument("--label_ids", choices=LABEL_IDS, default="train",
                        help="cityscapes: labels hold Cityscapes labelIds 0-33, mapped to the 19 train ids")
    parser.add_argument("--unknown_labels", choices=UNKNOWN_LABELS, default="error",
                        help="a label value that is neither a class nor 255: stop with an error, or count it as ignore")


def three_numbers(sum_to_one: bool = False) -> Callable[[str], tuple[float, float, float]]:
    """An argparse type: three non-negative comma-separated numbers (summing to 1 if asked)."""

    def parse(text: str) -> tuple[float, float, float]:
        try:
            values = tuple(float(v) for v in text.split(","))
        except ValueError:
            values = ()
        if len(values) != 3 or min(values) < 0 or (sum_to_one and abs(sum(values) - 1.0) > 1e-6):
            raise argparse.ArgumentTypeError(
                f"expected three non-negative numbers{' summing to 1' if sum_to_one else ''}, got {text!r}")
        return values

    return parse


def layout_from_arguments(args: argparse.Namespace) -> RoadLayout:
    return RoadLayout(args.layout, args.image_suffix, args.label_suffix).resolve(args.data_root)
