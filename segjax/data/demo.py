"""Small deterministic demo data sets in real on-disk formats, written into a cache directory.

Every demo world goes through `cached_demo`: it is rewritten only when its parameters (or its
version) change or a file is missing. Shared drawing helpers live here too; this module holds the
COCO person, VOC and COCO semantic worlds, `demo_portrait` the portrait one.
"""
from __future__ import annotations

import colorsys
import contextlib
import fcntl
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils
from scipy import ndimage

from segjax.data.files import write_atomic
from segjax.data.prepare import prepare_coco_semantic
from segjax.data.voc import VOC_CLASSES, save_mask

logger = logging.getLogger(__name__)

# (rng, height, width, with_crowd) -> (uint8 pixels, COCO annotations without ids)
Renderer = Callable[[np.random.Generator, int, int, bool], tuple[np.ndarray, list[dict]]]

# Bump when the generated content changes, so cached copies are rewritten.
COCO_PERSON_DEMO_VERSION = 1
_CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 2, "name": "bicycle"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "sports", "id": 37, "name": "sports ball"},
]
_SPORTS_BALL = 37
_PERSON_INFO = {"description": "segjax synthetic COCO person demo", "version": str(COCO_PERSON_DEMO_VERSION)}
# COCO numbers crowd annotations far above the instance ids (beyond int32); so do we.
_CROWD_ID_BASE = 900_000_000_000
# Train and val get disjoint image ids that do not start at 0 or 1.
_IMAGE_ID_BASE = {"train2017": 1_000, "val2017": 500_000}


def default_demo_root() -> Path:
    """Cache directory for demo data: $SEGJAX_DEMO_ROOT or ~/.cache/segjax/demo."""
    return Path(os.environ.get("SEGJAX_DEMO_ROOT", Path.home() / ".cache" / "segjax" / "demo"))


_held_locks: set[Path] = set()  # demo locks this process holds (a demo may write another inside its lock)


@contextlib.contextmanager
def demo_lock(root: str | os.PathLike):
    """An exclusive lock on the demo directory `root` (a lock file in it), held by one process at a
    time: two runs started together write the demo once, and the second reuses it; re-entered by
    its holder freely."""
    root = Path(root).absolute()
    path = root / ".segjax_demo.lock"
    if path in _held_locks:
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        _held_locks.add(path)
        try:
            yield
        finally:
            _held_locks.discard(path)


def demo_marker(path: str | os.PathLike) -> Path | None:
    """The demo marker (`segjax_<name>_demo.json`) of the demo directory holding `path`, if any."""
    for folder in [Path(path).absolute(), *Path(path).absolute().parents]:
        markers = sorted(folder.glob("segjax_*_demo.json")) if folder.is_dir() else []
        if markers:
            return markers[0]
    return None


def cached_demo(root: Path, name: str, version: int, params: dict, expected: Iterable[str | Path],
                write: Callable[[], object]) -> None:
    """Run `write()` unless `root` already holds the `name` demo of this version and params.

    The marker `root/segjax_<name>_demo.json` records version and params and is written last, so
    it means everything before it is complete; `expected` files must exist as well. The check and
    the writing hold `demo_lock(root)`: concurrent runs cannot write over each other.
    """
    marker = root / f"segjax_{name}_demo.json"
    params = {"version": version, **params}
    with demo_lock(root):
        try:
            complete = json.loads(marker.read_text()) == params and all(Path(p).exists() for p in expected)
        except (OSError, ValueError):
            complete = False
        if complete:
            logger.info("reusing %s demo data in %s", name, root)
            return
        logger.info("writing %s demo data %s into %s", name, params, root)
        marker.unlink(missing_ok=True)
        write()
        write_atomic(marker, json.dumps(params))


def _ellipse(cx: float, cy: float, rx: float, ry: float, points: int = 20) -> list[float]:
    angles = np.linspace(0.0, 2.0 * np.pi, points, endpoint=False)
    return np.stack([cx + rx * np.cos(angles), cy + ry * np.sin(angles)], axis=1).ravel().tolist()


def person_parts(cx: float, top: float, height: float, shoulders: float, lean: float) -> list[list[float]]:
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


def rasterise(parts: list[list[float]], height: int, width: int) -> np.ndarray:
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(parts, height, width))).astype(bool)


def textured_background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Muted low-frequency colour field plus pixel noise: texture the model must ignore."""
    coarse = rng.uniform(70, 180, size=(4, 5, 1)) + rng.uniform(-25, 25, size=(4, 5, 3))
    coarse = coarse.astype(np.uint8)
    field = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BILINEAR), dtype=np.float32)
    return field + rng.normal(0.0, 14.0, size=(height, width, 3))


def random_colour(rng: np.random.Generator, hue: float) -> np.ndarray:
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
            parts = person_parts(cx, top, person_h, shoulders, rng.uniform(-0.05, 0.05) * person_h)
            mask = rasterise(parts, height, width)
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
    pixels = textured_background(rng, height, width)
    # Layers back to front: (category, parts, iscrowd, colour).
    layers: list[tuple[int, list[list[float]], int, np.ndarray]] = []
    if with_crowd:
        layers.append((1, _crowd_parts(rng, height, width), 1, random_colour(rng, rng.random()) * 0.6))
    if rng.random() < 0.3:
        radius = rng.uniform(6, 11)
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(height * 0.6, height - radius)
        ball = _ellipse(cx, cy, radius, radius, 24)
        layers.append((_SPORTS_BALL, [ball], 0, np.array([240.0, 240.0, 240.0])))
    people = _place_people(rng, height, width)
    hue = rng.random()
    for k, parts in enumerate(people):
        # Hues spread around the colour wheel keep neighbours distinct.
        layers.append((1, parts, 0, random_colour(rng, hue + k / len(people) + rng.uniform(-0.05, 0.05))))

    masks = [rasterise(parts, height, width) for _, parts, _, _ in layers]
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
        annotations.append(_annotation(rng, category, parts, visible, iscrowd, visible.sum() == masks[k].sum()))
    return np.clip(pixels, 0, 255).astype(np.uint8), annotations


def _annotation(rng: np.random.Generator, category: int, parts: list[list[float]], mask: np.ndarray, iscrowd: int,
                polygon_ok: bool) -> dict:
    """A COCO annotation (without ids) of `mask`: uncompressed RLE for a crowd, else mostly the
    polygon `parts` when they describe the mask exactly (polygon_ok), sometimes compressed RLE."""
    height, width = mask.shape
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    if iscrowd:
        # Real COCO crowd regions use uncompressed RLE (counts as a list).
        segmentation: Any = _uncompressed_rle(mask)
    elif polygon_ok and rng.random() < 0.8:
        segmentation = [[round(v, 2) for v in part] for part in parts]
    else:
        segmentation = {"size": [height, width], "counts": rle["counts"].decode("ascii")}
    return {
        "segmentation": segmentation,
        "area": float(mask.sum()),
        "iscrowd": iscrowd,
        "bbox": [round(float(v), 2) for v in mask_utils.toBbox(rle)],
        "category_id": category,
    }


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """Column-major run lengths starting with a background run, as in COCO crowd annotations.

    Written here because pycocotools only encodes the compressed (string) form.
    """
    flat = mask.T.ravel().astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts = [0] + counts
    return {"size": list(mask.shape), "counts": counts}


def _write_split(root: Path, split: str, count: int, size: tuple[int, int], seed: int, render: Renderer,
                 info: dict, categories: list[dict]) -> None:
    """Images of `render` and their COCO instances file in the COCO 2017 layout."""
    width, height = size
    image_dir = root / split
    image_dir.mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    next_ann_id = 1
    for i in range(count):
        image_id = _IMAGE_ID_BASE[split] + i
        # One generator per image: the content of image i does not depend on the split size.
        rng = np.random.default_rng([seed, _IMAGE_ID_BASE[split], i])
        pixels, anns = render(rng, height, width, i % 5 == 2)
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
        "info": info,
        "licenses": [{"id": 1, "name": "CC0 1.0", "url": "https://creativecommons.org/publicdomain/zero/1.0/"}],
        "images": images,
        "annotations": annotations,
        "categories": categories,
    }
    ann_file = root / "annotations" / f"instances_{split}.json"
    ann_file.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(ann_file, json.dumps(data))


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
    counts = {"train": num_train, "val": num_val}
    paths, files = _coco_layout(root, counts)

    def write() -> None:
        for split, count in counts.items():
            _write_split(root, f"{split}2017", count, tuple(image_size), seed, _render_image, _PERSON_INFO,
                         _CATEGORIES)

    params = {"num_train": num_train, "num_val": num_val, "image_size": list(image_size), "seed": seed}
    cached_demo(root, "coco_person", COCO_PERSON_DEMO_VERSION, params, files, write)
    return paths


def _coco_layout(root: Path, counts: dict[str, int]) -> tuple[dict[str, str], list[Path]]:
    """The COCO 2017 layout's paths {split}_ann and {split}_img_dir, and the files _write_split puts there."""
    paths, files = {}, []
    for split, count in counts.items():
        paths[f"{split}_ann"] = str(root / "annotations" / f"instances_{split}2017.json")
        paths[f"{split}_img_dir"] = str(root / f"{split}2017")
        files.append(Path(paths[f"{split}_ann"]))
        files += [root / f"{split}2017" / f"{_IMAGE_ID_BASE[f'{split}2017'] + i:012d}.jpg" for i in range(count)]
    return paths, files


# ---------------------------------------------------------------- semantic segmentation demos

VOC_DEMO_VERSION = 1
COCO_SEMANTIC_DEMO_VERSION = 1
# VOC ids read <year>_<number>; one year per split keeps them disjoint.
_VOC_YEAR = {"train": 2008, "val": 2009}
_SEMANTIC_INFO = {"description": "segjax synthetic COCO semantic demo", "version": str(COCO_SEMANTIC_DEMO_VERSION)}
# Demo object (a VOC class name) -> its COCO category, with COCO's own ids and names.
_COCO_OF_OBJECT = {"person": 1, "car": 3, "aeroplane": 5, "bottle": 44, "diningtable": 67, "tvmonitor": 72}
_SEMANTIC_CATEGORIES = [
    {"supercategory": "person", "id": 1, "name": "person"},
    {"supercategory": "vehicle", "id": 3, "name": "car"},
    {"supercategory": "vehicle", "id": 5, "name": "airplane"},
    {"supercategory": "kitchen", "id": 44, "name": "bottle"},
    {"supercategory": "furniture", "id": 67, "name": "dining table"},
    {"supercategory": "electronic", "id": 72, "name": "tv"},
]


def _outline(cx: float, cy: float, s: float, points: list[tuple[float, float]]) -> list[float]:
    """A polygon part from points given in object units (centre cx, cy; size s)."""
    return [float(v) for x, y in points for v in (cx + s * x, cy + s * y)]


def _aeroplane(cx: float, cy: float, s: float) -> list[list[float]]:
    wings = [(0.1, 0.0), (-0.15, -0.45), (-0.28, -0.45), (-0.12, 0.0), (-0.28, 0.45), (-0.15, 0.45)]
    fin = [(-0.36, -0.02), (-0.5, -0.25), (-0.5, -0.02)]
    return [_ellipse(cx, cy, 0.5 * s, 0.09 * s), _outline(cx, cy, s, wings), _outline(cx, cy, s, fin)]


def _bottle(cx: float, cy: float, s: float) -> list[list[float]]:
    body = [(-0.11, 0.45), (0.11, 0.45), (0.11, -0.1), (0.04, -0.22), (0.04, -0.45), (-0.04, -0.45),
            (-0.04, -0.22), (-0.11, -0.1)]
    return [_outline(cx, cy, s, body)]


def _car(cx: float, cy: float, s: float) -> list[list[float]]:
    body = [(-0.5, 0.15), (0.5, 0.15), (0.5, -0.05), (0.3, -0.05), (0.2, -0.22), (-0.25, -0.22), (-0.38, -0.05),
            (-0.5, -0.05)]
    wheels = [_ellipse(cx + dx * s, cy + 0.15 * s, 0.1 * s, 0.1 * s, 16) for dx in (-0.3, 0.3)]
    return [_outline(cx, cy, s, body), *wheels]


def _person(cx: float, cy: float, s: float) -> list[list[float]]:
    return person_parts(cx, cy - 0.5 * s, s, 0.36 * s, 0.0)


def _tvmonitor(cx: float, cy: float, s: float) -> list[list[float]]:
    screen = [(-0.4, -0.35), (0.4, -0.35), (0.4, 0.15), (-0.4, 0.15)]
    stand = [(-0.05, 0.15), (0.05, 0.15), (0.05, 0.3), (0.2, 0.3), (0.2, 0.36), (-0.2, 0.36), (-0.2, 0.3),
             (-0.05, 0.3)]
    return [_outline(cx, cy, s, screen), _outline(cx, cy, s, stand)]


def _diningtable(cx: float, cy: float, s: float) -> list[list[float]]:
    top = [(-0.4, -0.2), (0.4, -0.2), (0.5, 0.0), (-0.5, 0.0)]
    legs = [[(x, 0.0), (x + 0.05, 0.0), (x + 0.05, 0.3), (x, 0.3)] for x in (-0.47, 0.42)]
    return [_outline(cx, cy, s, top), *(_outline(cx, cy, s, leg) for leg in legs)]


# Demo object -> (shape, hue): a class is told apart by both.
_OBJECTS = {
    "aeroplane": (_aeroplane, 0.6),
    "bottle": (_bottle, 0.3),
    "car": (_car, 0.0),
    "person": (_person, 0.1),
    "tvmonitor": (_tvmonitor, 0.8),
    "diningtable": (_diningtable, 0.45),
}
_FREE_OBJECTS = ["aeroplane", "bottle", "car", "person", "tvmonitor"]


def _scene(rng: np.random.Generator, height: int, width: int) -> list[tuple[str, list[list[float]], np.ndarray]]:
    """(object, polygon parts, mask) of 1-4 objects, larger first: back to front.

    Sometimes a table with bottles standing on it, so small objects lie on large ones.
    """
    side = min(height, width)
    objects = []
    if rng.random() < 0.35:
        s = rng.uniform(0.6, 0.9) * side
        cx, cy = rng.uniform(0.5 * s, width - 0.5 * s), rng.uniform(0.45 * s, height - 0.32 * s)
        objects.append(("diningtable", _diningtable(cx, cy, s)))
        for _ in range(int(rng.integers(1, 3))):
            b = rng.uniform(0.25, 0.35) * s
            objects.append(("bottle", _bottle(cx + rng.uniform(-0.35, 0.35) * s, cy - 0.1 * s - 0.45 * b, b)))
    for _ in range(int(rng.integers(0 if objects else 1, 3))):
        name = str(rng.choice(_FREE_OBJECTS))
        s = rng.uniform(0.35, 0.7) * side
        cx, cy = rng.uniform(0.4 * s, width - 0.4 * s), rng.uniform(0.4 * s, height - 0.4 * s)
        objects.append((name, _OBJECTS[name][0](cx, cy, s)))
    scene = [(name, parts, rasterise(parts, height, width)) for name, parts in objects]
    # The order prepare_coco_semantic paints in, so its masks match these images.
    return sorted(scene, key=lambda item: -int(item[2].sum()))


def _paint_scene(rng: np.random.Generator, pixels: np.ndarray, scene: list) -> None:
    for name, _, mask in scene:
        colour = random_colour(rng, _OBJECTS[name][1] + rng.uniform(-0.02, 0.02))
        pixels[mask] = colour * (1.0 + rng.normal(0.0, 0.06, size=(int(mask.sum()), 1)))


def _render_voc(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixels and the VOC class-index mask of one demo image, with VOC's void band along outlines."""
    pixels = textured_background(rng, height, width)
    scene = _scene(rng, height, width)
    _paint_scene(rng, pixels, scene)
    label = np.zeros((height, width), dtype=np.uint8)
    border = np.zeros((height, width), dtype=bool)
    front = np.zeros((height, width), dtype=bool)
    for name, _, mask in reversed(scene):
        label[mask & ~front] = VOC_CLASSES.index(name)
        visible = mask & ~front
        # border_value=1: no band along the image edge, as in VOC.
        border |= ndimage.binary_dilation(visible) & ~ndimage.binary_erosion(visible, border_value=1)
        front |= mask
    label[border] = 255
    return np.clip(pixels, 0, 255).astype(np.uint8), label


def write_voc_demo(
    root: str | os.PathLike,
    *,
    num_train: int = 96,
    num_val: int = 24,
    size: tuple[int, int] = (160, 120),
    seed: int = 0,
) -> Path:
    """Write (or reuse) a synthetic PASCAL VOC 2012 segmentation layout; size is (width, height).

    JPEGImages/, SegmentationClass/ palette PNGs (255 bands along object outlines, like VOC) and
    ImageSets/Segmentation/{train,val,trainval}.txt, with a few VOC classes drawn as distinct
    shapes and colours. Returns the VOCdevkit/VOC2012 folder.
    """
    root = Path(root)
    base = root / "VOCdevkit" / "VOC2012"
    width, height = size
    ids = {
        split: [f"{_VOC_YEAR[split]}_{i:06d}" for i in range(count)]
        for split, count in (("train", num_train), ("val", num_val))
    }
    files = [base / folder / f"{i}{ext}" for split_ids in ids.values() for i in split_ids
             for folder, ext in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png"))]

    def write() -> None:
        lists = base / "ImageSets" / "Segmentation"
        for folder in (base / "JPEGImages", base / "SegmentationClass", lists):
            folder.mkdir(parents=True, exist_ok=True)
        for split, split_ids in ids.items():
            for i, image_id in enumerate(split_ids):
                # One generator per image: the content of image i does not depend on the split size.
                pixels, label = _render_voc(np.random.default_rng([seed, _VOC_YEAR[split], i]), height, width)
                Image.fromarray(pixels).save(base / "JPEGImages" / f"{image_id}.jpg", quality=92)
                save_mask(base / "SegmentationClass" / f"{image_id}.png", label)
        for name, split_ids in (("train", ids["train"]), ("val", ids["val"]), ("trainval", ids["train"] + ids["val"])):
            (lists / f"{name}.txt").write_text("".join(f"{i}\n" for i in split_ids))

    params = {"num_train": num_train, "num_val": num_val, "size": list(size), "seed": seed}
    cached_demo(root, "voc", VOC_DEMO_VERSION, params, files, write)
    return base


def _render_coco_semantic(rng: np.random.Generator, height: int, width: int,
                          with_crowd: bool) -> tuple[np.ndarray, list[dict]]:
    """A demo scene with whole-object annotations that overlap (bottles on tables, a person before
    a car), painted larger behind smaller, plus sometimes a crowd band of people behind everything."""
    pixels = textured_background(rng, height, width)
    annotations = []
    if with_crowd:
        parts = _crowd_parts(rng, height, width)
        mask = rasterise(parts, height, width)
        pixels[mask] = random_colour(rng, rng.random()) * 0.6
        annotations.append(_annotation(rng, 1, parts, mask, 1, polygon_ok=False))
    scene = _scene(rng, height, width)
    _paint_scene(rng, pixels, scene)
    annotations += [_annotation(rng, _COCO_OF_OBJECT[name], parts, mask, 0, polygon_ok=True)
                    for name, parts, mask in scene]
    return np.clip(pixels, 0, 255).astype(np.uint8), annotations


def write_coco_semantic_demo(
    root: str | os.PathLike,
    *,
    num_train: int = 96,
    num_val: int = 24,
    size: tuple[int, int] = (160, 128),
    seed: int = 0,
) -> dict[str, str]:
    """Write (or reuse) a synthetic multi-category COCO data set and its prepared semantic masks.

    The COCO 2017 layout (annotations/instances_{train,val}2017.json, {train,val}2017/*.jpg; size
    is (width, height)) goes through prepare_coco_semantic (crowd="ignore", link_images=True) into
    prepared/{train,val}/{images,masks,classes.json}. Returns those paths: {train,val}_ann,
    {train,val}_img_dir, {train,val}_images, {train,val}_masks, classes.
    """
    root = Path(root)
    prepared = root / "prepared"
    counts = {"train": num_train, "val": num_val}
    paths, files = _coco_layout(root, counts)
    for split in counts:
        paths[f"{split}_images"] = str(prepared / split / "images")
        paths[f"{split}_masks"] = str(prepared / split / "masks")
    paths["classes"] = str(prepared / "train" / "classes.json")

    def write() -> None:
        for split, count in counts.items():
            _write_split(root, f"{split}2017", count, tuple(size), seed, _render_coco_semantic, _SEMANTIC_INFO,
                         _SEMANTIC_CATEGORIES)
            # Masks of an earlier, larger run must not stay behind beside the new ones.
            shutil.rmtree(prepared / split, ignore_errors=True)
            prepare_coco_semantic(paths[f"{split}_ann"], paths[f"{split}_img_dir"], prepared / split, crowd="ignore",
                                  link_images=True, seed=seed)

    params = {"num_train": num_train, "num_val": num_val, "size": list(size), "seed": seed}
    cached_demo(root, "coco_semantic", COCO_SEMANTIC_DEMO_VERSION, params, [*files, *paths.values()], write)
    return paths
