"""Semantic segmentation data: VOC/folder loaders on real fixtures, masks, joint transforms,
COCO -> class-index preparation (every rule), its CLI, and the VOC / COCO semantic demos."""
from __future__ import annotations

import functools
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segjax.data import demo, pipeline
from segjax.data.errors import DataError, SkipReport
from segjax.data.files import BadImage, read_rgb
from segjax.data.prepare import load_class_names, prepare_coco_semantic, triptych
from segjax.data.transforms import make_seg_example, resize_letterbox
from segjax.data.voc import (
    VOC_CLASSES,
    SegmentationSource,
    SegPair,
    load_folder_pairs,
    load_voc_split,
    read_mask,
    save_mask,
    voc_palette,
    voc_root,
)

REPO = Path(__file__).resolve().parents[1]
VOC = "voc_assembled"
VOC_TRAIN = ["2007_000063", "2011_000003", "2011_000006", "2011_000025"]
CAMVID = "icevision/samples/camvid"
CAMVID_STEMS = ["0006R0_f02280", "0006R0_f02310"]
CAMVID_VALUES = {4, 5, 8, 10, 12, 14, 16, 17, 21, 22, 26, 29, 30}
TINY_ANN = "super_gradients/tests/data/tinycoco/annotations/instances_val2017.json"
TINY_IMG = "super_gradients/tests/data/tinycoco/images/val2017"


def _counts(mask: np.ndarray) -> dict[int, int]:
    values, counts = np.unique(mask, return_counts=True)
    return dict(zip(values.tolist(), counts.tolist()))


# ---------------------------------------------------------------- VOC layout (real files)


def test_voc_root_forms_and_splits(realdata: Path, tmp_path: Path):
    base = realdata / VOC / "VOCdevkit" / "VOC2012"
    for form in (realdata / VOC, realdata / VOC / "VOCdevkit", base):
        assert voc_root(form) == base
    by_root = {split: load_voc_split(realdata / VOC, split) for split in ("train", "val", "trainval")}
    assert [p.id for p in by_root["train"]] == VOC_TRAIN
    assert [p.id for p in by_root["val"]] == ["2007_000033"]
    assert sorted(p.id for p in by_root["trainval"]) == sorted(VOC_TRAIN + ["2007_000033"])
    assert all(load_voc_split(base, split) == pairs for split, pairs in by_root.items())
    pair = by_root["val"][0]
    assert pair == SegPair(str(base / "JPEGImages" / "2007_000033.jpg"),
                           str(base / "SegmentationClass" / "2007_000033.png"), "2007_000033")
    with pytest.raises(DataError, match="not a PASCAL VOC folder.*JPEGImages"):
        voc_root(tmp_path)
    with pytest.raises(DataError, match=r"test.txt not found \(available splits: \['train', 'trainval', 'val'\]\)"):
        load_voc_split(realdata / VOC, "test")


def test_voc_masks_read_as_palette_indices(realdata: Path):
    masks = realdata / VOC / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    m033 = read_mask(masks / "2007_000033.png")
    assert m033.dtype == np.uint8 and m033.shape == (366, 500)
    # Indices, not colours: aeroplane is 1 (its palette colour is 128,0,0).
    assert _counts(m033) == {0: 143868, 1: 30937, 255: 8195}
    assert _counts(read_mask(masks / "2007_000063.png")) == {0: 72224, 9: 78930, 12: 27632, 255: 8714}
    with_void = [p.stem for p in sorted(masks.glob("*.png")) if 255 in read_mask(p)]
    assert len(with_void) == 4 and "2011_000025" not in with_void
    with Image.open(masks / "2007_000033.png") as img:
        assert img.mode == "P"
        np.testing.assert_array_equal(voc_palette(), np.asarray(img.getpalette(), np.uint8).reshape(256, 3))
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[1] == "aeroplane" and VOC_CLASSES[15] == "person"
    assert VOC_CLASSES[0] == "background" and VOC_CLASSES[20] == "tvmonitor"


def test_voc_split_skips_are_counted(realdata: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    shutil.copytree(realdata / VOC, tmp_path / "voc")
    base = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    (base / "JPEGImages" / "2011_000003.jpg").unlink()
    (base / "SegmentationClass" / "2011_000006.png").unlink()
    small = read_mask(base / "SegmentationClass" / "2011_000025.png")[:100, :100]
    save_mask(base / "SegmentationClass" / "2011_000025.png", small)
    (base / "JPEGImages" / "2012_000001.jpg").write_text("not a jpeg")
    shutil.copy(base / "SegmentationClass" / "2007_000063.png", base / "SegmentationClass" / "2012_000001.png")
    split = base / "ImageSets" / "Segmentation" / "train.txt"
    split.write_text(split.read_text() + "\n2012_000001\n\n")
    report = SkipReport()
    with caplog.at_level(logging.WARNING):
        pairs = load_voc_split(tmp_path / "voc", "train", report=report)
    assert [p.id for p in pairs] == ["2007_000063"]
    assert report.counts == {"image_missing": 1, "mask_missing": 1, "size_mismatch": 1, "image_unreadable": 1}
    assert report.examples["size_mismatch"] == ["2011_000025"] and "size_mismatch" in caplog.text
    split.write_text("2011_000003\n")
    with pytest.raises(DataError, match="no usable image/mask pairs.*image_missing"):
        load_voc_split(tmp_path / "voc", "train")


def test_read_mask_modes(tmp_path: Path):
    values = np.array([[0, 1, 2], [7, 254, 255]], np.uint8)
    Image.fromarray(values).save(tmp_path / "l.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "l.png"), values)
    # A palette whose colours are unrelated to the indices: the indices come back.
    pal = Image.fromarray(values)
    pal.putpalette(bytes(range(255, -1, -1)) * 3)
    pal.save(tmp_path / "p.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "p.png"), values)
    save_mask(tmp_path / "saved.png", values)
    with Image.open(tmp_path / "saved.png") as img:
        assert img.mode == "P" and img.getpalette()[3:6] == [128, 0, 0]
    np.testing.assert_array_equal(read_mask(tmp_path / "saved.png"), values)
    Image.fromarray(values > 1).save(tmp_path / "bits.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "bits.png"), (values > 1).astype(np.uint8))
    Image.fromarray(np.stack([values] * 3, axis=2)).save(tmp_path / "rgb.png")
    with pytest.raises(BadImage, match="rgb.png: mask mode RGB is not a class-index mask"):
        read_mask(tmp_path / "rgb.png")
    Image.fromarray(values.astype(np.uint16) * 256).save(tmp_path / "wide.png")
    with pytest.raises(BadImage, match="wide.png: mask mode I;16 is not a class-index mask"):
        read_mask(tmp_path / "wide.png")
    with pytest.raises(BadImage, match="none.png: file not found"):
        read_mask(tmp_path / "none.png")
    (tmp_path / "text.png").write_text("not a png")
    with pytest.raises(BadImage, match="text.png: cannot decode"):
        read_mask(tmp_path / "text.png")


# ---------------------------------------------------------------- image/mask folders (real CamVid)


def test_camvid_folder_pairs(realdata: Path, tmp_path: Path):
    camvid = realdata / CAMVID
    pairs = load_folder_pairs(camvid / "images", camvid / "labels", mask_suffix="_P")
    assert [p.id for p in pairs] == CAMVID_STEMS
    assert all(Path(p.mask_path).name == f"{p.id}_P.png" for p in pairs)
    for pair in pairs:
        mask = read_mask(pair.mask_path)
        assert mask.shape == (720, 960) and set(np.unique(mask).tolist()) == CAMVID_VALUES
    with pytest.raises(DataError, match="no usable image/mask pairs"):
        load_folder_pairs(camvid / "images", camvid / "labels")
    with pytest.raises(DataError, match="folder not found"):
        load_folder_pairs(camvid / "nope", camvid / "labels")

    # Same stems in both folders, one pair in a sub-folder, and files that do not pair up.
    images, labels = tmp_path / "images", tmp_path / "labels"
    (images / "seq1").mkdir(parents=True)
    (labels / "seq1").mkdir(parents=True)
    shutil.copy(camvid / "images" / f"{CAMVID_STEMS[0]}.png", images / "seq1" / f"{CAMVID_STEMS[0]}.png")
    shutil.copy(camvid / "labels" / f"{CAMVID_STEMS[0]}_P.png", labels / "seq1" / f"{CAMVID_STEMS[0]}.png")
    shutil.copy(camvid / "images" / f"{CAMVID_STEMS[1]}.png", images / f"{CAMVID_STEMS[1]}.png")
    shutil.copy(camvid / "labels" / f"{CAMVID_STEMS[1]}_P.png", labels / f"{CAMVID_STEMS[1]}.png")
    Image.new("RGB", (8, 8)).save(images / "lonely.jpg")
    Image.new("L", (8, 8)).save(labels / "orphan.png")
    Image.new("RGB", (8, 8)).save(images / "twice.jpg")
    Image.new("RGB", (8, 8)).save(images / "twice.png")
    Image.new("L", (8, 8)).save(labels / "twice.png")
    (images / "notes.txt").write_text("not an image")
    report = SkipReport()
    pairs = load_folder_pairs(images, labels, report=report)
    assert [p.id for p in pairs] == [CAMVID_STEMS[1], f"seq1/{CAMVID_STEMS[0]}"]
    # A stem with two images is one ambiguous pair, not also a mask without an image.
    assert report.counts == {"duplicate_stem": 1, "image_without_mask": 1, "mask_without_image": 1}
    assert report.examples["mask_without_image"] == ["orphan"] and report.examples["duplicate_stem"] == ["twice"]
    np.testing.assert_array_equal(read_mask(pairs[1].mask_path),
                                  read_mask(camvid / "labels" / f"{CAMVID_STEMS[0]}_P.png"))


# ---------------------------------------------------------------- joint transforms


_COLOURS = {0: (30, 160, 40), 3: (200, 30, 30), 7: (40, 60, 220), 255: (128, 128, 128)}


@pytest.fixture
def colour_pair(tmp_path: Path) -> tuple[SegPair, np.ndarray]:
    """A 90x120 image whose colour encodes the class of each pixel (classes 0, 3, 7, void 255)."""
    mask = np.zeros((90, 120), np.uint8)
    mask[10:60, 5:50] = 3
    mask[40:85, 70:115] = 7
    mask[20:30, 80:100] = 3
    mask[60:62, 5:50] = 255
    image = np.zeros((90, 120, 3), np.uint8)
    for value, colour in _COLOURS.items():
        image[mask == value] = colour
    Image.fromarray(image).save(tmp_path / "img.png")
    save_mask(tmp_path / "img_mask.png", mask)
    return SegPair(str(tmp_path / "img.png"), str(tmp_path / "img_mask.png"), "img"), mask


def _interior(mask: np.ndarray) -> np.ndarray:
    """Pixels whose 3x3 neighbourhood has one label: there bilinear image colours are exact.

    The crop's edge rows and columns never count: their outer neighbours were cropped away.
    """
    padded = np.pad(mask.astype(int), 1, constant_values=-1)
    same = np.ones(mask.shape, bool)
    for dy in range(3):
        for dx in range(3):
            same &= padded[dy : dy + mask.shape[0], dx : dx + mask.shape[1]] == mask
    return same


def test_train_transform_keeps_image_and_mask_aligned(colour_pair):
    pair, _ = colour_pair
    outputs = []
    for seed in range(24):
        ex = make_seg_example(pair, rng=np.random.default_rng(seed), crop_size=64, scale=(0.5, 1.5))
        image, mask = ex["image"], ex["mask"]
        assert ex["image_ok"] and image.shape == (64, 64, 3) and mask.shape == (64, 64)
        assert image.dtype == np.uint8 and mask.dtype == np.uint8
        # Nearest resizing: no class value appears that was not in the mask (255 also pads).
        assert set(np.unique(mask).tolist()) <= set(_COLOURS)
        inside = _interior(mask)
        for value, colour in _COLOURS.items():
            where = inside & (mask == value)
            diff = np.abs(image[where].astype(int) - colour).max(axis=1)
            if value == 255:  # void band, or padding (black)
                diff = np.minimum(diff, image[where].astype(int).max(axis=1))
            assert (diff <= 6).all(), (seed, value)
        outputs.append(ex)
    # The random resize changes the content: class fractions differ between seeds.
    assert len({int((ex["mask"] == 7).sum()) for ex in outputs}) > 10
    again = make_seg_example(pair, rng=np.random.default_rng(5), crop_size=64, scale=(0.5, 1.5))
    np.testing.assert_array_equal(again["image"], outputs[5]["image"])
    np.testing.assert_array_equal(again["mask"], outputs[5]["mask"])


def test_train_crop_pads_small_images_with_ignore(colour_pair):
    pair, _ = colour_pair
    ex = make_seg_example(pair, rng=np.random.default_rng(0), crop_size=64, scale=(0.5, 0.5), flip=False)
    # 90x120 at half size is 45x60: placed top-left, the rest is padding.
    assert (ex["mask"][45:] == 255).all() and (ex["mask"][:, 60:] == 255).all()
    assert (ex["image"][45:] == 0).all() and (ex["image"][:, 60:] == 0).all()
    assert set(np.unique(ex["mask"][:45, :60]).tolist()) == set(_COLOURS)
    ex = make_seg_example(pair, rng=np.random.default_rng(0), crop_size=64, scale=(0.5, 0.5), flip=False,
                          ignore_index=250)
    assert (ex["mask"][45:] == 250).all()


def test_train_flip_mirrors_both(tmp_path: Path):
    mask = np.zeros((32, 32), np.uint8)
    mask[4:20, 2:9] = 3
    image = np.zeros((32, 32, 3), np.uint8)
    image[mask == 3] = _COLOURS[3]
    Image.fromarray(image).save(tmp_path / "a.png")
    save_mask(tmp_path / "a_mask.png", mask)
    pair = SegPair(str(tmp_path / "a.png"), str(tmp_path / "a_mask.png"), "a")
    flipped = []
    for seed in range(16):
        for flip in (True, False):
            ex = make_seg_example(pair, rng=np.random.default_rng(seed), crop_size=32, scale=(1.0, 1.0), flip=flip)
            mirrored = bool(ex["mask"][5, 25] == 3)  # columns 2..8 mirror to 23..29
            np.testing.assert_array_equal(ex["mask"], mask[:, ::-1] if mirrored else mask)
            np.testing.assert_array_equal(ex["image"], image[:, ::-1] if mirrored else image)
            if flip:
                flipped.append(mirrored)
            else:
                assert not mirrored
    assert 3 <= sum(flipped) <= 13


def test_eval_letterbox_pads_with_ignore(realdata: Path):
    (pair,) = load_voc_split(realdata / VOC, "val")
    ex = make_seg_example(pair, crop_size=64, eval_size=100)
    image, mask = ex["image"], ex["mask"]
    assert ex["image_ok"] and image.shape == (100, 100, 3) and mask.shape == (100, 100)
    # 500x366 -> 100x73, padded below.
    assert (mask[73:] == 255).all() and (image[73:] == 0).all()
    assert set(np.unique(mask[:73]).tolist()) == {0, 1, 255}
    assert abs((mask[:73] == 1).mean() - 30937 / (500 * 366)) < 0.02
    np.testing.assert_array_equal(image, resize_letterbox(read_rgb(pair.image_path), 100)[0])
    assert make_seg_example(pair, crop_size=64)["mask"].shape == (64, 64)
    custom = make_seg_example(pair, eval_size=100, ignore_index=254)["mask"]
    assert (custom[73:] == 254).all() and (custom[:73] == 255).any()


def test_unreadable_files_give_image_ok_false(realdata: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    (pair,) = load_voc_split(realdata / VOC, "val")
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(Path(pair.image_path).read_bytes()[:20_000])
    other = load_voc_split(realdata / VOC, "train")[0]
    cases = {
        "cut.jpg": SegPair(str(cut), pair.mask_path, "cut"),
        "gone.png": SegPair(pair.image_path, str(tmp_path / "gone.png"), "gone"),
        "size_mismatch": SegPair(other.image_path, pair.mask_path, "mixed"),  # 500x375 image, 500x366 mask
    }
    for needle, bad in cases.items():
        for rng in (np.random.default_rng(0), None):
            caplog.clear()
            with caplog.at_level(logging.WARNING):
                ex = make_seg_example(bad, rng=rng, crop_size=48)
            assert not ex["image_ok"] and ex["image"].shape == (48, 48, 3) and not ex["image"].any()
            assert ex["mask"].shape == (48, 48) and (ex["mask"] == 255).all()
            assert needle in caplog.text
    assert (make_seg_example(cases["cut.jpg"], ignore_index=250, crop_size=8)["mask"] == 250).all()


def _train_transform(entry: SegPair, rng: np.random.Generator) -> dict:
    return make_seg_example(entry, rng=rng, crop_size=32)


def test_source_through_grain_pipeline(realdata: Path):
    source = SegmentationSource(load_voc_split(realdata / VOC, "trainval"))
    assert len(source) == 5 and source[0].id == "2007_000033" and "5 pairs" in repr(source)
    assert pickle.loads(pickle.dumps(source))[4] == source[4]
    batch = next(iter(pipeline.train_dataset(source, _train_transform, local_batch=2, seed=0, num_workers=0)))
    assert batch["image"].shape == (2, 32, 32, 3) and batch["mask"].shape == (2, 32, 32)
    assert batch["image_ok"].all() and batch["valid"].all()
    val = functools.partial(make_seg_example, eval_size=40)
    batches = list(pipeline.eval_batches(source, val, local_batch=4, global_batch=4, num_workers=0))
    assert [b["valid"].tolist() for b in batches] == [[True] * 4, [True, False, False, False]]
    assert batches[1]["mask"].shape == (4, 40, 40) and (batches[0]["mask"] == 255).any()


# ---------------------------------------------------------------- COCO -> class-index masks


# Categories in the file out of id order: indices follow the ids (person 1, table 2, cup 3).
_CATEGORIES = [{"id": 20, "name": "cup"}, {"id": 1, "name": "person"}, {"id": 10, "name": "dining table"}]
PERSON, TABLE, CUP = 1, 2, 3


def _box(x: int, y: int, w: int, h: int) -> list[list[float]]:
    return [[x, y, x + w, y, x + w, y + h, x, y + h]]


def _box_rle(x: int, y: int, w: int, h: int, size: tuple[int, int] = (40, 30)) -> dict:
    """The same box as a compressed RLE (counts a string)."""
    mask = np.zeros(size[::-1], np.uint8)
    mask[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def _ann(ann_id: int, image_id: int, category: int, segmentation, iscrowd: int = 0) -> dict:
    return {"id": ann_id, "image_id": image_id, "category_id": category, "segmentation": segmentation,
            "iscrowd": iscrowd, "area": 1.0, "bbox": [0, 0, 1, 1]}


def _write_coco(root: Path, annotations: list[dict], image_ids: tuple[int, ...] = (7,),
                size: tuple[int, int] = (40, 30)) -> tuple[Path, Path]:
    """A hand-made COCO file with PNG images of size (w, h); returns (ann file, image folder)."""
    width, height = size
    img_dir = root / "img"
    img_dir.mkdir(parents=True, exist_ok=True)
    images = []
    for image_id in image_ids:
        name = f"{image_id:012d}.png"
        Image.fromarray(np.full((height, width, 3), 10 * image_id % 250, np.uint8)).save(img_dir / name)
        images.append({"id": image_id, "file_name": name, "height": height, "width": width})
    ann = root / "ann.json"
    ann.write_text(json.dumps({"images": images, "annotations": annotations, "categories": _CATEGORIES}))
    return ann, img_dir


# One image: a large table (600 px) with a cup on it (36 px, listed first), a second table
# (150 px) overlapping the first (same class: union) and a person (196 px) overlapping the first.
_SCENE = [
    _ann(1, 7, 20, _box(5, 5, 6, 6)),
    _ann(2, 7, 10, _box(0, 0, 30, 20)),
    _ann(3, 7, 10, _box_rle(20, 0, 15, 10)),
    _ann(4, 7, 1, _box(22, 12, 14, 14)),
]


def test_prepare_overlap_rules(tmp_path: Path):
    ann, img_dir = _write_coco(tmp_path, _SCENE)
    summary = prepare_coco_semantic(ann, img_dir, tmp_path / "out")
    assert summary["written"] == 1 and summary["num_classes"] == 4
    assert load_class_names(tmp_path / "out" / "classes.json") == ["background", "person", "dining table", "cup"]
    expected = np.zeros((30, 40), np.uint8)
    expected[0:20, 0:30] = TABLE
    expected[0:10, 20:35] = TABLE
    expected[12:26, 22:36] = PERSON  # smaller than the first table: on top of it
    expected[5:11, 5:11] = CUP  # smallest: on top of the table
    mask = read_mask(tmp_path / "out" / "masks" / "000000000007.png")
    np.testing.assert_array_equal(mask, expected)

    # The highest priority (last listed) is painted last: the table now covers the cup and the person.
    prepare_coco_semantic(ann, img_dir, tmp_path / "prio", class_priority=["cup", "dining table"])
    expected = np.zeros((30, 40), np.uint8)
    expected[12:26, 22:36] = PERSON
    expected[0:20, 0:30] = TABLE
    expected[0:10, 20:35] = TABLE
    np.testing.assert_array_equal(read_mask(tmp_path / "prio" / "masks" / "000000000007.png"), expected)
    # Listed classes go above unlisted ones whatever their size; by size among themselves.
    prepare_coco_semantic(ann, img_dir, tmp_path / "prio2", class_priority=["cup"])
    mask = read_mask(tmp_path / "prio2" / "masks" / "000000000007.png")
    assert (mask[5:11, 5:11] == CUP).all() and (mask[12:26, 30:36] == PERSON).all()
    prepare_coco_semantic(ann, img_dir, tmp_path / "prio3", class_priority=["person", "cup"])
    np.testing.assert_array_equal(read_mask(tmp_path / "prio3" / "masks" / "000000000007.png"),
                                  read_mask(tmp_path / "out" / "masks" / "000000000007.png"))
    with pytest.raises(DataError, match=r"unknown class\(es\) in class_priority: \['table'\]; valid names"):
        prepare_coco_semantic(ann, img_dir, tmp_path / "bad", class_priority=["table"])


def _crowd_rle(height: int, width: int, x0: int) -> dict:
    """Uncompressed (column-major) RLE covering columns x0.. of the image, as COCO crowds are stored."""
    return {"size": [height, width], "counts": [x0 * height, (width - x0) * height]}


def test_prepare_crowd_skip_or_ignore(tmp_path: Path):
    annotations = [
        _ann(1, 7, 1, _box(22, 12, 14, 14)),
        _ann(900000000001, 7, 1, _crowd_rle(30, 40, 30), iscrowd=1),
        _ann(900000000002, 8, 1, _crowd_rle(30, 40, 10), iscrowd=1),  # an image with only a crowd
    ]
    ann, img_dir = _write_coco(tmp_path, annotations, image_ids=(7, 8))
    skip = prepare_coco_semantic(ann, img_dir, tmp_path / "skip")
    ignore = prepare_coco_semantic(ann, img_dir, tmp_path / "ignore", crowd="ignore")
    for summary in (skip, ignore):
        assert summary["written"] == 1 and summary["skipped_images"] == {
            "no_valid_annotation": {"count": 1, "examples": [8]}}
    assert skip["skipped_annotations"] == {"crowd_skipped": {"count": 2, "examples": [900000000001, 900000000002]}}
    assert ignore["skipped_annotations"] == {}
    person = np.zeros((30, 40), np.uint8)
    person[12:26, 22:36] = PERSON
    np.testing.assert_array_equal(read_mask(tmp_path / "skip" / "masks" / "000000000007.png"), person)
    expected = person.copy()
    expected[:, 30:][person[:, 30:] == 0] = 255  # the person stays on top of the crowd region
    np.testing.assert_array_equal(read_mask(tmp_path / "ignore" / "masks" / "000000000007.png"), expected)
    assert not (tmp_path / "ignore" / "masks" / "000000000008.png").exists()


def test_prepare_skips_and_summary(tmp_path: Path):
    annotations = [
        _ann(1, 7, 1, _box(1, 1, 5, 5)),
        _ann(2, 8, 1, _box(1, 1, 5, 5)),  # image file missing
        _ann(3, 9, 1, _box(1, 1, 5, 5)),  # image file unreadable
        _ann(4, 10, 1, _box(1, 1, 5, 5)),  # image file of another size
        _ann(5, 12, 1, [[1, 1, 5, 5]]),  # a 2-point polygon: no valid annotation left
        _ann(6, 13, 1, [[0, 0, 10, 0, 20, 0]]),  # valid, but covers no pixel: empty mask
        _ann(7, 99, 1, _box(1, 1, 5, 5)),  # unknown image
        _ann(8, 7, 5, _box(1, 1, 5, 5)),  # unknown category
        {"id": 9, "image_id": 7, "category_id": 1, "iscrowd": 0, "bbox": [1, 1, 2, 2]},  # bbox only
    ]
    ids = (7, 8, 9, 10, 11, 12, 13)  # 11 has no annotation at all
    ann, img_dir = _write_coco(tmp_path, annotations, image_ids=ids)
    (img_dir / "000000000008.png").unlink()
    (img_dir / "000000000009.png").write_bytes(b"garbage")
    Image.new("RGB", (20, 20)).save(img_dir / "000000000010.png")
    out = tmp_path / "out"
    summary = prepare_coco_semantic(ann, img_dir, out)
    assert summary["images"] == 7 and summary["written"] == 1
    counts = {reason: entry["count"] for reason, entry in summary["skipped_images"].items()}
    assert counts == {"image_missing": 1, "image_unreadable": 1, "size_mismatch": 1, "no_valid_annotation": 2,
                      "empty_mask": 1}
    assert summary["written"] + sum(counts.values()) == summary["images"]
    assert summary["skipped_images"]["no_valid_annotation"]["examples"] == [11, 12]
    ann_counts = {reason: entry["count"] for reason, entry in summary["skipped_annotations"].items()}
    assert ann_counts == {"unknown_image": 1, "unknown_category": 1, "no_segmentation": 1,
                          "polygon_part_dropped": 1, "empty_polygon": 1}
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["000000000007.png"]
    assert json.loads((out / "summary.json").read_text()) == summary
    assert not (out / "images").exists() and summary["images_dir"] is None and summary["visualizations"] == []
    with pytest.raises(ValueError, match="crowd must be one of"):
        prepare_coco_semantic(ann, img_dir, out, crowd="keep")
    with pytest.raises(DataError, match="image directory not found"):
        prepare_coco_semantic(ann, tmp_path / "nope", out)


def test_prepare_visualize_and_link_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    annotations = [_ann(i, image_id, 20, _box(2 + i, 3, 9, 8)) for i, image_id in enumerate((7, 8, 9, 10))]
    ann, img_dir = _write_coco(tmp_path, annotations, image_ids=(7, 8, 9, 10))
    (img_dir / "000000000010.png").unlink()
    summary = prepare_coco_semantic(ann, img_dir, tmp_path / "out", visualize=2, link_images=True, seed=3)
    triptychs = sorted((tmp_path / "out" / "visualizations").iterdir())
    assert len(triptychs) == 2 and [str(p) for p in triptychs] == summary["visualizations"]
    for path in triptychs:
        shot = np.asarray(Image.open(path))
        image = read_rgb(img_dir / path.name)
        mask = read_mask(tmp_path / "out" / "masks" / path.name)
        assert shot.shape == (30, 120, 3)
        np.testing.assert_array_equal(shot, triptych(image, mask))
        np.testing.assert_array_equal(shot[:, :40], image)
        np.testing.assert_array_equal(shot[:, 40:80], voc_palette()[mask])
    links = sorted((tmp_path / "out" / "images").iterdir())
    assert [p.name for p in links] == ["000000000007.png", "000000000008.png", "000000000009.png"]
    assert all(p.is_symlink() and p.resolve() == (img_dir / p.name).resolve() for p in links)
    pairs = load_folder_pairs(tmp_path / "out" / "images", tmp_path / "out" / "masks")
    assert [p.id for p in pairs] == ["000000000007", "000000000008", "000000000009"]
    assert Path(pairs[0].image_path).is_symlink()
    # Asking for more triptychs than masks gives one per mask.
    assert len(prepare_coco_semantic(ann, img_dir, tmp_path / "all", visualize=10)["visualizations"]) == 3

    def no_symlinks(self, target):
        raise OSError("symlinks not supported")

    monkeypatch.setattr(Path, "symlink_to", no_symlinks)
    prepare_coco_semantic(ann, img_dir, tmp_path / "copied", link_images=True)
    copies = sorted((tmp_path / "copied" / "images").iterdir())
    assert len(copies) == 3 and not any(p.is_symlink() for p in copies)
    assert all(p.read_bytes() == (img_dir / p.name).read_bytes() for p in copies)


def test_prepare_tinycoco_matches_pycocotools(realdata: Path, tmp_path: Path):
    summary = prepare_coco_semantic(realdata / TINY_ANN, realdata / TINY_IMG, tmp_path / "out", crowd="ignore")
    assert summary["written"] == 6 and summary["skipped_images"] == {} and summary["num_classes"] == 81
    gt = COCO(str(realdata / TINY_ANN))
    names = load_class_names(tmp_path / "out" / "classes.json")
    assert names[0] == "background" and names[1] == "person" and len(names) == 81
    index = {cat_id: i + 1 for i, cat_id in enumerate(sorted(gt.cats))}
    assert names[index[67]] == "dining table"
    for image_id, info in gt.imgs.items():
        # Reference: crowds first as 255, then objects from the largest to the smallest.
        anns = gt.imgToAnns[image_id]
        expected = np.zeros((info["height"], info["width"]), np.uint8)
        objects = sorted(((a["iscrowd"] == 0, -int(gt.annToMask(a).sum()), k) for k, a in enumerate(anns)))
        for _, _, k in objects:
            expected[gt.annToMask(anns[k]) > 0] = 255 if anns[k]["iscrowd"] else index[anns[k]["category_id"]]
        mask = read_mask(tmp_path / "out" / "masks" / f"{image_id:012d}.png")
        np.testing.assert_array_equal(mask, expected)
    # The wine glasses standing on the table of 516168 stay visible: larger objects are painted first.
    glasses = [a for a in gt.imgToAnns[516168] if a["category_id"] == 46 and not a["iscrowd"]]
    union = np.any([gt.annToMask(a) for a in glasses], axis=0)
    mask = read_mask(tmp_path / "out" / "masks" / "000000516168.png")
    assert (mask[union] == index[46]).mean() > 0.9 and (mask == 255).any()
    skipped = prepare_coco_semantic(realdata / TINY_ANN, realdata / TINY_IMG, tmp_path / "skip")
    assert skipped["skipped_annotations"]["crowd_skipped"]["count"] == 1
    assert not (read_mask(tmp_path / "skip" / "masks" / "000000516168.png") == 255).any()


def test_prepare_cli(tmp_path: Path):
    ann, img_dir = _write_coco(tmp_path, _SCENE + [_ann(9, 7, 1, _crowd_rle(30, 40, 36), iscrowd=1)])
    out = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "prepare_coco_semantic.py"), "--ann", str(ann),
           "--img_dir", str(img_dir), "--out_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    flags = ["--class_priority", " cup, dining table", "--crowd", "ignore", "--visualize", "1", "--link_images"]
    result = subprocess.run(cmd + flags, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert f"wrote 1 of 1 masks into {out / 'masks'} (4 classes incl. background)" in result.stdout
    mask = read_mask(out / "masks" / "000000000007.png")
    assert (mask[0:20, 0:30] == TABLE).all() and (mask[:, 36:] == 255).any() and not (mask == CUP).any()
    assert len(list((out / "visualizations").iterdir())) == 1 and (out / "images" / "000000000007.png").is_symlink()
    assert json.loads((out / "summary.json").read_text())["class_priority"] == ["cup", "dining table"]
    bad = subprocess.run(cmd + ["--class_priority", "table"], capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "unknown class(es) in class_priority: ['table']" in bad.stderr


# ---------------------------------------------------------------- demo data


def test_voc_demo(tmp_path: Path):
    base = demo.write_voc_demo(tmp_path / "a", num_train=6, num_val=3, size=(96, 72), seed=1)
    assert base == tmp_path / "a" / "VOCdevkit" / "VOC2012"
    counts = {split: len(load_voc_split(tmp_path / "a", split)) for split in ("train", "val", "trainval")}
    assert counts == {"train": 6, "val": 3, "trainval": 9}
    classes, with_void = set(), 0
    for pair in load_voc_split(base, "trainval"):
        with Image.open(pair.mask_path) as img:
            assert img.mode == "P" and img.size == (96, 72)
        mask = read_mask(pair.mask_path)
        values = set(np.unique(mask).tolist())
        classes |= values - {0, 255}
        with_void += 255 in values
        assert values - {0, 255} and 0 in values
        # The void band follows outlines, it does not cover objects.
        assert (mask == 255).mean() < 0.2
        ex = make_seg_example(pair, rng=np.random.default_rng(0), crop_size=48)
        assert ex["image_ok"]
    assert with_void == 9 and len(classes) >= 3 and classes <= set(range(1, 21))

    # Idempotent (nothing rewritten), deterministic (same bytes elsewhere), rewritten on new parameters.
    jpeg = base / "JPEGImages" / "2008_000000.jpg"
    stamp = os.stat(jpeg).st_mtime_ns
    assert demo.write_voc_demo(tmp_path / "a", num_train=6, num_val=3, size=(96, 72), seed=1) == base
    assert os.stat(jpeg).st_mtime_ns == stamp
    other = demo.write_voc_demo(tmp_path / "b", num_train=6, num_val=3, size=(96, 72), seed=1)
    for rel in ("JPEGImages/2009_000002.jpg", "SegmentationClass/2008_000005.png", "ImageSets/Segmentation/val.txt"):
        assert (other / rel).read_bytes() == (base / rel).read_bytes()
    demo.write_voc_demo(tmp_path / "a", num_train=7, num_val=3, size=(96, 72), seed=1)
    assert len(load_voc_split(base, "train")) == 7


def test_coco_semantic_demo(tmp_path: Path):
    paths = demo.write_coco_semantic_demo(tmp_path / "a", num_train=6, num_val=3, size=(96, 80))
    names = load_class_names(paths["classes"])
    assert names == ["background", "person", "car", "airplane", "bottle", "dining table", "tv"]
    used = set()
    for split, count in (("train", 6), ("val", 3)):
        gt = COCO(paths[f"{split}_ann"])
        assert len(gt.imgs) == count
        pairs = load_folder_pairs(paths[f"{split}_images"], paths[f"{split}_masks"])
        assert len(pairs) == count and all(Path(p.image_path).is_symlink() for p in pairs)
        for pair in pairs:
            mask = read_mask(pair.mask_path)
            assert mask.shape == (80, 96) and set(np.unique(mask).tolist()) <= set(range(len(names))) | {255}
            used |= set(np.unique(mask).tolist()) - {0, 255}
    assert len(used) >= 4
    train = COCO(paths["train_ann"])
    crowds = [a for a in train.anns.values() if a["iscrowd"]]
    assert crowds and all(isinstance(a["segmentation"]["counts"], list) for a in crowds)
    crowd_image = f"{crowds[0]['image_id']:012d}.png"
    assert (read_mask(Path(paths["train_masks"]) / crowd_image) == 255).any()
    # Annotations of different categories overlap (whole objects: bottles on tables and the like).
    overlapping = 0
    for image_id in train.imgs:
        anns = [a for a in train.imgToAnns[image_id] if not a["iscrowd"]]
        masks = [train.annToMask(a) for a in anns]
        overlapping += any((masks[i] & masks[j]).any() for i in range(len(anns)) for j in range(i)
                           if anns[i]["category_id"] != anns[j]["category_id"])
    assert overlapping >= 1

    stamp = os.stat(paths["train_ann"]).st_mtime_ns
    assert demo.write_coco_semantic_demo(tmp_path / "a", num_train=6, num_val=3, size=(96, 80)) == paths
    assert os.stat(paths["train_ann"]).st_mtime_ns == stamp
    other = demo.write_coco_semantic_demo(tmp_path / "b", num_train=6, num_val=3, size=(96, 80))
    assert Path(other["val_ann"]).read_bytes() == Path(paths["val_ann"]).read_bytes()
    first = sorted(Path(paths["train_masks"]).iterdir())[0]
    assert (Path(other["train_masks"]) / first.name).read_bytes() == first.read_bytes()
    # A smaller rewrite leaves no stale masks behind.
    demo.write_coco_semantic_demo(tmp_path / "a", num_train=4, num_val=3, size=(96, 80))
    assert len(load_folder_pairs(paths["train_images"], paths["train_masks"])) == 4
