"""segjax.predict on a semantic model: the original-size class map and overlay, JAX and the exported
ONNX model giving the same masks, odd and unreadable inputs, folders, bad flags; and the shared
post-processing (letterbox crop + bilinear resize) against PyTorch's interpolate."""
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from segjax import predict, tasks
from segjax.config import load_experiment, override
from segjax.data.demo import write_voc_demo
from segjax.engine.setup import restore_model
from segjax.export.onnx import export
from segjax.tasks import base
from segjax.train import resolve_config, train_and_evaluate

TINY = ["--set", "model.size=tiny", "--set", "data.crop_size=48", "--set", "data.eval_size=64", "--batch_size", "4",
        "--num_workers", "0", "--backbone", "resnet18", "--set", "train.num_visualizations=0"]


@pytest.fixture(scope="module")
def semantic(tmp_path_factory) -> dict:
    """A voc_resnet run trained one epoch on tiny demo data, and its exported ONNX model."""
    tmp = tmp_path_factory.mktemp("semantic")
    voc = write_voc_demo(tmp / "voc", num_train=4, num_val=2, size=(64, 48))
    cfg, _ = resolve_config(["--experiment", "voc_resnet", "--data_root", str(voc), *TINY, "--epochs", "1",
                             "--checkpoint_dir", str(tmp / "runs")])
    run_dir = train_and_evaluate(cfg)["run_dir"]
    restored = restore_model(run_dir, overrides=["train.precision=fp32"])
    from flax import nnx
    export(restored.task, nnx.merge(restored.graphdef, restored.state), tmp / "model.onnx")
    shutil.rmtree(voc)  # prediction needs no data
    return {"run_dir": run_dir, "onnx": str(tmp / "model.onnx")}


@pytest.fixture(scope="module")
def inputs(realdata, tmp_path_factory) -> Path:
    """Real photos of odd sizes and modes (EXIF-rotated, greyscale, grey+alpha) and a broken file."""
    folder = tmp_path_factory.mktemp("inputs")
    shutil.copy(realdata / "voc_assembled/VOCdevkit/VOC2012/JPEGImages/2007_000033.jpg", folder)
    for name in ("color_exif.jpg", "grayscale.jpg", "gray_alpha.png"):
        shutil.copy(realdata / "mmcv/tests/data" / name, folder)
    (folder / "sub").mkdir()
    (folder / "sub" / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    return folder


def _masks(out_dir: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(out_dir)): np.asarray(Image.open(p)) for p in sorted(out_dir.rglob("*_mask.png"))}


def test_jax_and_onnx_give_the_same_original_size_masks(semantic, inputs, tmp_path, capsys):
    rc = predict.main(["--checkpoint", semantic["run_dir"], "--input_dir", str(inputs), "--out_dir",
                       str(tmp_path / "jax")])
    err = capsys.readouterr().err
    assert rc == 1 and "broken.jpg: cannot decode" in err  # reported, skipped, the rest segmented
    # --onnx alone: the file's metadata rebuild the task.
    assert predict.main(["--onnx", semantic["onnx"], "--input_dir", str(inputs), "--out_dir",
                         str(tmp_path / "onnx")]) == 1
    jax_masks, onnx_masks = _masks(tmp_path / "jax"), _masks(tmp_path / "onnx")
    assert sorted(jax_masks) == ["2007_000033_mask.png", "color_exif_mask.png", "gray_alpha_mask.png",
                                 "grayscale_mask.png"]
    # The same class everywhere but at near-ties of the argmax: on jaxlib 0.12.1 one pixel of color_exif's
    # 120,000 flips between two classes whose scores differ by float32 rounding (JAX against onnxruntime).
    for name, mask in jax_masks.items():
        assert (mask != onnx_masks[name]).mean() <= 1e-4, name
    # The original size (EXIF rotation applied), class indices with VOC's palette.
    sizes = {"2007_000033_mask.png": (366, 500), "color_exif_mask.png": (400, 300), "gray_alpha_mask.png": (400, 500),
             "grayscale_mask.png": (300, 400)}
    for name, size in sizes.items():
        assert jax_masks[name].shape == size and jax_masks[name].max() < 21, name
    png = Image.open(tmp_path / "jax" / "2007_000033_mask.png")
    assert png.mode == "P" and png.getpalette()[3:6] == [128, 0, 0]  # VOC's aeroplane
    overlay = np.asarray(Image.open(tmp_path / "jax" / "2007_000033_overlay.png"))
    assert overlay.shape == (366, 500, 3)


def test_overlay_blends_class_colours_and_draws_a_legend():
    image = np.full((60, 80, 3), 100, np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    mask[40:, 50:] = 1
    palette = np.zeros((256, 3), np.uint8)
    palette[1] = (255, 0, 0)
    out = predict.overlay(image, mask, palette, ("background", "person"))
    np.testing.assert_array_equal(out[55, 75], (178, 50, 50))  # 0.5 · 100 + 0.5 · colour, rounded
    np.testing.assert_array_equal(out[35, 75], (100, 100, 100))  # background: left clear
    assert (out[:20, :20] != 100).any()  # the legend, top left
    clear = predict.overlay(image, np.zeros_like(mask), palette, ("background", "person"))
    np.testing.assert_array_equal(clear, image)  # nothing present: no legend


def test_class_map_matches_torch_interpolate_and_streams_in_bands(monkeypatch, ref):
    torch = ref.torch
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(5, 32, 32)).astype(np.float32)
    box = base.Letterbox(height=45, width=71, size=(32, 32), content=(20, 32), scale=32 / 71)
    expected = torch.nn.functional.interpolate(torch.from_numpy(scores[None, :, :20]), size=(45, 71), mode="bilinear",
                                               align_corners=False)[0].argmax(0).numpy()
    whole = base.class_map(scores, box)
    np.testing.assert_array_equal(whole, expected)
    monkeypatch.setattr(base, "PIXEL_BUDGET", 5 * 71 * 4)  # bands of 4 rows
    np.testing.assert_array_equal(base.class_map(scores, box), whole)


@pytest.mark.parametrize("argv, message", [
    (["--image", "a.jpg"], "give --checkpoint RUN or --onnx MODEL"),
    (["--checkpoint", "R"], "give --image or --input_dir"),
    (["--checkpoint", "R", "--image", "a.jpg", "--boxes", "1,2,3"], "expected x1,y1,x2,y2"),
    (["--checkpoint", "R", "--image", "a.jpg", "--boxes", "5,5,1,9"], "x2 > x1"),
    (["--checkpoint", "R", "--image", "a.jpg", "--boxes", "1,1,5,5", "--detections", "d.json"], "exclude each other"),
])
def test_bad_flags_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        predict.main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and not any("Traceback" in line for line in err)


def test_bad_inputs_for_a_semantic_model(semantic, tmp_path, capsys):
    image = tmp_path / "a.png"
    Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(image)
    cases = [
        (["--checkpoint", semantic["run_dir"], "--image", str(image), "--boxes", "1,1,5,5"], "apply to ROI models"),
        (["--checkpoint", semantic["run_dir"], "--input_dir", str(tmp_path / "none")], "none does not exist"),
        (["--checkpoint", semantic["run_dir"], "--input_dir", str(image)], "a.png is not a directory"),
        (["--checkpoint", semantic["run_dir"], "--image", str(image), "--experiment", "roi_human"],
         "is a model of 'voc_resnet', not 'roi_human'"),
        (["--onnx", str(tmp_path / "none.onnx"), "--image", str(image)], "ONNX model not found"),
        (["--checkpoint", semantic["run_dir"], "--image", str(image), "--image", str(image)],
         "several inputs would write the same outputs: a"),
    ]
    for argv, message in cases:
        assert predict.main(argv) == 2, argv
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and message in err[-1], err


def test_roi_boxes_are_pasted_and_combined_by_the_maximum():
    cfg = load_experiment("roi_human")
    for key in ("train_ann", "val_ann", "train_img_dir", "val_img_dir"):
        cfg = override(cfg, f"data.{key}", "unused")
    task = tasks.build(override(cfg, "data.image_size", "64"))  # pure: the paths are never read
    image = np.full((100, 100, 3), 100, np.uint8)  # the legend takes the top left
    boxes = np.array([[10, 45, 50, 75], [40, 50, 90.5, 70]], np.float32)  # overlapping at x 40..50
    inputs, context = task.predict_inputs(image, size=(64, 64), boxes=boxes)
    assert inputs["images"].shape == (1, 64, 64, 3) and inputs["images"].dtype == np.uint8
    np.testing.assert_allclose(inputs["rois"][:2, 1:], boxes * 0.64)  # letterbox scale 64 / 100
    np.testing.assert_array_equal(inputs["rois"][:, 0], 0)
    logits = np.zeros((len(inputs["rois"]), 3, 56, 56), np.float32)
    logits[0, 1] = 5.0  # the first box: this person, sure
    logits[1, 2] = 3.0  # the second: other people, less sure
    mask = task.postprocess([logits], context)
    assert mask.shape == (100, 100)
    assert (mask[45:75, 10:40] == 1).all() and (mask[50:70, 50:90] == 2).all()
    assert (mask[50:70, 40:50] == 1).all()  # overlap: this person's 0.99 beats other people's 0.91
    assert not mask[:45].any() and not mask[:, :10].any() and not mask[:, 91:].any() and not mask[76:].any()
    overlaid = predict.overlay(image, mask, task.palette(), task.class_names).astype(int)
    np.testing.assert_array_equal(overlaid[70, 20], (178, 50, 50))  # this person red
    np.testing.assert_array_equal(overlaid[68, 80], (50, 50, 178))  # other people blue
