"""COCO person data: loading rules on real fixtures, masks, ROI targets, examples, demo, preparation."""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from segjax.data import coco, demo, prepare, transforms
from segjax.data.coco import PersonImage, PersonRoiSource, load_person_index
from segjax.data.errors import DataError, SkipReport
from segjax.data.files import BadImage, read_rgb
from segjax.data.transforms import make_roi_example, resize_letterbox, roi_targets

REPO = Path(__file__).resolve().parents[1]
TINY_ANN = "super_gradients/tests/data/tinycoco/annotations/instances_val2017.json"
TINY_IMG = "super_gradients/tests/data/tinycoco/images/val2017"
ICE_ANN = "icevision/samples/annotations.json"
ICE_IMG = "icevision/samples/images"
MMDET_ANN = "mmdetection/tests/data/coco_sample.json"
RESULTS = "cocoapi/results/instances_val2014_fakesegm100_results.json"
MMCV = "mmcv/tests/data"
TINY_CROWD_ID = 904600516168  # the real crowd annotation (a wine glass) in tinycoco, id > 2**31


@pytest.fixture
def tiny_person_crowd(realdata: Path, tmp_path: Path) -> Path:
    """tinycoco with its crowd annotation relabelled as person, so person crowd RLE is exercised."""
    data = json.loads((realdata / TINY_ANN).read_text())
    (crowd,) = [a for a in data["annotations"] if a["id"] == TINY_CROWD_ID]
    crowd["category_id"] = 1
    path = tmp_path / "instances_val2017.json"
    path.write_text(json.dumps(data))
    return path


def _write_coco(root: Path, annotations: list[dict], size: tuple[int, int] = (40, 30), num_images: int = 2) -> Path:
    """A hand-made COCO file with num_images PNGs of size (w, h), ids 7, 8, ..."""
    width, height = size
    images = []
    for i in range(num_images):
        name = f"{7 + i:012d}.png"
        Image.fromarray(np.full((height, width, 3), 40 * i, np.uint8)).save(root / name)
        images.append({"id": 7 + i, "file_name": name, "height": height, "width": width})
    path = root / "ann.json"
    categories = [{"id": 1, "name": "person"}, {"id": 3, "name": "car"}]
    path.write_text(json.dumps({"info": None, "images": images, "annotations": annotations, "categories": categories}))
    return path


def _box_polygon(x: float, y: float, w: float, h: float) -> list[float]:
    return [x, y, x + w, y, x + w, y + h, x, y + h]


# ---------------------------------------------------------------- loading real COCO fixtures


def test_tinycoco_loads_and_counts(realdata: Path):
    images, report = load_person_index(realdata / TINY_ANN, realdata / TINY_IMG)
    assert len(images) == 5 and sum(len(im.persons) for im in images) == 27
    # The only crowd annotation is a wine glass, and 471345 shows nobody.
    assert all(not im.crowds for im in images)
    assert report.counts == {"no_person": 1} and report.examples["no_person"] == [471345]
    by_id = {im.image_id: im for im in images}
    assert len(by_id[444010].persons) == 12 and (by_id[547503].width, by_id[547503].height) == (500, 375)
    assert all(os.path.isabs(im.path) and os.path.isfile(im.path) for im in images)
    assert pickle.loads(pickle.dumps(images)) == images


def test_person_crowd_rle_and_masks_match_pycocotools(realdata: Path, tiny_person_crowd: Path):
    images, _ = load_person_index(tiny_person_crowd, realdata / TINY_IMG)
    by_id = {im.image_id: im for im in images}
    (crowd,) = by_id[516168].crowds
    assert crowd["id"] == TINY_CROWD_ID and isinstance(crowd["segmentation"]["counts"], list)
    gt = COCO(str(tiny_person_crowd))
    for image in images:
        person_masks, crowd_mask = coco.instance_masks(image)
        assert person_masks.shape == (len(image.persons), image.height, image.width)
        assert person_masks.dtype == np.uint8 and crowd_mask.dtype == np.uint8
        for mask, person in zip(person_masks, image.persons):
            np.testing.assert_array_equal(mask, gt.annToMask(gt.anns[person["id"]]))
        expected_crowd = np.zeros((image.height, image.width), np.uint8)
        for c in image.crowds:
            expected_crowd |= gt.annToMask(gt.anns[c["id"]])
        np.testing.assert_array_equal(crowd_mask, expected_crowd)
    assert crowd_mask.sum() == 0 and coco.instance_masks(by_id[516168])[1].sum() > 1000


def test_icevision_ids_from_89_and_portrait(realdata: Path):
    images, report = load_person_index(realdata / ICE_ANN, realdata / ICE_IMG, require_persons=False)
    assert report.total == 0
    assert sorted(im.image_id for im in images)[0] == 89
    portrait = {im.image_id: im for im in images}[404249]
    assert (portrait.width, portrait.height, len(portrait.persons)) == (427, 640, 1)
    ex = make_roi_example((portrait, (0,)), image_size=128, max_rois=2)
    content_w = round(427 * 128 / 640)
    assert ex["image_ok"] and ex["image"][:, content_w:].max() == 0 and ex["image"][:, : content_w - 1].max() > 0
    x1, y1, w, h = portrait.persons[0]["bbox"]
    np.testing.assert_allclose(ex["rois"][0], np.array([x1, y1, x1 + w, y1 + h]) * 128 / 640, rtol=1e-6)
    assert ex["roi_valid"].tolist() == [True, False] and ex["targets"][1].max() == 0


def test_mmdetection_bbox_only_all_skipped_with_reasons(realdata: Path, tmp_path: Path):
    with pytest.raises(DataError, match=r"no 'person' category.*bus"):
        load_person_index(realdata / MMDET_ANN, tmp_path)
    # Rename "bus" to "person": the bbox-only annotations and missing files are then counted.
    data = json.loads((realdata / MMDET_ANN).read_text())
    data["categories"][0]["name"] = "person"
    ann = tmp_path / "sample.json"
    ann.write_text(json.dumps(data))
    images, report = load_person_index(ann, tmp_path)
    assert images == [] and report.counts == {"no_segmentation": 2, "no_person": 3}
    assert report.examples["no_segmentation"] == [1, 3]
    images, report = load_person_index(ann, tmp_path, require_persons=False)
    assert images == [] and report.counts == {"no_segmentation": 2, "image_missing": 3}


def test_real_compressed_rle(realdata: Path, tmp_path: Path):
    """Person masks from the cocoapi results file (compressed RLE strings) as an instances file."""
    results = [r for r in json.loads((realdata / RESULTS).read_text()) if r["category_id"] == 1][:40]
    sizes = {r["image_id"]: r["segmentation"]["size"] for r in results}
    images = [{"id": i, "file_name": f"{i}.jpg", "height": h, "width": w} for i, (h, w) in sizes.items()]
    for image in images:
        (tmp_path / image["file_name"]).touch()  # indexing only checks that the file exists
    anns = [
        {"id": k, "image_id": r["image_id"], "category_id": 1, "segmentation": r["segmentation"],
         "bbox": mask_utils.toBbox(r["segmentation"]).tolist()}
        for k, r in enumerate(results)
    ]
    ann_file = tmp_path / "ann.json"
    categories = [{"id": 1, "name": "person"}]
    ann_file.write_text(json.dumps({"images": images, "annotations": anns, "categories": categories}))
    index, report = load_person_index(ann_file, tmp_path)
    assert report.total == 0 and sum(len(im.persons) for im in index) == len(results) == 40
    for image in index:
        masks, _ = coco.instance_masks(image)
        for mask, person in zip(masks, image.persons):
            np.testing.assert_array_equal(mask, mask_utils.decode(results[person["id"]]["segmentation"]))


# ---------------------------------------------------------------- cleaning rules on hand-made files


def test_cleaning_rules_each_counted(tmp_path: Path):
    h, w = 30, 40
    person_rle = np.zeros((h, w), np.uint8, order="F")
    person_rle[5:20, 25:35] = 1
    compressed = mask_utils.encode(person_rle)
    square = [_box_polygon(1, 1, 5, 5)]

    def ann(ann_id: int, segmentation: object = square, image_id: int = 7, category_id: int = 1, bbox=(1, 1, 5, 5)):
        return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": list(bbox),
                "segmentation": segmentation}

    anns = [
        # kept: no iscrowd key, one valid part plus a 4-number part that must be dropped
        ann(1, [_box_polygon(2, 2, 10, 10), [1, 2, 3, 4]], bbox=(2, 2, 10, 10)),
        # kept: compressed RLE (string counts), id above int32
        {**ann(2**40, {"size": [h, w], "counts": compressed["counts"].decode()}, bbox=(25, 5, 10, 15)), "iscrowd": 0},
        ann(3, [[1, 2, 3, 4]]),
        ann(4, bbox=(1, 1, 0, 5)),
        ann(5, category_id=99),
        ann(6, image_id=1234),
        {k: v for k, v in ann(7).items() if k != "segmentation"},
        ann(8, {"size": [h + 1, w], "counts": "abc"}),
        ann(9, {"size": [h, w], "counts": [3, 4]}),
        ann(12, {"size": [h, w], "counts": "0T^2"}),  # a 50x50 mask's string: wrong pixel total
        ann(10, bbox=(50, 1, 5, 5)),  # entirely right of the 40 px wide image
        # a car is ignored, not skipped; image 8 then has no person
        ann(11, image_id=8, category_id=3),
    ]
    images, report = load_person_index(_write_coco(tmp_path, anns), tmp_path)
    assert report.counts == {
        "polygon_part_dropped": 2,
        "empty_polygon": 1,
        "degenerate_box": 2,
        "unknown_category": 1,
        "unknown_image": 1,
        "no_segmentation": 1,
        "bad_segmentation": 3,
        "no_person": 1,
    }
    assert report.examples["degenerate_box"] == [4, 10] and report.examples["bad_segmentation"] == [8, 9, 12]
    (image,) = images
    assert image.image_id == 7 and [p["id"] for p in image.persons] == [1, 2**40]
    assert image.persons[0]["segmentation"] == [_box_polygon(2, 2, 10, 10)]
    masks, crowd = coco.instance_masks(image)
    np.testing.assert_array_equal(masks[1], person_rle)
    assert masks[0][3:11, 3:11].all() and masks[0].sum() < 12 * 12 and crowd.sum() == 0


def test_skip_report_log_one_line_per_reason(caplog: pytest.LogCaptureFixture):
    report = SkipReport()
    for i in range(5):
        report.add("image_missing", i)
    report.add("degenerate_box", 99)
    with caplog.at_level(logging.INFO):
        report.log(logging.getLogger("t"), "train")
    assert len(caplog.records) == 2
    assert "skipped 5 (image_missing), e.g. [0, 1, 2]" in caplog.text and "degenerate_box" in caplog.text


def test_missing_image_file(realdata: Path, tmp_path: Path):
    data = json.loads((realdata / TINY_ANN).read_text())
    for image in data["images"][:3]:
        (tmp_path / image["file_name"]).write_bytes((realdata / TINY_IMG / image["file_name"]).read_bytes())
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps(data))
    images, report = load_person_index(ann, tmp_path)
    assert report.counts == {"no_person": 1, "image_missing": 3} and len(images) == 2
    with pytest.raises(BadImage, match="not found"):
        read_rgb(tmp_path / "nope.jpg")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        ("{not json", "not valid JSON"),
        ('{"images": [], "annotations": []}', r"missing or non-list key\(s\) \['categories'\]"),
        ('{"images": [{"id": 1}], "annotations": [], "categories": []}', r"images\[0\] is not a dict with keys"),
        ("42", "top level is int"),
    ],
)
def test_malformed_annotation_files(tmp_path: Path, content: str | None, message: str):
    path = tmp_path / "bad.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=message) as err:
        load_person_index(path, tmp_path)
    assert "bad.json" in str(err.value)


def test_results_file_is_not_instances(realdata: Path):
    with pytest.raises(DataError, match="results file"):
        load_person_index(realdata / RESULTS, realdata)


# ---------------------------------------------------------------- ROI targets


def _hand_masks() -> tuple[np.ndarray, np.ndarray]:
    """4x4 image: person 0 = columns 0-1, person 1 = column 2 plus pixel (0, 1), crowd = (2:4, 3)."""
    persons = np.zeros((2, 4, 4), np.uint8)
    persons[0, :, 0:2] = 1
    persons[1, :, 2] = 1
    persons[1, 0, 1] = 1
    crowd = np.zeros((4, 4), np.uint8)
    crowd[2:, 3] = 1
    return persons, crowd


def test_roi_targets_exact():
    persons, crowd = _hand_masks()
    boxes = np.array([[0, 0, 4, 4], [-2, 0, 6, 4], [0.6, 0, 2.6, 4], [0, -4, 4, 4]], np.float32)
    targets = roi_targets(persons, crowd, [0, 1, 0, 1], boxes, mask_size=4)
    expected_own = [[1, 1, 2, 0], [1, 1, 2, 0], [1, 1, 2, 2], [1, 1, 2, 2]]
    # Bin centres x = -1, 1, 3, 5: the outer two fall outside the image.
    expected_wide = [[0, 1, 0, 0], [0, 2, 0, 0], [0, 2, 2, 0], [0, 2, 2, 0]]
    # Bin centres x = 0.85, 1.35, 1.85, 2.35 sample pixels 0, 1, 1, 2.
    expected_frac = [[1, 1, 1, 2]] * 4
    # Bin centres y = -3, -1, 1, 3: top half outside.
    expected_tall = [[0, 0, 0, 0], [0, 0, 0, 0], [2, 2, 1, 0], [2, 2, 1, 2]]
    assert targets.dtype == np.uint8 and targets.shape == (4, 4, 4)
    np.testing.assert_array_equal(targets, [expected_own, expected_wide, expected_frac, expected_tall])


def test_roi_targets_match_loop_reference():
    rng = np.random.default_rng(0)
    persons = (rng.random((3, 9, 11)) < 0.3).astype(np.uint8)
    crowd = (rng.random((9, 11)) < 0.2).astype(np.uint8)
    boxes = np.concatenate([rng.uniform(-3, 6, (6, 2)), rng.uniform(7, 14, (6, 2))], axis=1)
    ids = rng.integers(0, 3, 6)
    targets = roi_targets(persons, crowd, ids, boxes, mask_size=5)
    for r, (x1, y1, x2, y2) in enumerate(boxes):
        for i in range(5):
            for j in range(5):
                y, x = int(np.floor(y1 + (i + 0.5) * (y2 - y1) / 5)), int(np.floor(x1 + (j + 0.5) * (x2 - x1) / 5))
                want = 0
                if 0 <= y < 9 and 0 <= x < 11:
                    others = crowd[y, x] or any(persons[p, y, x] for p in range(3) if p != ids[r])
                    want = 1 if persons[ids[r], y, x] else 2 if others else 0
                assert targets[r, i, j] == want


# ---------------------------------------------------------------- images


def test_odd_images(realdata: Path, tmp_path: Path):
    raw = read_rgb(realdata / MMCV / "color_exif.jpg", exif_transpose=False)
    upright = read_rgb(realdata / MMCV / "color_exif.jpg")
    assert raw.shape == (300, 400, 3) and upright.shape == (400, 300, 3)
    np.testing.assert_array_equal(upright, np.rot90(raw, -1))  # orientation 6: rotate 90 degrees clockwise
    grey = read_rgb(realdata / MMCV / "grayscale.jpg")
    assert grey.shape == (300, 400, 3) and grey.dtype == np.uint8
    np.testing.assert_array_equal(grey[..., 0], np.asarray(Image.open(realdata / MMCV / "grayscale.jpg")))
    assert (grey[..., 0] == grey[..., 2]).all()
    la = read_rgb(realdata / MMCV / "gray_alpha.png")
    luminance = np.asarray(Image.open(realdata / MMCV / "gray_alpha.png"))[..., 0]
    assert la.shape == (400, 500, 3)
    np.testing.assert_array_equal(la, np.repeat(luminance[..., None], 3, axis=2))

    rgba = np.zeros((5, 6, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 200, 0  # fully transparent: the colour must survive (alpha dropped)
    Image.fromarray(rgba).save(tmp_path / "rgba.png")
    np.testing.assert_array_equal(read_rgb(tmp_path / "rgba.png"), np.full((5, 6, 3), 200, np.uint8))
    pal = Image.fromarray(np.array([[0, 1], [1, 0]], np.uint8), mode="P")
    pal.putpalette([10, 20, 30, 200, 100, 50])
    pal.save(tmp_path / "pal.png", transparency=0)
    np.testing.assert_array_equal(read_rgb(tmp_path / "pal.png")[0, :, :], [[10, 20, 30], [200, 100, 50]])
    deep = np.array([[0, 257 * 100], [65535, 30000]], np.uint16)
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    np.testing.assert_array_equal(read_rgb(tmp_path / "deep.png")[..., 1], [[0, 100], [255, 117]])
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))
    cmyk.save(tmp_path / "cmyk.tif")
    np.testing.assert_array_equal(read_rgb(tmp_path / "cmyk.tif"), np.full((2, 3, 3), [255, 0, 0], np.uint8))
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(BadImage, match="text.jpg: cannot decode"):
        read_rgb(tmp_path / "text.jpg")


def test_truncated_jpeg(realdata: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    images, _ = load_person_index(realdata / TINY_ANN, realdata / TINY_IMG)
    image = images[0]
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(Path(image.path).read_bytes()[:60_000])
    with pytest.raises(BadImage, match="cut.jpg: cannot decode.*truncated"):
        read_rgb(cut)
    with caplog.at_level(logging.WARNING):
        entry = (dataclasses.replace(image, path=str(cut)), (0, 1))
        ex = make_roi_example(entry, image_size=64, max_rois=3, rng=np.random.default_rng(0))
    assert not ex["image_ok"] and not ex["roi_valid"].any() and ex["image_id"] == image.image_id
    assert ex["image"].shape == (64, 64, 3) and ex["targets"].shape == (3, 56, 56) and ex["rois"].shape == (3, 4)
    assert "cut.jpg" in caplog.text and "truncated" in caplog.text


def test_size_mismatch_and_exif_fallback(realdata: Path, caplog: pytest.LogCaptureFixture):
    person = {"id": 1, "bbox": [10.0, 10.0, 50.0, 80.0], "segmentation": [_box_polygon(10, 10, 50, 80)]}
    # Stored 400x300 with EXIF rotation: annotations made on the stored pixels still fit.
    stored = PersonImage(1, str(realdata / MMCV / "color_exif.jpg"), 300, 400, (person,), ())
    ex = make_roi_example((stored, (0,)), image_size=100, max_rois=1)
    assert ex["image_ok"] and ex["image"][75:].max() == 0 and ex["image"][:74].max() > 0
    wrong = dataclasses.replace(stored, height=310)
    with caplog.at_level(logging.WARNING):
        ex = make_roi_example((wrong, (0,)), image_size=100, max_rois=1)
    assert not ex["image_ok"] and "size_mismatch" in caplog.text


def test_resize_letterbox():
    image = np.full((30, 60, 3), 200, np.uint8)
    out, scale = resize_letterbox(image, 40)
    assert out.shape == (40, 40, 3) and scale == pytest.approx(40 / 60)
    assert (out[:20] == 200).all() and (out[20:] == 0).all()


# ---------------------------------------------------------------- source and examples


def test_chunking_covers_all_persons(realdata: Path):
    images, _ = load_person_index(realdata / TINY_ANN, realdata / TINY_IMG)
    source = PersonRoiSource(images, max_rois=5)
    assert len(source) == sum(-(-len(im.persons) // 5) for im in images)
    covered: dict[int, list[int]] = {}
    for i in range(len(source)):
        image, ids = source[i]
        assert 1 <= len(ids) <= 5
        covered.setdefault(image.image_id, []).extend(ids)
    assert {k: sorted(v) for k, v in covered.items()} == {im.image_id: list(range(len(im.persons))) for im in images}
    assert len([1 for i in range(len(source)) if source[i][0].image_id == 444010]) == 3
    again = pickle.loads(pickle.dumps(source))
    assert len(again) == len(source) and again[4][1] == source[4][1]


def test_jitter_inside_image_and_deterministic(realdata: Path):
    images, _ = load_person_index(realdata / TINY_ANN, realdata / TINY_IMG)
    image = {im.image_id: im for im in images}[444010]  # people touch the top and left edges
    entry = (image, tuple(range(6)))
    kw = dict(image_size=96, max_rois=8, jitter=0.1, flip=False)
    a = make_roi_example(entry, rng=np.random.default_rng(3), **kw)
    b = make_roi_example(entry, rng=np.random.default_rng(3), **kw)
    c = make_roi_example(entry, rng=np.random.default_rng(4), **kw)
    plain = make_roi_example(entry, **kw)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert not np.array_equal(a["rois"], c["rois"]) and not np.array_equal(a["rois"], plain["rois"])
    # Each side moves by at most 10% of the box size, then is clipped to the image.
    size = np.tile(plain["rois"][:6, 2:] - plain["rois"][:6, :2], 2)
    assert (np.abs(a["rois"][:6] - plain["rois"][:6]) <= 0.1 * size + 1e-4).all()

    boxes = np.array([[0, 0, 640, 480], [0, 0, 1, 1], [639, 479, 640, 480], [100, 50, 200, 300]], float)
    rng = np.random.default_rng(0)
    for _ in range(200):
        out = transforms.jitter_boxes(boxes, rng, 0.3, 480, 640)
        assert (out >= 0).all() and (out[:, [0, 2]] <= 640).all() and (out[:, [1, 3]] <= 480).all()
        assert (out[:, 2:] - out[:, :2] >= 1 - 1e-9).all()


def test_flip_mirrors_targets(realdata: Path):
    images, _ = load_person_index(realdata / TINY_ANN, realdata / TINY_IMG)
    image = {im.image_id: im for im in images}[547503]
    entry = (image, (0, 1, 2, 3))
    kw = dict(image_size=100, max_rois=4, jitter=0.0, flip=True)
    plain = make_roi_example(entry, **kw)
    scale = 100 / 500
    flipped_count = 0
    for seed in range(8):
        ex = make_roi_example(entry, rng=np.random.default_rng(seed), **kw)
        if np.array_equal(ex["rois"], plain["rois"]):
            np.testing.assert_array_equal(ex["targets"], plain["targets"])
            continue
        flipped_count += 1
        x1, y1, x2, y2 = plain["rois"].T
        np.testing.assert_allclose(ex["rois"], np.stack([500 * scale - x2, y1, 500 * scale - x1, y2], 1), atol=1e-4)
        np.testing.assert_array_equal(ex["targets"], plain["targets"][:, :, ::-1])
        content = ex["image"][:75, :100].astype(int)
        assert np.abs(content - plain["image"][:75, ::-1].astype(int)).mean() < 2
    assert 0 < flipped_count < 8
    # Independent check: sampling flipped masks with flipped boxes gives the mirrored targets.
    masks, crowd = coco.instance_masks(image)
    boxes = plain["rois"] / scale
    flipped_boxes = np.stack([500 - boxes[:, 2], boxes[:, 1], 500 - boxes[:, 0], boxes[:, 3]], 1)
    direct = roi_targets(masks[:, :, ::-1], crowd[:, ::-1], [0, 1, 2, 3], flipped_boxes)
    np.testing.assert_array_equal(direct, plain["targets"][:, :, ::-1])


def test_example_targets_have_other_people(realdata: Path):
    images, _ = load_person_index(realdata / TINY_ANN, realdata / TINY_IMG)
    image = {im.image_id: im for im in images}[475546]
    ex = make_roi_example((image, tuple(range(6))), image_size=128, max_rois=8)
    assert ex["image_ok"] and ex["roi_valid"].tolist() == [True] * 6 + [False] * 2
    assert ex["image"].dtype == np.uint8 and ex["rois"].dtype == np.float32 and ex["image_id"].dtype == np.int64
    per_roi = [np.bincount(t.ravel(), minlength=3) for t in ex["targets"][:6]]
    assert all(c[1] > 500 for c in per_roi) and any(c[2] > 100 for c in per_roi)
    assert (ex["rois"][6:] == 0).all() and (ex["targets"][6:] == 0).all()


# ---------------------------------------------------------------- demo data


def test_demo_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    paths = demo.write_coco_person_demo(tmp_path / "a", num_train=6, num_val=3)
    for split, count in (("train", 6), ("val", 3)):
        gt = COCO(paths[f"{split}_ann"])
        assert len(gt.imgs) == count and gt.cats[1]["name"] == "person" and len(gt.cats) >= 2
        for info in gt.imgs.values():
            with Image.open(Path(paths[f"{split}_img_dir"]) / info["file_name"]) as img:
                assert img.size == (info["width"], info["height"]) == (160, 128)
        images, report = load_person_index(paths[f"{split}_ann"], paths[f"{split}_img_dir"])
        assert report.total == 0 and len(images) == count
    data = json.loads(Path(paths["train_ann"]).read_text())
    anns = data["annotations"]
    assert data["info"] and data["licenses"] and min(im["id"] for im in data["images"]) > 1
    people = [a for a in anns if a["category_id"] == 1 and not a["iscrowd"]]
    crowds = [a for a in anns if a["iscrowd"]]
    assert any(isinstance(a["segmentation"], list) for a in people)
    assert any(isinstance(a["segmentation"], dict) for a in people)
    assert crowds and all(isinstance(c["segmentation"]["counts"], list) and c["id"] > 2**31 for c in crowds)
    assert any(a["category_id"] != 1 for a in anns) or any(
        a["category_id"] != 1 for a in json.loads(Path(paths["val_ann"]).read_text())["annotations"]
    )
    gt = COCO(paths["train_ann"])
    overlapping = 0
    for image_id in gt.imgs:
        boxes = [a["bbox"] for a in gt.imgToAnns[image_id] if a["category_id"] == 1 and not a["iscrowd"]]
        if len(boxes) > 1:
            ious = mask_utils.iou(boxes, boxes, [0] * len(boxes))[np.triu_indices(len(boxes), 1)]
            overlapping += int(ious.max() > 0.05)
    assert overlapping >= 2

    # Idempotent (nothing rewritten) and deterministic (same bytes elsewhere).
    stamp = os.stat(paths["train_ann"]).st_mtime_ns
    assert demo.write_coco_person_demo(tmp_path / "a", num_train=6, num_val=3) == paths
    assert os.stat(paths["train_ann"]).st_mtime_ns == stamp
    other = demo.write_coco_person_demo(tmp_path / "b", num_train=6, num_val=3)
    assert Path(other["train_ann"]).read_bytes() == Path(paths["train_ann"]).read_bytes()
    first = sorted(Path(paths["train_img_dir"]).iterdir())[0]
    assert (Path(other["train_img_dir"]) / first.name).read_bytes() == first.read_bytes()

    monkeypatch.setenv("SEGJAX_DEMO_ROOT", str(tmp_path / "env"))
    assert demo.default_demo_root() == tmp_path / "env"
    monkeypatch.delenv("SEGJAX_DEMO_ROOT")
    assert demo.default_demo_root() == Path.home() / ".cache" / "segjax" / "demo"


# ---------------------------------------------------------------- preparation


def test_person_only_subset(tiny_person_crowd: Path, tmp_path: Path):
    out = prepare.person_only_subset(tiny_person_crowd, tmp_path / "out")
    assert out.name == "instances_val2017_person_only_no_crowd.json"
    data = json.loads(out.read_text())
    assert data["categories"] == [{"supercategory": "person", "id": 1, "name": "person"}]
    assert len(data["annotations"]) == 27 and len(data["images"]) == 5
    assert all(a["category_id"] == 1 and a["iscrowd"] == 0 for a in data["annotations"])
    sub = prepare.person_only_subset(tiny_person_crowd, tmp_path / "out", num_images=2, seed=1)
    assert sub.name == "instances_val2017_person_only_no_crowd_2.json"
    sub_data = json.loads(sub.read_text())
    kept = {im["id"] for im in sub_data["images"]}
    assert len(kept) == 2 and {a["image_id"] for a in sub_data["annotations"]} == kept
    assert len(sub_data["annotations"]) == sum(1 for a in data["annotations"] if a["image_id"] in kept)
    again = prepare.person_only_subset(tiny_person_crowd, tmp_path / "again", num_images=2, seed=1)
    assert again.read_bytes() == sub.read_bytes()


def _rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": rle["size"], "counts": rle["counts"].decode()}


def test_roi_class_stats(tmp_path: Path):
    a = np.zeros((4, 4), np.uint8)
    a[:, :2] = 1
    b = np.zeros((4, 4), np.uint8)
    b[:, 2] = 1
    crowd = np.zeros((4, 4), np.uint8)
    crowd[2:, 3] = 1
    # No JPEG is read: the path does not exist.
    image = PersonImage(
        1, "/nonexistent.jpg", 4, 4,
        (
            {"id": 1, "bbox": [0, 0, 4, 4], "segmentation": _rle(a)},
            {"id": 2, "bbox": [2, 0, 2, 4], "segmentation": _rle(b)},
        ),
        ({"id": 3, "segmentation": _rle(crowd)},),
    )
    # ROI a samples (1,1) a, (1,3) bg, (3,1) a, (3,3) crowd; ROI b samples (1,2) b, (1,3) bg, (3,2) b, (3,3) crowd.
    stats = prepare.compute_roi_class_stats([image], mask_size=2)
    assert stats["num_rois"] == 2 and stats["pixel_counts"] == [2, 4, 2]
    assert stats["class_frequencies"] == [0.25, 0.5, 0.25]
    assert stats["class_weights"] == pytest.approx([8 / 6, 8 / 12, 8 / 6])
    lonely = dataclasses.replace(image, persons=image.persons[:1], crowds=())
    assert prepare.compute_roi_class_stats([lonely], mask_size=2)["class_weights"][2] == 0.0
    path = prepare.write_stats(stats, tmp_path / "stats.json")
    assert prepare.read_stats(path) == json.loads(json.dumps(stats))
    for bad in ("{", json.dumps({**stats, "class_weights": [1.0]}), json.dumps({"num_rois": 1})):
        path.write_text(bad)
        with pytest.raises(DataError, match="stats.json"):
            prepare.read_stats(path)


def test_prepare_cli(realdata: Path, tiny_person_crowd: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    cmd = [sys.executable, str(REPO / "tools" / "prepare_coco_person.py"), "--ann", str(tiny_person_crowd),
           "--img_dir", str(realdata / TINY_IMG), "--out_dir", str(out_dir), "--num_images", "3", "--stats"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    ann = out_dir / "instances_val2017_person_only_no_crowd_3.json"
    assert f"wrote {ann}" in result.stdout and "usable: 3 images" in result.stdout
    stats = prepare.read_stats(out_dir / "instances_val2017_person_only_no_crowd_3_roi_stats.json")
    images, _ = load_person_index(ann, realdata / TINY_IMG)
    assert stats == json.loads(json.dumps(prepare.compute_roi_class_stats(images)))
    bad_cmd = cmd[:3] + [str(realdata / RESULTS)] + cmd[4:8]
    bad = subprocess.run(bad_cmd, capture_output=True, text=True, env=env, timeout=60)
    assert bad.returncode == 2 and "results file" in bad.stderr
