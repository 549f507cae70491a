"""Portrait memmaps: preparation rules and skips, sidecars, float16 files of the original pipeline,
size checks, lazy opening in grain workers, aligned augmentation, the CLI and the demo data."""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segjax.data import pipeline, prepare
from segjax.data.demo_portrait import prepare_portrait_demo, write_portrait_demo
from segjax.data.errors import DataError
from segjax.data.memmap import MemmapSource
from segjax.data.prepare import prepare_memmaps
from segjax.data.transforms import augment_portrait, eval_portrait

REPO = Path(__file__).resolve().parents[1]
S = 16
FG = (200, 100, 50)
# Train records in order: P3M pairs sorted by stem, then Supervisely folders sorted by path.
TRAIN_STEMS = ["palette", "sixteen", "tall", "wide", "a", "b"]


def _save_image(path: Path, width: int, height: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((height, width, 3), FG, np.uint8)).save(path)


def _save_mask(path: Path, mask: np.ndarray | Image.Image) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    (mask if isinstance(mask, Image.Image) else Image.fromarray(mask)).save(path)


def _left_half(height: int, width: int, on=255, off=0, dtype=np.uint8) -> np.ndarray:
    mask = np.full((height, width), off, dtype)
    mask[:, : width // 2] = on
    return mask


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """A P3M-10k layout and a Supervisely layout holding every case preparation must handle."""
    p3m = tmp_path / "P3M-10k"
    img, msk = p3m / "train" / "blurred_image", p3m / "train" / "mask"
    # 40x20 and 10x30: letterboxed with bottom and right padding; masks are soft-ish (100 < 128).
    _save_image(img / "wide.png", 40, 20)
    _save_mask(msk / "wide.png", _left_half(20, 40, off=100))
    _save_image(img / "tall.jpg", 10, 30)
    _save_mask(msk / "tall.png", np.full((30, 10), 255, np.uint8))
    # 16-bit: 40000 >= 128 * 257 is foreground, 30000 is not (a plain 8-bit conversion clips both to 255).
    _save_image(img / "sixteen.jpg", 32, 32)
    _save_mask(msk / "sixteen.png", _left_half(32, 32, on=40000, off=30000, dtype=np.uint16))
    # Palette: index 1 is a dark colour (grey 10) but a non-zero index, so foreground (top half).
    _save_image(img / "palette.jpg", 32, 32)
    indices = np.zeros((32, 32), np.uint8)
    indices[:16] = 1
    pal = Image.fromarray(indices, mode="P")
    pal.putpalette([0, 0, 0, 10, 10, 10] + [0] * 762)
    _save_mask(msk / "palette.png", pal)
    # Skipped cases.
    _save_image(img / "orphan_image.jpg", 16, 16)
    _save_mask(msk / "orphan_mask.png", np.zeros((16, 16), np.uint8))
    _save_image(img / "broken.jpg", 64, 64)
    data = (img / "broken.jpg").read_bytes()
    (img / "broken.jpg").write_bytes(data[: len(data) // 2])
    _save_mask(msk / "broken.png", np.zeros((64, 64), np.uint8))
    _save_image(img / "badmask.jpg", 16, 16)
    (msk / "badmask.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    _save_image(img / "mismatch.jpg", 32, 32)
    _save_mask(msk / "mismatch.png", np.zeros((30, 32), np.uint8))
    (img / "notes.txt").write_text("not an image")
    _save_image(img / "dup.jpg", 16, 16)  # two images share a stem: which one the mask belongs to is unknown
    _save_image(img / "dup.png", 16, 16)
    _save_mask(msk / "dup.png", np.zeros((16, 16), np.uint8))
    val = p3m / "validation" / "P3M-500-P"
    _save_image(val / "blurred_image" / "v1.jpg", 24, 24)
    _save_mask(val / "mask" / "v1.png", _left_half(24, 24))
    sup = tmp_path / "supervisely"
    _save_image(sup / "ds1" / "images" / "a.jpg", 20, 20)
    _save_mask(sup / "ds1" / "masks" / "a.png", _left_half(20, 20))
    _save_image(sup / "nested" / "deeper" / "images" / "b.png", 20, 20)
    _save_mask(sup / "nested" / "deeper" / "masks" / "b.png", _left_half(20, 20))
    _save_image(sup / "lonely" / "images" / "c.jpg", 20, 20)  # no sibling masks/: not a source
    return p3m, sup


def _prepare(folders, out: Path, **kwargs) -> dict:
    p3m, sup = folders
    return prepare_memmaps(p3m, out, supervisely_root=sup, size=S, **kwargs)


def test_prepare_pairs_skips_and_writes_sidecars(folders, tmp_path: Path):
    out = tmp_path / "out"
    summary = _prepare(folders, out)
    train, val = summary["splits"]["train"], summary["splits"]["val"]
    assert train["count"] == 6 and val["count"] == 1
    assert {r: v["count"] for r, v in train["skipped"].items()} == {
        "image_without_mask": 1, "mask_without_image": 1, "image_unreadable": 1, "mask_unreadable": 1,
        "size_mismatch": 1, "duplicate_stem": 1}
    assert train["skipped"]["image_unreadable"]["examples"][0].endswith("broken.jpg")
    assert train["skipped"]["mask_unreadable"]["examples"][0].endswith("badmask.png")
    assert val["skipped"] == {}
    assert Path(train["images"]).name == "train_16_u8_images.mmap"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        f"{split}_16_u8_{kind}.mmap{ext}" for split in ("train", "val") for kind in ("images", "masks")
        for ext in ("", ".json"))  # nothing temporary left behind

    meta = json.loads(Path(train["images"] + ".json").read_text())
    mask_meta = json.loads(Path(train["masks"] + ".json").read_text())
    assert (meta["count"], meta["shape"], meta["dtype"], meta["layout"]) == (6, [6, S, S, 3], "uint8", "NHWC")
    assert (mask_meta["shape"], mask_meta["layout"]) == ([6, S, S], "NHW")
    assert (meta["size"], meta["resize"], meta["mask_threshold"]) == (S, "letterbox", 128)
    assert [Path(f).stem for f in meta["source_files"]] == TRAIN_STEMS
    assert [Path(f).parent.name for f in mask_meta["source_files"]] == ["mask"] * 4 + ["masks"] * 2
    assert os.path.getsize(train["images"]) == 6 * S * S * 3  # truncated to the kept records

    source = MemmapSource(train["images"], train["masks"])
    rec = {stem: source[i] for i, stem in enumerate(TRAIN_STEMS)}
    wide = meta["records"][TRAIN_STEMS.index("wide")]
    # 40x20 -> 16x8 at the top, 8 rows of zero padding below.
    assert wide == {"orig_size": [20, 40], "scale": [0.4, 0.4], "pad": [0, 8, 0, 0]}
    assert (rec["wide"]["image"][:8] == FG).all() and (rec["wide"]["image"][8:] == 0).all()
    expected = np.zeros((S, S), np.uint8)
    expected[:8, :8] = 1  # 100 is below the threshold: the right half is background
    np.testing.assert_array_equal(rec["wide"]["mask"], expected)
    tall = meta["records"][TRAIN_STEMS.index("tall")]
    assert tall["orig_size"] == [30, 10] and tall["pad"] == [0, 0, 0, 11]  # 10 * 16/30 -> 5 columns
    assert (rec["tall"]["image"][:, 5:] == 0).all() and (np.abs(rec["tall"]["image"][:, :5] - np.int16(FG)) < 10).all()
    assert (rec["tall"]["mask"][:, :5] == 1).all() and (rec["tall"]["mask"][:, 5:] == 0).all()
    np.testing.assert_array_equal(rec["sixteen"]["mask"], _left_half(S, S, on=1))
    np.testing.assert_array_equal(rec["palette"]["mask"], np.repeat([[1], [0]], 8, axis=0) * np.ones((1, S), np.uint8))
    np.testing.assert_array_equal(rec["b"]["mask"], _left_half(S, S, on=1))
    assert all(r["image"].dtype == np.uint8 and r["mask"].dtype == np.uint8 for r in rec.values())


def test_stretch_and_threshold(folders, tmp_path: Path):
    summary = _prepare(folders, tmp_path / "out", resize="stretch", mask_threshold=100)
    train = summary["splits"]["train"]
    meta = json.loads(Path(train["images"] + ".json").read_text())
    i = TRAIN_STEMS.index("wide")
    assert meta["resize"] == "stretch" and meta["mask_threshold"] == 100
    assert meta["records"][i] == {"orig_size": [20, 40], "scale": [0.8, 0.4], "pad": [0, 0, 0, 0]}
    record = MemmapSource(train["images"], train["masks"])[i]
    assert (record["image"] == FG).all()
    assert (record["mask"] == 1).all()  # 100 >= 100: the soft half is now foreground too


def test_real_p3m_soft_alphas_are_thresholded(realdata: Path, tmp_path: Path):
    root = realdata / "p3m_assembled"  # the parent of P3M-10k/ is accepted too; read-only use
    summary = prepare_memmaps(root, tmp_path / "out", size=64)
    train = summary["splits"]["train"]
    assert train["count"] == 3 and summary["splits"]["val"]["count"] == 0  # no validation folder there
    meta = json.loads(Path(train["images"] + ".json").read_text())
    source = MemmapSource(train["images"], train["masks"])
    for i, (image_file, record) in enumerate(zip(meta["source_files"], meta["records"])):
        alpha = np.asarray(Image.open(Path(image_file).parents[1] / "mask" / f"{Path(image_file).stem}.png"))
        assert ((alpha > 0) & (alpha < 128)).any()  # soft: thresholding at > 0 would differ
        height, width = alpha.shape
        top, bottom, left, right = record["pad"]
        assert record["orig_size"] == [height, width] and top == left == 0
        content = (64 - bottom, 64 - right)
        assert max(content) == 64 and abs(content[0] / content[1] - height / width) < 0.05
        binary = Image.fromarray(((alpha >= 128) * 255).astype(np.uint8))
        want = np.asarray(binary.resize(content[::-1], Image.Resampling.NEAREST)) // 255
        got = source[i]["mask"]
        np.testing.assert_array_equal(got[: content[0], : content[1]], want)
        assert got[content[0]:].sum() == got[:, content[1]:].sum() == 0
        assert 0.05 < want.mean() < 0.95


def test_float16_matches_the_original_pipeline_files(folders, tmp_path: Path):
    u8 = _prepare(folders, tmp_path / "u8")["splits"]["train"]
    f16 = _prepare(folders, tmp_path / "f16", dtype="float16")["splits"]["train"]
    assert Path(f16["images"]).name == "train_16_fp16_images.mmap"
    assert Path(f16["masks"]).name == "train_16_fp16_masks.mmap"
    assert (tmp_path / "f16" / "val_16_fp16_images.mmap").is_file()
    meta = json.loads(Path(f16["images"] + ".json").read_text())
    assert (meta["dtype"], meta["layout"], meta["shape"]) == ("float16", "NCHW", [6, 3, S, S])
    # Read exactly as the original P3MMemmapDataset does: float16 (N, 3, H, W) and (N, 1, H, W).
    images = np.memmap(f16["images"], dtype=np.float16, mode="r", shape=(6, 3, S, S))
    masks = np.memmap(f16["masks"], dtype=np.float16, mode="r", shape=(6, 1, S, S))
    assert 0.0 <= images.min() and images.max() <= 1.0 and set(np.unique(masks)) == {0.0, 1.0}
    u8_images = np.memmap(u8["images"], dtype=np.uint8, mode="r", shape=(6, S, S, 3))
    u8_masks = np.memmap(u8["masks"], dtype=np.uint8, mode="r", shape=(6, S, S))
    np.testing.assert_array_equal(np.rint(images.astype(np.float32) * 255).transpose(0, 2, 3, 1), u8_images)
    np.testing.assert_array_equal(masks[:, 0], u8_masks)
    a, b = MemmapSource(f16["images"], f16["masks"]), MemmapSource(u8["images"], u8["masks"])
    for i in range(6):
        np.testing.assert_array_equal(a[i]["image"], b[i]["image"])
        np.testing.assert_array_equal(a[i]["mask"], b[i]["mask"])


def _original_pipeline_files(tmp_path: Path, n: int = 3, size: int = 8) -> tuple[Path, Path, np.ndarray, np.ndarray]:
    """float16 NCHW images in [0, 1] and N1HW masks, with no sidecar.

    Some masks of that pipeline were resized bilinearly and never re-binarised: soft values occur.
    """
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(n, 3, size, size))
    labels = rng.choice([0.0, 0.25, 0.75, 1.0], size=(n, 1, size, size))
    image_path, mask_path = tmp_path / "train_8_fp16_images.mmap", tmp_path / "train_8_fp16_masks.mmap"
    for path, values in ((image_path, pixels / 255.0), (mask_path, labels)):
        arr = np.memmap(path, dtype=np.float16, mode="w+", shape=values.shape)
        arr[:] = values
        arr.flush()
        del arr
    return image_path, mask_path, pixels.transpose(0, 2, 3, 1).astype(np.uint8), (labels[:, 0] >= 0.5).astype(np.uint8)


def test_original_pipeline_memmap_read_with_explicit_format(tmp_path: Path):
    image_path, mask_path, pixels, labels = _original_pipeline_files(tmp_path)
    for count in (3, None):  # None: implied by the file size
        source = MemmapSource(image_path, mask_path, dtype="float16", layout="NCHW", count=count, size=8)
        assert len(source) == 3
        for i in range(3):
            np.testing.assert_array_equal(source[i]["image"], pixels[i])
            np.testing.assert_array_equal(source[i]["mask"], labels[i])
            assert source[i]["image"].shape == (8, 8, 3) and source[i]["mask"].dtype == np.uint8
    with pytest.raises(DataError, match="no sidecar"):
        MemmapSource(image_path, mask_path)
    with pytest.raises(DataError, match="whole"):
        MemmapSource(image_path, mask_path, dtype="float16", layout="NCHW", size=7)


def test_size_mismatch_is_refused_with_expected_and_actual_bytes(folders, tmp_path: Path):
    image_path, mask_path, _, _ = _original_pipeline_files(tmp_path)
    with pytest.raises(DataError, match=r"expected 1536 bytes .*found 1152 bytes"):
        MemmapSource(image_path, mask_path, dtype="float16", layout="NCHW", count=4, size=8)
    with pytest.raises(DataError, match=r"expected 2304 bytes .*float32\), found 1152 bytes"):
        MemmapSource(image_path, mask_path, dtype="float32", layout="NCHW", count=3, size=8)
    train = _prepare(folders, tmp_path / "out")["splits"]["train"]
    with open(train["masks"], "ab") as f:
        f.write(b"\0" * 7)  # e.g. a copy that is not what its sidecar describes
    with pytest.raises(DataError, match=rf"train_16_u8_masks.mmap: expected {6 * S * S} bytes .*found {6 * S * S + 7}"):
        MemmapSource(train["images"], train["masks"])
    with pytest.raises(DataError, match="sidecar says"):
        MemmapSource(train["images"], train["masks"], count=5)
    val = _prepare(folders, tmp_path / "val_out")["splits"]["val"]
    # A mask file paired with images it does not belong to.
    with pytest.raises(DataError, match=r"train_16_u8_masks.mmap: its sidecar says count, size, dtype = \(6, 16"):
        MemmapSource(val["images"], train["masks"])


def test_a_crash_leaves_no_complete_looking_file(folders, tmp_path: Path, monkeypatch):
    out = tmp_path / "out"
    good = _prepare(folders, out)["splits"]["train"]
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    calls = []

    def crash(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fit(*args, **kwargs)

    fit = prepare._fit
    monkeypatch.setattr(prepare, "_fit", crash)
    with pytest.raises(KeyboardInterrupt):
        _prepare(folders, out, mask_threshold=90)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old complete files untouched
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        _prepare(folders, tmp_path / "fresh")
    assert list((tmp_path / "fresh").iterdir()) == []
    assert len(MemmapSource(good["images"], good["masks"])) == 6


def test_source_pickles_without_data_and_reads_in_grain_workers(folders, tmp_path: Path):
    train = _prepare(folders, tmp_path / "out")["splits"]["train"]
    source = MemmapSource(train["images"], train["masks"])
    direct = [source[i] for i in range(len(source))]  # opens the memmaps in this process
    blob = pickle.dumps(source)
    assert len(blob) < 1000 < os.path.getsize(train["images"])
    assert pickle.loads(blob)._arrays is None
    np.testing.assert_array_equal(pickle.loads(blob)[5]["image"], direct[5]["image"])
    for workers in (0, 2):
        batches = list(pipeline.eval_batches(source, eval_portrait, local_batch=4, global_batch=4,
                                             num_workers=workers))
        valid = np.concatenate([b["valid"] for b in batches])
        assert valid.sum() == 6 and all(b["image_ok"][b["valid"]].all() for b in batches)
        images = np.concatenate([b["image"] for b in batches])[valid]
        masks = np.concatenate([b["mask"] for b in batches])[valid]
        # Worker processes each batch their own share, so compare the records as a set.
        got = sorted(image.tobytes() + mask.tobytes() for image, mask in zip(images, masks))
        assert got == sorted(d["image"].tobytes() + d["mask"].tobytes() for d in direct)
    batch = next(iter(pipeline.train_dataset(source, augment_portrait, local_batch=3, seed=0, num_workers=0)))
    assert batch["image"].shape == (3, S, S, 3) and batch["image"].dtype == np.uint8
    assert batch["mask"].shape == (3, S, S) and set(np.unique(batch["mask"])) <= {0, 1}


def _coloured_record(size: int = 48) -> dict:
    """Foreground red, background blue, in an asymmetric shape: colour tells the mask."""
    mask = np.zeros((size, size), np.uint8)
    mask[6:40, 4:16] = 1
    mask[6:14, 16:36] = 1
    image = np.where(mask[..., None] == 1, np.uint8([200, 40, 40]), np.uint8([40, 40, 200])).astype(np.uint8)
    return {"image": image, "mask": mask}


def test_augmentation_keeps_image_and_mask_aligned_and_is_seeded():
    record = _coloured_record()
    flipped = zoomed = 0
    for seed in range(24):
        out = augment_portrait(record, np.random.default_rng(seed))
        assert out["image"].shape == (48, 48, 3) and out["image"].dtype == np.uint8 and out["image_ok"]
        assert out["mask"].shape == (48, 48) and set(np.unique(out["mask"])) <= {0, 1}
        by_colour = out["image"][..., 0].astype(int) > out["image"][..., 2]
        assert (by_colour != out["mask"].astype(bool)).mean() < 0.04  # boundary pixels only
        flipped += out["mask"][:, 40:].any()  # the shape only reaches the right side when mirrored
        zoomed += out["mask"].sum() != record["mask"].sum()
        again = augment_portrait(record, np.random.default_rng(seed))
        assert all(np.array_equal(out[k], again[k]) for k in ("image", "mask"))
        assert not np.array_equal(out["image"], record["image"])  # colour jitter always changes it
    assert 4 <= flipped <= 20 and zoomed >= 20
    a, b = (augment_portrait(record, np.random.default_rng(s)) for s in (1, 2))
    assert not np.array_equal(a["image"], b["image"])
    jittered = augment_portrait(record, np.random.default_rng(0), flip=False, scale=None)
    assert np.array_equal(jittered["mask"], record["mask"]) and not np.array_equal(jittered["image"], record["image"])
    plain = augment_portrait(record, np.random.default_rng(0), flip=False, scale=None, color_jitter=0.0)
    assert np.array_equal(plain["image"], record["image"]) and np.array_equal(plain["mask"], record["mask"])
    evaluated = eval_portrait(record)
    assert evaluated["image"] is record["image"] and evaluated["mask"] is record["mask"] and evaluated["image_ok"]


def test_zoom_is_about_the_centre():
    mask = np.zeros((40, 40), np.uint8)
    mask[12:28, 12:28] = 1  # 16x16, centred
    record = {"image": np.repeat(mask[..., None] * 255, 3, axis=2), "mask": mask}
    for zoom, side in ((1.5, 24), (0.5, 8)):
        out = augment_portrait(record, np.random.default_rng(0), flip=False, scale=(zoom, zoom), color_jitter=0.0)
        rows, cols = np.nonzero(out["mask"])
        assert (rows.min(), rows.max(), cols.min(), cols.max()) == (20 - side // 2, 19 + side // 2) * 2
        assert np.array_equal(out["image"][..., 0] > 127, out["mask"] == 1)


def test_cli_prints_counts_and_skips(folders, tmp_path: Path):
    p3m, sup = folders
    cmd = [sys.executable, str(REPO / "tools" / "prepare_p3m.py"), "--p3m_root", str(p3m), "--supervisely_root",
           str(sup), "--out_dir", str(tmp_path / "cli"), "--size", "16", "--dtype", "float16", "--resize", "stretch"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert "train: 6 records" in result.stdout and "val: 1 records" in result.stdout
    for reason in ("image_without_mask", "mask_without_image", "image_unreadable", "mask_unreadable", "size_mismatch",
                   "duplicate_stem"):
        assert f"skipped {reason}: 1" in result.stdout
    assert (tmp_path / "cli" / "train_16_fp16_images.mmap").is_file()
    meta = json.loads((tmp_path / "cli" / "train_16_fp16_masks.mmap.json").read_text())
    assert (meta["resize"], meta["layout"], meta["count"]) == ("stretch", "N1HW", 6)
    bad = subprocess.run([*cmd[:3], str(tmp_path / "nowhere"), *cmd[4:]], capture_output=True, text=True, env=env,
                         timeout=60)
    assert bad.returncode == 2 and "no P3M-10k layout" in bad.stderr


def test_demo_writer_and_prepare_give_readable_memmaps(tmp_path: Path):
    # An earlier demo with other parameters: rewritten, and its extra files do not linger.
    write_portrait_demo(tmp_path / "demo", num_train=40, num_val=10, size=(24, 16))
    paths = prepare_portrait_demo(tmp_path / "demo", tmp_path / "mm", 16)
    assert sorted(paths) == ["train_images", "train_masks", "val_images", "val_masks"]
    train = MemmapSource(paths["train_images"], paths["train_masks"])
    val = MemmapSource(paths["val_images"], paths["val_masks"])
    assert (len(train), len(val)) == (24, 8)  # 18 P3M + 6 Supervisely, 8 val
    meta = json.loads(Path(paths["train_images"] + ".json").read_text())
    assert sum("supervisely" in f for f in meta["source_files"]) == 6
    assert any(r["pad"][1] > 0 for r in meta["records"]) and any(r["pad"][3] > 0 for r in meta["records"])
    for i in range(len(train)):
        fraction = train[i]["mask"].mean()
        assert 0.03 < fraction < 0.7  # one person per image
    roots = write_portrait_demo(tmp_path / "demo")  # same parameters: reused, nothing rewritten
    files = sorted(p for p in (tmp_path / "demo").rglob("*") if p.is_file())
    stamps = [p.stat().st_mtime_ns for p in files]
    assert write_portrait_demo(tmp_path / "demo") == roots
    assert [p.stat().st_mtime_ns for p in files] == stamps
    assert (Path(roots["p3m_root"]) / "validation" / "P3M-500-P" / "mask").is_dir()
    assert (Path(roots["supervisely_root"]) / "ds1" / "images").is_dir()
    write_portrait_demo(tmp_path / "again")
    assert all(p.read_bytes() == (tmp_path / "again" / p.relative_to(tmp_path / "demo")).read_bytes() for p in files)
