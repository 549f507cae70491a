"""Road-scene data: layouts, class sets, label scans and skips, transforms, subset scores, the
split / subset / pickle tools and the IDD-layout demo."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segjax.data import pipeline, roads, subset, transforms
from segjax.data.demo_roads import DRIVES, ODD_FILES, write_road_demo
from segjax.data.errors import DataError, SkipReport
from segjax.data.prepare import (
    convert_records,
    image_array,
    load_pickle,
    split_pool,
)
from segjax.data.voc import SegmentationSource, SegPair, save_mask

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO)}
CAMVID = "icevision/samples/camvid"


def _tool(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "tools" / f"{name}.py"), *map(str, args)], capture_output=True,
                          text=True, env=ENV, timeout=120, check=False)


def _save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def _scene(seed: int, height: int = 24, width: int = 40, classes: tuple[int, ...] = (0, 2, 25)) -> tuple:
    """An image whose colour follows its label (horizontal bands of the given classes)."""
    label = np.zeros((height, width), np.uint8)
    for k, cls in enumerate(classes):
        label[k * height // len(classes):] = cls
    rng = np.random.default_rng(seed)
    image = (label[..., None] * np.array([9, 5, 3]) + rng.integers(0, 3, (height, width, 3))).astype(np.uint8)
    return image, label


def _cityscapes_tree(root: Path, split: str, entries: dict[str, tuple], image_suffix: str = "_leftImg8bit.png",
                     label_suffix: str = "_gtFine_labellevel3Ids.png") -> None:
    """entries: "drive/stem" -> (image, label or None)."""
    for name, (image, label) in entries.items():
        _save(root / "leftImg8bit" / split / f"{name}{image_suffix}", image)
        if label is not None:
            _save(root / "gtFine" / split / f"{name}{label_suffix}", label)


# ---------------------------------------------------------------- class sets


def test_built_in_class_sets_and_classes_json(tmp_path: Path):
    level3 = roads.load_class_set("idd_level3")
    assert len(level3.names) == 26 and len(roads.IDD_LEVEL1.names) == 7 and len(roads.CITYSCAPES.names) == 19
    # Spot checks against the IDD level-3 id list (shared/MASK2FORMER.md).
    assert [level3.names[i] for i in (0, 1, 8, 12, 21, 25)] == [
        "road", "drivable fallback", "autorickshaw", "vehicle fallback", "obs-str-bar-fallback", "sky"]
    assert roads.IDD_LEVEL1.names[0] == "drivable" and roads.IDD_LEVEL1.names[6] == "sky"
    palette = level3.palette()
    assert palette.shape == (256, 3) and palette.dtype == np.uint8
    assert tuple(palette[0]) == (128, 64, 128) and tuple(palette[255]) == (0, 0, 0)
    assert len({tuple(c) for c in palette[:26]}) == 26

    forms = {
        "list.json": ["road", "sky"],
        "names.json": {"names": ["road", "sky"], "colours": [[1, 2, 3], [4, 5, 6]]},
        "index.json": {"0": "road", "1": "sky"},
    }
    for name, content in forms.items():
        (tmp_path / name).write_text(json.dumps(content))
        loaded = roads.load_class_set(str(tmp_path / name))
        assert loaded.names == ("road", "sky")
    assert roads.load_class_set(str(tmp_path / "names.json")).colours == ((1, 2, 3), (4, 5, 6))
    assert len(set(roads.load_class_set(str(tmp_path / "list.json")).colours)) == 2
    (tmp_path / "bad.json").write_text(json.dumps({"names": ["a"], "colours": [[1, 2]]}))
    for spec, needle in ((str(tmp_path / "bad.json"), "cannot read classes"), ("idd_level9", "built-in")):
        with pytest.raises(DataError, match=needle):
            roads.load_class_set(spec)


# Cityscapes labelIds and their names (cityscapesScripts labels.py); those named in the 19
# evaluated classes must map to that class, every other id to ignore.
_CITYSCAPES_ID_NAMES = {
    0: "unlabeled", 1: "ego vehicle", 2: "rectification border", 3: "out of roi", 4: "static", 5: "dynamic",
    6: "ground", 7: "road", 8: "sidewalk", 9: "parking", 10: "rail track", 11: "building", 12: "wall", 13: "fence",
    14: "guard rail", 15: "bridge", 16: "tunnel", 17: "pole", 18: "polegroup", 19: "traffic light",
    20: "traffic sign", 21: "vegetation", 22: "terrain", 23: "sky", 24: "person", 25: "rider", 26: "car",
    27: "truck", 28: "bus", 29: "caravan", 30: "trailer", 31: "train", 32: "motorcycle", 33: "bicycle",
}


def test_cityscapes_label_ids_map_to_train_ids():
    lut = roads.label_lut(19, "cityscapes")
    for label_id, name in _CITYSCAPES_ID_NAMES.items():
        expected = roads.CITYSCAPES.names.index(name) if name in roads.CITYSCAPES.names else 255
        assert lut[label_id] == expected, name
    assert lut[255] == 255 and (lut[34:255] == -1).all()
    assert sorted(lut[:34][lut[:34] != 255].tolist()) == list(range(19))
    plain = roads.label_lut(7)
    assert plain[:7].tolist() == list(range(7)) and (plain[7:255] == -1).all() and plain[255] == 255
    with pytest.raises(DataError, match="19 Cityscapes train ids"):
        roads.label_lut(26, "cityscapes")


# ---------------------------------------------------------------- layouts


def test_cityscapes_style_layouts_and_lists(tmp_path: Path):
    idd = tmp_path / "idd"
    _cityscapes_tree(idd, "train", {"b/000002": _scene(0), "a/000001": _scene(1), "a/000000": _scene(2)})
    _cityscapes_tree(idd, "val", {"c/000009": _scene(3)})
    scan = roads.load_road_data(idd, split="train", num_classes=26)
    assert [p.id for p in scan.pairs] == ["leftImg8bit/train/a/000000_leftImg8bit.png",
                                          "leftImg8bit/train/a/000001_leftImg8bit.png",
                                          "leftImg8bit/train/b/000002_leftImg8bit.png"]
    assert scan.pairs[0].mask_path == str(idd / "gtFine/train/a/000000_gtFine_labellevel3Ids.png")
    assert scan.sizes.tolist() == [[24, 40]] * 3
    assert scan.class_pixels.shape == (3, 26) and scan.class_pixels[0, [0, 2, 25]].tolist() == [320, 320, 320]
    # A list file restricts and orders the records.
    (tmp_path / "subset.txt").write_text("leftImg8bit/train/b/000002_leftImg8bit.png\n\n"
                                         "leftImg8bit/val/c/000009_leftImg8bit.png\n")
    listed = roads.load_road_data(idd, list_file=tmp_path / "subset.txt", num_classes=26)
    assert [p.id.split("/")[-1] for p in listed.pairs] == ["000002_leftImg8bit.png", "000009_leftImg8bit.png"]
    with pytest.raises(DataError, match=r"available: \['train', 'val'\]"):
        roads.load_road_data(idd, split="test", num_classes=26)
    (tmp_path / "abs.txt").write_text(f"{idd}/leftImg8bit/train/a/000000_leftImg8bit.png\n")
    with pytest.raises(DataError, match="not a path relative"):
        roads.load_road_data(idd, list_file=tmp_path / "abs.txt", num_classes=26)
    (tmp_path / "twice.txt").write_text("leftImg8bit/train/a/000000_leftImg8bit.png\n" * 2)
    with pytest.raises(DataError, match="listed twice"):
        roads.load_road_data(idd, list_file=tmp_path / "twice.txt", num_classes=26)

    # IDD Lite: _image.jpg + _label.png, level-1 classes.
    lite = tmp_path / "lite"
    _cityscapes_tree(lite, "train", {"0/1": _scene(4, classes=(0, 1, 6))}, "_image.jpg", "_label.png")
    layout = roads.RoadLayout(image_suffix="_image.jpg", label_suffix="_label.png")
    scan = roads.load_road_data(lite, layout=layout, split="train", num_classes=7)
    assert scan.pairs[0].mask_path.endswith("gtFine/train/0/1_label.png") and scan.class_pixels[0, 6] == 320

    # Cityscapes labelIds, mapped to train ids on the fly (7 road -> 0, 23 sky -> 10, 1 ego vehicle -> ignore).
    city = tmp_path / "city"
    _cityscapes_tree(city, "val", {"ulm/ulm_000000_000019": _scene(5, classes=(7, 23, 1))},
                     label_suffix="_gtFine_labelIds.png")
    layout = roads.RoadLayout("cityscapes", label_suffix="_gtFine_labelIds.png")
    scan = roads.load_road_data(city, layout=layout, split="val", num_classes=19, label_ids="cityscapes")
    assert np.flatnonzero(scan.class_pixels[0]).tolist() == [0, 10]
    label = transforms.read_label(scan.pairs[0].mask_path, roads.label_lut(19, "cityscapes"))
    assert set(np.unique(label).tolist()) == {0, 10, 255}


def test_folder_layout_with_split_lists(realdata: Path, tmp_path: Path):
    # Real CamVid frames (class indices 0..31) in the folder layout.
    root = tmp_path / "camvid"
    for stem in ("0006R0_f02280", "0006R0_f02310"):
        (root / "images" / "seq06").mkdir(parents=True, exist_ok=True)
        (root / "labels" / "seq06").mkdir(parents=True, exist_ok=True)
        shutil.copy(realdata / CAMVID / "images" / f"{stem}.png", root / "images" / "seq06" / f"{stem}.png")
        shutil.copy(realdata / CAMVID / "labels" / f"{stem}_P.png", root / "labels" / "seq06" / f"{stem}.png")
    (root / "classes.json").write_text(json.dumps([f"c{i}" for i in range(32)]))
    classes = roads.load_class_set(str(root / "classes.json"))
    scan = roads.load_road_data(root, split="", num_classes=len(classes.names))
    assert [p.id for p in scan.pairs] == ["images/seq06/0006R0_f02280.png", "images/seq06/0006R0_f02310.png"]
    with Image.open(scan.pairs[0].mask_path) as img:
        reference = np.bincount(np.asarray(img).ravel(), minlength=32)[:32]
    np.testing.assert_array_equal(scan.class_pixels[0], reference)
    with pytest.raises(DataError, match=r"tools/split_dataset\.py"):
        roads.load_road_data(root, split="train", num_classes=32)
    (root / "splits").mkdir()
    (root / "splits" / "train.txt").write_text("images/seq06/0006R0_f02310.png\n")
    assert [p.id for p in roads.load_road_data(root, split="train", num_classes=32).pairs] == [
        "images/seq06/0006R0_f02310.png"]
    with pytest.raises(DataError, match=r"0006R0_f02280.png: label value 26 \(\d+ pixels\)"):  # not IDD's 26 classes
        roads.load_road_data(root, split="", num_classes=26)


# ---------------------------------------------------------------- bad input


def test_bad_records_are_counted_skips(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root = tmp_path / "idd"
    image, label = _scene(0)
    _cityscapes_tree(root, "train", {
        "a/good": (image, label),
        "a/nolabel": (image, None),
        "a/unreadable": (image, label),
        "b/mismatch": (image, label[:20]),
        "b/ignored": (image, np.full_like(label, 255)),
    })
    (root / "leftImg8bit/train/a/unreadable_leftImg8bit.png").write_bytes(b"not an image")
    report = SkipReport()
    with caplog.at_level(logging.INFO):
        scan = roads.load_road_data(root, split="train", num_classes=26, report=report)
    assert [p.id for p in scan.pairs] == ["leftImg8bit/train/a/good_leftImg8bit.png"]
    assert report.counts == {"mask_missing": 1, "image_unreadable": 1, "size_mismatch": 1, "all_ignore": 1}
    assert report.examples["all_ignore"] == ["leftImg8bit/train/b/ignored_leftImg8bit.png"]
    for reason in report.counts:
        assert f"skipped 1 ({reason})" in caplog.text
    # An unreadable label is a counted skip too; nothing usable left is a clear error.
    (root / "gtFine/train/a/good_gtFine_labellevel3Ids.png").write_bytes(b"broken")
    with pytest.raises(DataError, match=r"no usable image/label pairs.*unreadable"):
        roads.load_road_data(root, split="train", num_classes=26)


def test_unknown_label_values(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    root = tmp_path / "idd"
    image, label = _scene(0)
    odd = label.copy()
    odd[:3, :5] = 40
    _cityscapes_tree(root, "train", {"a/0": (image, label), "a/1": (image, odd)})
    bad_file = root / "gtFine/train/a/1_gtFine_labellevel3Ids.png"
    with pytest.raises(DataError, match=f"{bad_file}: label value 40 \\(15 pixels\\) is neither a class"):
        roads.load_road_data(root, split="train", num_classes=26)
    with caplog.at_level(logging.WARNING):
        scan = roads.load_road_data(root, split="train", num_classes=26, unknown="ignore")
    assert len(scan.pairs) == 2 and scan.unknown == {"leftImg8bit/train/a/1_leftImg8bit.png": [40]}
    assert "1 label maps hold values outside the classes" in caplog.text
    # Those pixels count nowhere and read as ignore.
    assert scan.class_pixels[1].sum() == scan.class_pixels[0].sum() - 15
    read = transforms.read_label(bad_file, roads.label_lut(26))
    assert (read[:3, :5] == 255).all() and (read[3:] == label[3:]).all()


def test_label_modes(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    _, label = _scene(0, classes=(0, 9, 25))
    label[:2] = 255
    (tmp_path / "l").mkdir()
    save_mask(tmp_path / "l" / "p.png", label)  # palette PNG: the indices count, not the colours
    Image.fromarray(label).save(tmp_path / "l" / "l.png")
    Image.fromarray(label > 100).save(tmp_path / "l" / "one.png")  # mode 1: 0/1
    Image.fromarray(np.stack([label] * 3, -1)).save(tmp_path / "l" / "rgb.png")
    expected = np.bincount(label.ravel(), minlength=256)
    for name in ("p.png", "l.png"):
        hist, size = roads.label_histogram(tmp_path / "l" / name)
        np.testing.assert_array_equal(hist, expected)
        assert size == label.shape
    hist, _ = roads.label_histogram(tmp_path / "l" / "one.png")
    assert hist[1] == (label > 100).sum() and hist[0] == (label <= 100).sum() and hist[2:].sum() == 0
    pairs = [SegPair("unused", str(tmp_path / "l" / name), name) for name in ("p.png", "rgb.png")]
    report = SkipReport()
    with caplog.at_level(logging.WARNING):
        scan = roads.scan_labels(pairs, 26, report=report, workers=2)
    assert [p.id for p in scan.pairs] == ["p.png"] and report.counts == {"mask_unreadable": 1}
    assert "mask mode RGB is not a class-index mask" in caplog.text


# ---------------------------------------------------------------- transforms


def _pair(tmp_path: Path, height: int = 60, width: int = 100):
    image, label = _scene(7, height, width, classes=(0, 2, 9, 25))
    label[:5, :7] = 255
    _cityscapes_tree(tmp_path / "t", "train", {"a/0": (image, label)})
    return roads.load_road_data(tmp_path / "t", split="train", num_classes=26).pairs[0], image, label


def test_train_transform(tmp_path: Path):
    pair, image, label = _pair(tmp_path)
    lut = roads.label_lut(26)
    colour_of = {int(v): image[label == v][0].astype(int) for v in np.unique(label)}
    sizes = set()
    for seed in range(12):
        ex = transforms.make_train_example(pair, np.random.default_rng(seed), lut=lut, crop=(32, 48), base_height=40,
                                      scale=(0.5, 1.5))
        assert ex["image"].shape == (32, 48, 3) and ex["mask"].shape == (32, 48) and ex["pixel_mask"].shape == (32, 48)
        assert ex["image"].dtype == np.uint8 and ex["mask"].dtype == np.uint8 and ex["image_ok"]
        # Nearest: no new label value; padding is ignore with pixel_mask False and black pixels.
        assert set(np.unique(ex["mask"]).tolist()) <= {0, 2, 9, 25, 255}
        assert (ex["mask"][~ex["pixel_mask"]] == 255).all() and not ex["image"][~ex["pixel_mask"]].any()
        # Away from boundaries the image colour still matches its label.
        for value, colour in colour_of.items():
            inner = (ex["mask"] == value) & ex["pixel_mask"]
            inner[1:-1, 1:-1] &= (ex["mask"][:-2, 1:-1] == value) & (ex["mask"][2:, 1:-1] == value)
            if inner[1:-1, 1:-1].any():
                assert np.abs(ex["image"][1:-1, 1:-1][inner[1:-1, 1:-1]].astype(int) - colour).max() <= 6
        sizes.add(int(ex["pixel_mask"].sum()))
    assert len(sizes) > 3  # the random scale changes how much of the crop the image fills
    a = transforms.make_train_example(pair, np.random.default_rng(3), lut=lut, crop=(32, 48), base_height=40)
    b = transforms.make_train_example(pair, np.random.default_rng(3), lut=lut, crop=(32, 48), base_height=40)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    # Scale 1 and a crop the size of the image: the label itself, or its mirror image.
    flips = [transforms.make_train_example(pair, np.random.default_rng(s), lut=lut, crop=(60, 100), scale=(1.0, 1.0))
             for s in range(10)]
    mirrored = [np.array_equal(ex["mask"], label[:, ::-1]) for ex in flips]
    assert all(m or np.array_equal(ex["mask"], label) for m, ex in zip(mirrored, flips)) and 0 < sum(mirrored) < 10


def test_eval_transform_keeps_the_original_size(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    pair, image, label = _pair(tmp_path)
    lut = roads.label_lut(26)
    ex = transforms.make_eval_example(pair, lut=lut, size=(30, 50), full_size=(64, 128))
    assert ex["image"].shape == (30, 50, 3) and ex["mask"].shape == (30, 50) and ex["image_ok"]
    np.testing.assert_array_equal(ex["mask"], np.asarray(Image.fromarray(label).resize((50, 30), Image.NEAREST)))
    np.testing.assert_array_equal(ex["image"], np.asarray(Image.fromarray(image).resize((50, 30), Image.BILINEAR)))
    assert ex["orig_size"].tolist() == [60, 100] and ex["mask_full"].shape == (64, 128)
    np.testing.assert_array_equal(ex["mask_full"][:60, :100], label)
    assert (ex["mask_full"][60:] == 255).all() and (ex["mask_full"][:, 100:] == 255).all()
    with caplog.at_level(logging.WARNING):
        small = transforms.make_eval_example(pair, lut=lut, size=(30, 50), full_size=(32, 64))
        Path(pair.image_path).write_bytes(b"gone bad after the scan")
        broken = transforms.make_train_example(pair, np.random.default_rng(0), lut=lut, crop=(16, 16))
    assert not small["image_ok"] and "larger than the evaluation canvas" in caplog.text
    assert not broken["image_ok"] and (broken["mask"] == 255).all() and "cannot decode" in caplog.text


def test_source_through_grain_pipeline(tmp_path: Path):
    root = tmp_path / "idd"
    _cityscapes_tree(root, "train", {f"a/{i}": _scene(i) for i in range(3)})
    scan = roads.load_road_data(root, split="train", num_classes=26)
    lut = roads.label_lut(26)
    source = SegmentationSource(scan.pairs)

    def train(pair, rng):
        return transforms.make_train_example(pair, rng, lut=lut, crop=(16, 24))

    def evaluate(pair):
        return transforms.make_eval_example(pair, lut=lut, size=(12, 20), full_size=tuple(scan.sizes.max(axis=0)))

    batch = next(iter(pipeline.train_dataset(source, train, local_batch=2, seed=0, num_workers=0)))
    assert batch["image"].shape == (2, 16, 24, 3) and batch["image"].dtype == np.uint8 and batch["valid"].all()
    batches = list(pipeline.eval_batches(source, evaluate, local_batch=2, global_batch=2, num_workers=0))
    assert [b["valid"].tolist() for b in batches] == [[True, True], [True, False]]
    assert batches[0]["mask_full"].shape == (2, 24, 40) and batches[0]["orig_size"].tolist() == [[24, 40]] * 2


# ---------------------------------------------------------------- subset selection


def _direct_scores(paths, labels, num_classes, min_pixels, weights):
    """The issue's definition, computed plainly: present classes, CDS, RCS, ICS, weighted score."""
    present = [{c for c in range(num_classes) if int((lab == c).sum()) >= min_pixels} for lab in labels]
    n = len(paths)
    n_c = {c: sum(c in p for p in present) for c in range(num_classes)}
    cds = [len(p) for p in present]
    rcs = [sum(math.log(n / n_c[c]) for c in p) for p in present]
    folders = [os.path.dirname(p) for p in paths]
    ics = [folders.count(f) for f in folders]
    score = []
    for i in range(n):
        s = 0.0
        for w, term in zip(weights, (cds, rcs, ics)):
            s += w * term[i] / max(term) if max(term) > 0 else 0.0
        score.append(s)
    return cds, rcs, ics, score


def _pool(root: Path) -> dict[str, np.ndarray]:
    """Ten labels of 26 IDD classes in three uneven drives; returns path -> label."""
    rng = np.random.default_rng(0)
    labels = {}
    for drive, count in (("d1", 5), ("d2", 3), ("d3", 2)):
        for i in range(count):
            label = np.full((20, 30), 255, np.uint8)
            for cls in rng.choice(26, size=int(rng.integers(1, 6)), replace=False):
                y, x = rng.integers(0, 18), rng.integers(0, 28)
                label[y : y + int(rng.integers(1, 4)), x : x + int(rng.integers(1, 4))] = cls
            label[0, 0] = 0 if label.max() == 255 else label[0, 0]
            path = f"leftImg8bit/train/{drive}/{i:03d}_leftImg8bit.png"
            labels[path] = label
            _cityscapes_tree(root, "train", {f"{drive}/{i:03d}": (np.zeros((20, 30, 3), np.uint8), label)})
    # Two images with identical labels in one drive: a tie, broken by path.
    labels["leftImg8bit/train/d2/001_leftImg8bit.png"] = labels["leftImg8bit/train/d2/000_leftImg8bit.png"]
    drive = root / "gtFine/train/d2"
    shutil.copy(drive / "000_gtFine_labellevel3Ids.png", drive / "001_gtFine_labellevel3Ids.png")
    return labels


@pytest.mark.parametrize("min_pixels, weights", [(1, (0.4, 0.4, 0.2)), (3, (0.1, 0.7, 0.2)), (1, (0.5, 0.5, 0.0))])
def test_subset_scores_match_the_definition(tmp_path: Path, min_pixels, weights):
    labels = _pool(tmp_path)
    scan = roads.load_road_data(tmp_path, split="train", num_classes=26)
    paths = [p.id for p in scan.pairs]
    assert sorted(paths) == sorted(labels)
    got = subset.subset_scores(paths, scan.class_pixels, min_pixels=min_pixels, weights=weights)
    cds, rcs, ics, score = _direct_scores(paths, [labels[p] for p in paths], 26, min_pixels, weights)
    np.testing.assert_array_equal(got["cds"], cds)
    np.testing.assert_allclose(got["rcs"], rcs, rtol=1e-12)
    np.testing.assert_array_equal(got["ics"], ics)
    np.testing.assert_allclose(got["score"], score, rtol=1e-12)
    expected_order = sorted(range(len(paths)), key=lambda i: (-round(score[i], 9), paths[i]))
    assert subset.rank(paths, got["score"]) == expected_order
    order = subset.rank(paths, got["score"])
    tie = [paths.index(f"leftImg8bit/train/d2/00{k}_leftImg8bit.png") for k in (0, 1)]
    assert order.index(tie[0]) + 1 == order.index(tie[1])  # equal scores, path ascending


def test_subset_edge_cases():
    # A term whose max is 0 contributes nothing: one class everywhere gives RCS 0 for all.
    got = subset.subset_scores(["a/1", "a/2", "b/3"], np.array([[5, 0], [7, 0], [1, 0]]))
    assert got["rcs"].tolist() == [0, 0, 0] and got["cds"].tolist() == [1, 1, 1]
    np.testing.assert_allclose(got["score"], [0.6, 0.6, 0.5])
    assert subset.rank(["a/2", "a/1", "b/3"], got["score"]) == [1, 0, 2]


def test_select_subset_tool(tmp_path: Path):
    labels = _pool(tmp_path / "pool")
    out = tmp_path / "out"
    result = _tool("select_subset", "--data_root", tmp_path / "pool", "--split", "train", "--num", "4",
                   "--out_dir", out, "--workers", "2")
    assert result.returncode == 0, result.stderr
    assert "ranked 10 images" in result.stdout and "kept 4" in result.stdout
    rows = list(csv.DictReader((out / "scores.csv").open()))
    assert len(rows) == 10 and list(rows[0]) == ["path", "cds", "rcs", "ics", "score"]
    paths = [r["path"] for r in rows]
    cds, _, ics, score = _direct_scores(paths, [labels[p] for p in paths], 26, 1, (0.4, 0.4, 0.2))
    np.testing.assert_allclose([float(r["score"]) for r in rows], score, atol=1e-6)
    assert [int(r["ics"]) for r in rows] == ics and [int(r["cds"]) for r in rows] == cds
    assert (out / "subset.txt").read_text().splitlines() == paths[:4]
    assert [float(r["score"]) for r in rows] == sorted((float(r["score"]) for r in rows), reverse=True)
    with Image.open(out / "class_frequency.png") as chart:
        assert chart.size[1] > 26 * 20
    # The subset file feeds the loader, in rank order.
    listed = roads.load_road_data(tmp_path / "pool", list_file=out / "subset.txt", num_classes=26)
    assert [p.id for p in listed.pairs] == paths[:4]
    # --list instead of --split; command-line mistakes: one line, exit 2.
    again = _tool("select_subset", "--data_root", tmp_path / "pool", "--list", out / "subset.txt", "--num", "2",
                  "--out_dir", tmp_path / "out2", "--weights", "1,0,0")
    assert again.returncode == 0 and len((tmp_path / "out2" / "subset.txt").read_text().splitlines()) == 2
    for args, needle in (
        (["--data_root", tmp_path / "nowhere", "--out_dir", out], "holds neither leftImg8bit/"),
        (["--data_root", tmp_path / "pool", "--out_dir", out, "--weights", "1,2"], "three non-negative numbers"),
        (["--data_root", tmp_path / "pool", "--out_dir", out, "--classes", "idd_level1"], "label value"),
    ):
        bad = _tool("select_subset", *args)
        assert bad.returncode == 2 and needle in bad.stderr
        lines = [line for line in bad.stderr.strip().splitlines() if not line.startswith("reading labels")]
        assert "Traceback" not in bad.stderr and len(lines) <= 2, bad.stderr


# ---------------------------------------------------------------- splits and pickles


def test_split_pool():
    paths = [f"images/d{d}/{i:03d}.png" for d, n in enumerate((80, 50, 40, 20, 10)) for i in range(n)]
    lists = split_pool(paths, seed=3)
    assert [len(lists[s]) for s in ("train", "val", "test")] == [171, 9, 20]
    assert sorted(p for v in lists.values() for p in v) == sorted(paths)
    assert split_pool(list(reversed(paths)), seed=3) == lists  # the pool's order does not matter
    assert split_pool(paths, seed=4) != lists
    grouped = split_pool(paths, seed=0, by_subdir=True, fractions=(0.6, 0.2, 0.2))
    folders = {s: {p.split("/")[1] for p in grouped[s]} for s in grouped}
    assert not (folders["train"] & folders["val"]) and not (folders["train"] & folders["test"])
    assert not (folders["val"] & folders["test"]) and sorted(p for v in grouped.values() for p in v) == sorted(paths)
    assert all(grouped[s] for s in grouped)
    with pytest.raises(DataError, match="summing to 1"):
        split_pool(paths, fractions=(0.5, 0.2, 0.2))


def test_split_dataset_tool(tmp_path: Path):
    root = tmp_path / "pool"
    for d, n in (("a", 12), ("b", 6), ("c", 2)):
        for i in range(n):
            _save(root / "images" / d / f"{i}.jpg", _scene(i)[0])
            _save(root / "labels" / d / f"{i}.png", _scene(i)[1])
    _save(root / "images" / "c" / "unlabelled.png", _scene(0)[0])
    result = _tool("split_dataset", "--data_root", root, "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "split 20 images (skipped: {'mask_missing': 1})" in result.stdout
    lists = {s: (root / "splits" / f"{s}.txt").read_text().splitlines() for s in ("train", "val", "test")}
    assert [len(v) for v in lists.values()] == [17, 1, 2]
    assert all(line.startswith("images/") for v in lists.values() for line in v)
    assert [p.id for p in roads.load_road_data(root, split="test", num_classes=26).pairs] == lists["test"]
    again = _tool("split_dataset", "--data_root", root, "--seed", "1", "--by_subdir", "--out_dir", tmp_path / "g")
    assert again.returncode == 0
    grouped = {s: (tmp_path / "g" / f"{s}.txt").read_text().splitlines() for s in ("train", "val", "test")}
    assert len({p.split("/")[1] for p in grouped["train"]} & {p.split("/")[1] for p in grouped["test"]}) == 0
    bad = _tool("split_dataset", "--data_root", root, "--fractions", "0.9,0.2,0.1")
    assert bad.returncode == 2 and "summing to 1" in bad.stderr


def test_convert_pickle(tmp_path: Path):
    image, label = _scene(0)
    records = [
        {"image": image, "label": label, "subdir": "drive1", "file_name": "/data/idd/x.jpg"},
        {"img": Image.fromarray(image), "mask": Image.fromarray(label)},
        {"pixel_values": image.transpose(2, 0, 1).astype(np.float32) / 255.0,
         "segmentation_map": label.astype(np.int64)},
        (image, label),
        {"image": image},  # no label
        {"image": image, "annotation": label[:10]},  # size mismatch
        {"image": image, "label": label.astype(np.int32) + 300},  # not class indices
        {"image": image - 128.0, "label": label},  # normalised pixels cannot be written back
    ]
    data = tmp_path / "data" / "raw" / "data.pkl"
    data.parent.mkdir(parents=True)
    data.write_bytes(pickle.dumps(records))
    refused = _tool("convert_pickle", "--pickle", data, "--out_dir", tmp_path / "out")
    assert refused.returncode == 2 and "refusing to unpickle" in refused.stderr and "--trust_pickle" in refused.stderr
    assert not (tmp_path / "out").exists()
    result = _tool("convert_pickle", "--pickle", data, "--out_dir", tmp_path / "out", "--trust_pickle")
    assert result.returncode == 0, result.stderr
    assert "wrote 4 of 8 records" in result.stdout
    assert "'no_image_or_label': 1" in result.stdout and "'size_mismatch': 1" in result.stdout
    assert "'bad_array': 2" in result.stdout
    out = tmp_path / "out"
    written = sorted(p.relative_to(out / "images").as_posix() for p in (out / "images").rglob("*.png"))
    assert written == ["drive1/x.png", "pool/000001.png", "pool/000002.png", "pool/000003.png"]
    for name in written:
        np.testing.assert_array_equal(np.asarray(Image.open(out / "labels" / name)), label)
        assert np.abs(np.asarray(Image.open(out / "images" / name)).astype(int) - image).max() <= 1
    scan = roads.load_road_data(out, split="", num_classes=26)
    assert len(scan.pairs) == 4
    # A mapping of columns works too; other contents are clear errors.
    summary = convert_records({"images": [image, image], "masks": [label, label]}, tmp_path / "cols")
    assert summary["written"] == 2
    with pytest.raises(DataError, match="sequence of records"):
        convert_records(42, tmp_path / "x")
    with pytest.raises(DataError, match="no usable record"):
        convert_records([{"image": image}], tmp_path / "x")
    with pytest.raises(DataError, match="runs whatever code"):
        load_pickle(data, trust=False)
    assert image_array(np.zeros((1, 3, 4, 5), np.float32)).shape == (4, 5, 3)


# ---------------------------------------------------------------- demo


def test_road_demo(tmp_path: Path):
    root = write_road_demo(tmp_path / "a")
    report = SkipReport()
    train = roads.load_road_data(root, split="train", num_classes=26, report=report)
    assert report.counts == {"image_unreadable": 1, "mask_missing": 1, "size_mismatch": 1, "all_ignore": 1}
    assert len(train.pairs) == sum(n for _, n in DRIVES["train"]) and len(ODD_FILES) == 4
    val = roads.load_road_data(root, split="val", num_classes=26)
    assert len(val.pairs) == sum(n for _, n in DRIVES["val"])
    assert train.sizes.tolist() == [[128, 256]] * len(train.pairs)
    present = (train.class_pixels > 0).sum(axis=0)
    names = roads.IDD_LEVEL3.names
    # Every demo class appears in many images; road, sidewalk and sky in all.
    used = {names[c]: int(present[c]) for c in np.flatnonzero(present)}
    assert set(used) == {"road", "sidewalk", "person", "autorickshaw", "car", "building", "vegetation", "sky"}
    assert used["road"] == used["sidewalk"] == used["sky"] == len(train.pairs) and min(used.values()) >= 5
    # Idempotent, deterministic.
    image = Path(train.pairs[0].image_path)
    stamp = image.stat().st_mtime_ns
    assert write_road_demo(tmp_path / "a") == root and image.stat().st_mtime_ns == stamp
    other = write_road_demo(tmp_path / "b")
    for pair in train.pairs[:3]:
        for path in (pair.image_path, pair.mask_path):
            rel = Path(path).relative_to(root)
            assert (other / rel).read_bytes() == Path(path).read_bytes()
