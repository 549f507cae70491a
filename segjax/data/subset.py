"""Ranking a pool of labelled images to keep the most informative ones (tools/select_subset.py).

For image i of a pool of N, with present(i) the classes having at least `min_pixels` pixels:
CDS(i) = |present(i)|; RCS(i) = sum over c in present(i) of ln(N / n_c), n_c the number of
images where c is present; ICS(i) = the number of pool images in i's immediate subdirectory;
score = a*CDS/max CDS + b*RCS/max RCS + g*ICS/max ICS (a term is 0 when its max is 0). The top
`num` by score are kept, ties broken by relative path ascending.
"""
from __future__ import annotations

import csv
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image, ImageDraw

DEFAULT_WEIGHTS = (0.4, 0.4, 0.2)


def present_classes(class_pixels: np.ndarray, min_pixels: int = 1) -> np.ndarray:
    """bool [N, K]: class c counts as present in image i."""
    return np.asarray(class_pixels) >= max(min_pixels, 1)


def subset_scores(paths: Sequence[str], class_pixels: np.ndarray, *, min_pixels: int = 1,
                  weights: Sequence[float] = DEFAULT_WEIGHTS) -> dict[str, np.ndarray]:
    """{"cds", "rcs", "ics", "score"}, one value per image; paths are relative to the data root."""
    present = present_classes(class_pixels, min_pixels)
    num_images = len(paths)
    images_with = present.sum(axis=0)  # n_c
    # ln(N / n_c) only where n_c > 0; an absent class adds nothing to any image.
    rarity = np.log(num_images / np.maximum(images_with, 1)) * (images_with > 0)
    cds = present.sum(axis=1).astype(np.float64)
    rcs = (present * rarity).sum(axis=1)
    folder = [str(PurePosixPath(p).parent) for p in paths]
    per_folder = Counter(folder)
    ics = np.asarray([per_folder[f] for f in folder], dtype=np.float64)
    score = np.zeros(num_images)
    for weight, term in zip(weights, (cds, rcs, ics)):
        top = term.max(initial=0.0)
        if top > 0:
            score += weight * term / top
    return {"cds": cds, "rcs": rcs, "ics": ics, "score": score}


def rank(paths: Sequence[str], score: np.ndarray) -> list[int]:
    """Indices by score descending, ties by path ascending."""
    return sorted(range(len(paths)), key=lambda i: (-score[i], paths[i]))


def frequency_chart(names: Sequence[str], pool_images: np.ndarray, subset_images: np.ndarray, pool_size: int,
                    subset_size: int, colours: Sequence[Sequence[int]]) -> Image.Image:
    """A bar chart (drawn with PIL): per class, the share of images holding it, pool vs subset."""
    row, bar_w, label_w, pad = 22, 360, 190, 12
    height = pad * 2 + row * (len(names) + 2)
    chart = Image.new("RGB", (label_w + bar_w + 140, height), "white")
    draw = ImageDraw.Draw(chart)
    draw.text((pad, pad), f"images holding each class: pool (grey, {pool_size}) vs subset (colour, {subset_size})",
              fill="black")
    for k, name in enumerate(names):
        y = pad + row * (k + 1) + 6
        pool_share = pool_images[k] / max(pool_size, 1)
        subset_share = subset_images[k] / max(subset_size, 1)
        draw.text((pad, y + 2), name[:26], fill="black")
        for share, top, fill in ((pool_share, y, (170, 170, 170)), (subset_share, y + 8, tuple(colours[k]))):
            if share > 0:
                draw.rectangle((label_w, top, label_w + max(1, round(bar_w * share)), top + 7), fill=fill)
        draw.text((label_w + bar_w + 8, y + 2), f"{100 * pool_share:5.1f}% -> {100 * subset_share:5.1f}%",
                  fill="black")
    return chart


def write_selection(paths: Sequence[str], class_pixels: np.ndarray, out_dir: str | os.PathLike, *, num: int,
                    names: Sequence[str], colours: Sequence[Sequence[int]], min_pixels: int = 1,
                    weights: Sequence[float] = DEFAULT_WEIGHTS) -> dict[str, str]:
    """Rank the pool and write out_dir/subset.txt (the top `num` paths, rank order), scores.csv
    (path,cds,rcs,ics,score for the whole pool, rank order) and class_frequency.png; returns
    those files by name ("subset", "scores", "chart")."""
    scores = subset_scores(paths, class_pixels, min_pixels=min_pixels, weights=weights)
    order = rank(paths, scores["score"])
    chosen = order[:num]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {"subset": str(out / "subset.txt"), "scores": str(out / "scores.csv"),
             "chart": str(out / "class_frequency.png")}
    Path(files["subset"]).write_text("".join(f"{paths[i]}\n" for i in chosen))
    with open(files["scores"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "cds", "rcs", "ics", "score"])
        for i in order:
            writer.writerow([paths[i], int(scores["cds"][i]), f"{scores['rcs'][i]:.6f}", int(scores["ics"][i]),
                             f"{scores['score'][i]:.6f}"])
    present = present_classes(class_pixels, min_pixels)
    frequency_chart(names, present.sum(axis=0), present[chosen].sum(axis=0), len(paths), len(chosen),
                    colours).save(files["chart"])
    return files
