"""Synthetic road scenes in the IDD layout (level-3 label PNGs), for the road-scene demo.

Drives (subdirectories) of uneven size, each with its own light, hold scenes of sky, buildings
and trees on the horizon, a road between sidewalks, cars, autorickshaws and people; each class
has its own colours and texture. A few odd files exercise the loader's skips: an unreadable
image, an image without its label, a label of another size and a label that is all ignore.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image

from segjax.data.demo import cached_demo, demo_lock, person_parts, random_colour, rasterise
from segjax.data.prepare import split_pool, write_lists
from segjax.data.roads import DEFAULT_SUFFIXES, IDD_LEVEL3, IGNORE, RoadLayout, load_road_data
from segjax.data.subset import write_selection

# Bump when the generated content changes, so cached copies are rewritten.
ROADS_DEMO_VERSION = 1
IMAGE_SUFFIX, LABEL_SUFFIX = DEFAULT_SUFFIXES["cityscapes"]
# Drives of uneven size, as IDD's are: split -> [(drive, images)].
DRIVES = {"train": [("0001", 16), ("0002", 12), ("0003", 8), ("0004", 5), ("0005", 3)],
          "val": [("0101", 8), ("0102", 6)]}
ROAD, SIDEWALK, PERSON, AUTORICKSHAW, CAR, BUILDING, VEGETATION, SKY = (
    IDD_LEVEL3.names.index(n) for n in
    ("road", "sidewalk", "person", "autorickshaw", "car", "building", "vegetation", "sky"))
DEMO_CLASSES = (ROAD, SIDEWALK, PERSON, AUTORICKSHAW, CAR, BUILDING, VEGETATION, SKY)
# Odd train files: (drive, stem, what is wrong).
# The demo's own split (its pool is small; the tools' default 85.5/4.5/10 would validate on 3 images)
# and ranked subset size.
DEMO_FRACTIONS = (0.7, 0.3, 0.0)
DEMO_SUBSET = 32
ODD_FILES = [("0001", "900001", "unreadable_image"), ("0002", "900002", "missing_label"),
             ("0003", "900003", "size_mismatch"), ("0004", "900004", "all_ignore")]


def _noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    return rng.normal(0.0, sigma, size=(*shape, 1))


def _paint(pixels: np.ndarray, label: np.ndarray, where: np.ndarray, colour: np.ndarray, cls: int) -> None:
    pixels[where] = colour[where] if colour.ndim == 3 else colour
    label[where] = cls


def _box(height: int, width: int, top: float, bottom: float, left: float, right: float) -> np.ndarray:
    ys, xs = np.mgrid[:height, :width]
    return (ys >= top) & (ys < bottom) & (xs >= left) & (xs < right)


def _vehicle(rng: np.random.Generator, height: int, width: int, bottom: float, scale: float, cx: float,
             auto: bool) -> tuple[np.ndarray, np.ndarray]:
    """Mask and colours of a car (saturated body, dark windows) or an autorickshaw (yellow body,
    black canopy), `scale` pixels tall."""
    w = scale * (1.1 if auto else 1.9)
    body = _box(height, width, bottom - 0.6 * scale, bottom - 0.12 * scale, cx - w / 2, cx + w / 2)
    top = _box(height, width, bottom - scale, bottom - 0.55 * scale, cx - 0.4 * w, cx + 0.4 * w)
    wheels = np.zeros((height, width), bool)
    ys, xs = np.mgrid[:height, :width]
    for dx in ((-0.3, 0.3) if not auto else (-0.35, 0.0, 0.35)):
        wheels |= (xs - (cx + dx * w)) ** 2 + (ys - (bottom - 0.12 * scale)) ** 2 <= (0.13 * scale) ** 2
    colours = np.zeros((height, width, 3), np.float32)
    if auto:
        colours[body] = random_colour(rng, rng.uniform(0.13, 0.17))  # autorickshaw yellow
        colours[top] = np.array([25.0, 45.0, 25.0]) * rng.uniform(0.8, 1.2)
    else:
        hue = rng.choice([0.0, 0.6, 0.7, 0.95])  # red, blue, violet, crimson cars
        colours[body] = random_colour(rng, hue + rng.uniform(-0.02, 0.02))
        colours[top] = colours[body].max(axis=0) * 0.25 + np.array([40.0, 50.0, 60.0])  # tinted glass
    colours[wheels] = 20.0
    return body | top | wheels, colours


def render_road_scene(rng: np.random.Generator, height: int, width: int, light: float) -> tuple[np.ndarray, np.ndarray]:
    """uint8 pixels [H, W, 3] and IDD level-3 label uint8 [H, W] of one scene."""
    pixels = np.zeros((height, width, 3), np.float32)
    label = np.full((height, width), IGNORE, np.uint8)
    ys, xs = np.mgrid[:height, :width].astype(np.float32)
    horizon = rng.uniform(0.38, 0.5) * height
    # Sky: a blue gradient, lighter towards the horizon.
    sky = np.array([90.0, 150.0, 225.0]) + (ys / horizon)[..., None] * np.array([70.0, 55.0, 20.0])
    _paint(pixels, label, ys < horizon, sky + _noise(rng, (height, width), 4.0), SKY)
    # Horizon band: buildings (windows in a grid) and trees (leafy noise) side by side.
    x = 0.0
    while x < width:
        seg_w = rng.uniform(0.12, 0.3) * width
        top = horizon - rng.uniform(0.15, 0.35) * height
        where = (xs >= x) & (xs < x + seg_w) & (ys < horizon + 2)
        if rng.random() < 0.5:
            wall = random_colour(rng, rng.uniform(0.55, 0.65)) * 0.25 + 85.0  # cool grey, unlike the warm pavement
            windows = ((ys.astype(int) % 8) < 4) & ((xs.astype(int) % 8) < 4)
            colour = wall * (1.0 - 0.45 * windows[..., None]) + _noise(rng, (height, width), 5.0)
            _paint(pixels, label, where & (ys >= top), colour, BUILDING)
        else:
            crown = top + 6.0 * np.sin((xs - x) / rng.uniform(3.0, 6.0)) ** 2
            colour = random_colour(rng, rng.uniform(0.25, 0.33)) * 0.55 + _noise(rng, (height, width), 22.0)
            _paint(pixels, label, where & (ys >= crown), colour, VEGETATION)
        x += seg_w
    # Ground: the road between two edges that meet at a vanishing point, sidewalks outside it.
    vx = rng.uniform(0.35, 0.65) * width
    depth = np.clip((ys - horizon) / (height - horizon), 0.0, None)
    left, right = vx - depth * rng.uniform(0.6, 0.9) * width, vx + depth * rng.uniform(0.6, 0.9) * width
    ground = ys >= horizon
    road = ground & (xs >= left) & (xs < right)
    tiles = ((ys.astype(int) % 6) == 0) | ((xs.astype(int) % 6) == 0)
    pavement = random_colour(rng, rng.uniform(0.02, 0.08)) * 0.35 + 120.0
    _paint(pixels, label, ground & ~road, pavement * (1.0 - 0.3 * tiles[..., None]) +
           _noise(rng, (height, width), 6.0), SIDEWALK)
    asphalt = rng.uniform(55.0, 80.0) + _noise(rng, (height, width), 7.0) + np.zeros(3)
    dashes = (np.abs(xs - vx) < 0.5 + 1.5 * depth) & ((ys.astype(int) // 5) % 2 == 0)
    asphalt[dashes] = 225.0
    _paint(pixels, label, road, asphalt, ROAD)
    # Vehicles on the road and people on the sidewalks, far ones first.
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        bottom = rng.uniform(horizon + 0.15 * (height - horizon), height)
        d = (bottom - horizon) / (height - horizon)
        objects.append(("vehicle", bottom, vx + rng.uniform(-0.45, 0.45) * d * width, d))
    for _ in range(int(rng.integers(1, 3))):
        bottom = rng.uniform(horizon + 0.2 * (height - horizon), height)
        d = (bottom - horizon) / (height - horizon)
        side = rng.choice([-1.0, 1.0])
        objects.append(("person", bottom, vx + side * rng.uniform(0.95, 1.3) * 0.75 * d * width, d))
    for kind, bottom, cx, d in sorted(objects, key=lambda o: o[1]):
        scale = 10.0 + 45.0 * d
        if kind == "vehicle":
            auto = rng.random() < 0.4
            mask, colours = _vehicle(rng, height, width, bottom, scale, cx, auto)
            _paint(pixels, label, mask, colours + _noise(rng, (height, width), 5.0), AUTORICKSHAW if auto else CAR)
        else:
            person_h = 1.5 * scale
            mask = rasterise(person_parts(cx, bottom - person_h, person_h, 0.45 * person_h, 0.0), height, width)
            clothes = random_colour(rng, rng.random()) * 0.8 + _noise(rng, (height, width), 6.0)
            head = ys < bottom - 0.82 * person_h
            colours = np.where(head[..., None], np.array([200.0, 150.0, 120.0]), clothes)
            _paint(pixels, label, mask, colours, PERSON)
    return np.clip(pixels * light, 0, 255).astype(np.uint8), label


def _paths(root: Path, split: str, drive: str, stem: str) -> tuple[Path, Path]:
    return (root / "leftImg8bit" / split / drive / f"{stem}{IMAGE_SUFFIX}",
            root / "gtFine" / split / drive / f"{stem}{LABEL_SUFFIX}")


def write_road_demo(root: str | os.PathLike, *, size: tuple[int, int] = (256, 128), seed: int = 0) -> Path:
    """Write (or reuse) the synthetic IDD-layout road scenes under root; size is (width, height).

    leftImg8bit/{train,val}/{drive}/{stem}_leftImg8bit.png with
    gtFine/{train,val}/{drive}/{stem}_gtFine_labellevel3Ids.png for the drives of DRIVES (one
    drive in two has an ego-vehicle hood at the bottom, labelled ignore), plus the ODD_FILES in
    train. Returns root.
    """
    root = Path(root)
    width, height = size
    planned = [(split, drive, f"{i:06d}") for split, drives in DRIVES.items() for drive, count in drives
               for i in range(count)]

    def write() -> None:
        for top in ("leftImg8bit", "gtFine"):
            for stale in (root / top).rglob("*.png") if (root / top).is_dir() else ():
                stale.unlink()  # files of an earlier demo version must not stay in the pool
        drive_index = {drive: k for k, (drive, _) in enumerate(d for drives in DRIVES.values() for d in drives)}
        for split, drive, stem in planned:
            k = drive_index[drive]
            # One generator per image: its content depends on its drive and number only.
            rng = np.random.default_rng([seed, k, int(stem)])
            light = 0.75 + 0.35 * ((k * 0.618) % 1.0)  # each drive has its own light
            pixels, label = render_road_scene(rng, height, width, light)
            if k % 2 == 1:  # the ego vehicle's hood, ignored as in Cityscapes and IDD
                hood = int(0.08 * height)
                pixels[-hood:] = 30
                label[-hood:] = IGNORE
            image_path, label_path = _paths(root, split, drive, stem)
            image_path.parent.mkdir(parents=True, exist_ok=True)
            label_path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels).save(image_path)
            Image.fromarray(label).save(label_path)
        for k, (drive, stem, problem) in enumerate(ODD_FILES):
            pixels, label = render_road_scene(np.random.default_rng([seed, 99, k]), height, width, 1.0)
            image_path, label_path = _paths(root, "train", drive, stem)
            Image.fromarray(pixels).save(image_path)
            if problem == "unreadable_image":
                image_path.write_bytes(b"\x89PNG\r\n\x1a\n not really a PNG")
            if problem == "size_mismatch":
                label = label[: height - 8]
            if problem == "all_ignore":
                label = np.full_like(label, IGNORE)
            if problem != "missing_label":
                Image.fromarray(label).save(label_path)

    expected = [p for s, d, t in planned for p in _paths(root, s, d, t)]
    cached_demo(root, "roads", ROADS_DEMO_VERSION, {"size": list(size), "seed": seed}, expected, write)
    return root


def prepare_road_demo(root: str | os.PathLike, *, fractions=DEMO_FRACTIONS, num: int = DEMO_SUBSET,
                      seed: int = 0) -> dict[str, str]:
    """The road demo run through the split and subset tools' code, as a user would run the tools:
    the demo's images (train and val folders pooled) split at `fractions` (root/splits/), the
    training split's labels read and ranked, its top `num` kept (root/subset/: subset.txt,
    scores.csv, class_frequency.png). Returns the list files {"train": subset.txt, "val": ...}."""
    with demo_lock(root):  # the lists are rewritten each time: one run at a time
        root = Path(write_road_demo(root))
        layout = RoadLayout().resolve(root)
        lists = write_lists(split_pool(layout.pool(root, "train") + layout.pool(root, "val"), fractions=fractions,
                                       seed=seed), root / "splits")
        scan = load_road_data(root, layout=layout, list_file=lists["train"], num_classes=len(IDD_LEVEL3.names))
        chosen = write_selection([pair.id for pair in scan.pairs], scan.class_pixels, root / "subset", num=num,
                                 names=IDD_LEVEL3.names, colours=IDD_LEVEL3.colours)
    return {"train": chosen["subset"], "val": lists["val"]}
