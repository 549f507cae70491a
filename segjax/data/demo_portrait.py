"""Synthetic portrait demo data in the P3M-10k and Supervisely Person folder layouts."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFilter

from segjax.data.demo import cached_demo, person_parts, random_colour, rasterise, textured_background
from segjax.data.prepare import prepare_memmaps

# Bump when the generated content changes, so cached copies are rewritten.
PORTRAIT_DEMO_VERSION = 1


def _render_portrait(rng: np.random.Generator, height: int, width: int, soft: bool) -> tuple[np.ndarray, np.ndarray]:
    """One person on a textured background: uint8 pixels and a uint8 alpha (0..255)."""
    pixels = textured_background(rng, height, width)
    person_h = rng.uniform(0.7, 0.95) * height
    shoulders = min(0.36 * person_h * rng.uniform(0.85, 1.15), 0.9 * width)
    cx = rng.uniform(shoulders / 2, width - shoulders / 2)
    top = rng.uniform(0.0, height - person_h)
    mask = rasterise(person_parts(cx, top, person_h, shoulders, rng.uniform(-0.05, 0.05) * person_h), height, width)
    shade = 1.0 + rng.normal(0.0, 0.06, size=(int(mask.sum()), 1))
    pixels[mask] = random_colour(rng, rng.random()) * shade
    alpha = Image.fromarray(mask.astype(np.uint8) * 255)
    if soft:
        # P3M masks are soft mattes: a blurred edge makes the preparation's threshold matter.
        alpha = alpha.filter(ImageFilter.GaussianBlur(1.0))
    return np.clip(pixels, 0, 255).astype(np.uint8), np.asarray(alpha)


def _plan(root: Path, num_train: int, num_val: int) -> list[tuple[Path, Path, str, int, bool]]:
    """(image dir, mask dir, file prefix, count, soft masks) of every folder the demo writes."""
    train, val, sup = root / "P3M-10k" / "train", root / "P3M-10k" / "validation" / "P3M-500-P", root / "supervisely"
    num_supervisely = num_train // 4
    return [
        (train / "blurred_image", train / "mask", "p_train", num_train - num_supervisely, True),
        (val / "blurred_image", val / "mask", "p_val", num_val, True),
        (sup / "ds1" / "images", sup / "ds1" / "masks", "sup", num_supervisely, False),
    ]


def write_portrait_demo(
    root: str | os.PathLike,
    *,
    num_train: int = 24,
    num_val: int = 8,
    size: tuple[int, int] = (96, 128),
    seed: int = 0,
) -> dict[str, str]:
    """Write (or reuse) synthetic portraits as P3M-10k + Supervisely folders; size is (width, height).

    num_train counts both training sources (a quarter goes to Supervisely); images cycle through
    (width, height), (height, width) and a square, so letterboxing is exercised. Returns
    {"p3m_root", "supervisely_root"}.
    """
    root = Path(root)
    paths = {"p3m_root": str(root / "P3M-10k"), "supervisely_root": str(root / "supervisely")}
    plan = _plan(root, num_train, num_val)
    expected = [d / f"{prefix}_{i:04d}{ext}" for image_dir, mask_dir, prefix, count, _ in plan for i in range(count)
                for d, ext in ((image_dir, ".jpg"), (mask_dir, ".png"))]

    def write() -> None:
        width, height = size
        shapes = [(width, height), (height, width), (min(size), min(size))]
        for source, (image_dir, mask_dir, prefix, count, soft) in enumerate(plan):
            for folder in (image_dir, mask_dir):
                folder.mkdir(parents=True, exist_ok=True)
                # Files of an earlier, larger demo would otherwise be prepared too.
                for stale in folder.glob(f"{prefix}_*"):
                    stale.unlink()
            for i in range(count):
                # One generator per image: its content does not depend on the split sizes.
                rng = np.random.default_rng([seed, source, i])
                w, h = shapes[i % len(shapes)]
                pixels, alpha = _render_portrait(rng, h, w, soft)
                Image.fromarray(pixels).save(image_dir / f"{prefix}_{i:04d}.jpg", quality=92)
                Image.fromarray(alpha).save(mask_dir / f"{prefix}_{i:04d}.png")

    params = {"num_train": num_train, "num_val": num_val, "size": list(size), "seed": seed}
    cached_demo(root, "portrait", PORTRAIT_DEMO_VERSION, params, expected, write)
    return paths


def prepare_portrait_demo(root: str | os.PathLike, out_dir: str | os.PathLike, size: int = 64) -> dict[str, str]:
    """Write the demo folders under root and prepare them into memmaps under out_dir.

    Returns {"train_images", "train_masks", "val_images", "val_masks"} (memmap paths).
    """
    roots = write_portrait_demo(root)
    summary = prepare_memmaps(roots["p3m_root"], out_dir, supervisely_root=roots["supervisely_root"], size=size)
    return {f"{split}_{kind}": info[kind] for split, info in summary["splits"].items() for kind in ("images", "masks")}
