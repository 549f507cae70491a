"""The semantic task through the trainer: VOC sanity/train/test modes, real VOC files, and
coco_semantic training several models in one command."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from segjax import tasks
from segjax.data.demo import write_coco_semantic_demo, write_voc_demo
from segjax.train import main, resolve_config, train_and_evaluate

TINY = ["--set", "model.size=tiny", "--set", "data.crop_size=48", "--set", "data.eval_size=64",
        "--batch_size", "4", "--num_workers", "0", "--set", "train.log_every=2"]


@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return write_voc_demo(tmp_path_factory.mktemp("voc"), num_train=8, num_val=4, size=(64, 48))


def run(argv):
    cfg, _ = resolve_config(argv)
    return train_and_evaluate(cfg)


def read_metrics(run_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_sanity_mode_overfits_one_image(voc, tmp_path):
    out = run(["--experiment", "voc_resnet", "--data_root", str(voc), "--mode", "sanity", *TINY, "--backbone",
               "resnet18", "--epochs", "40", "--lr", "0.05", "--checkpoint_dir", str(tmp_path)])
    train = [r for r in read_metrics(out["run_dir"]) if r["split"] == "train"]
    assert len(train) == 40 and out["steps"] == 40  # one image repeated to one batch: one step per epoch
    assert out["last_val"]["images"] == 1
    assert train[-1]["loss"] < 0.25 * train[0]["loss"]
    assert out["last_val"]["pixel_accuracy"] > 0.9


def test_train_then_test_mode_writes_predictions(voc, tmp_path):
    common = ["--experiment", "voc_resnet", "--data_root", str(voc), *TINY, "--checkpoint_dir", str(tmp_path)]
    trained = run([*common, "--epochs", "2", "--backbone", "resnet18"])
    assert trained["last_val"]["miou"] > trained["first_val"]["miou"] or trained["first_val"] is trained["last_val"]
    tested = run([*common, "--mode", "test", "--backbone", "resnet18"])
    assert tested["last_val"]["images"] == 4
    assert abs(tested["last_val"]["miou"] - max(r["miou"] for r in read_metrics(trained["run_dir"])
                                                if r["split"] == "val")) < 1e-6  # the best checkpoint
    predictions = sorted((Path(tested["run_dir"]) / "visualizations").glob("prediction_*.png"))
    assert predictions
    panel = np.asarray(Image.open(predictions[0]))
    assert panel.shape == (64, 3 * 64, 3)  # image | ground truth | prediction


def test_real_voc_files_ignore_border_pixels(realdata, tmp_path):
    root = realdata / "voc_assembled"
    out = run(["--experiment", "voc_resnet", "--data_root", str(root), *TINY, "--backbone", "resnet18",
               "--epochs", "1", "--checkpoint_dir", str(tmp_path)])
    val = out["last_val"]
    assert val["images"] == 1  # val.txt lists 2007_000033 only
    # The real mask holds background, aeroplane and 255 borders: those two classes are scored;
    # classes in neither target nor prediction are reported absent, not averaged in as IoU 0.
    assert {"background", "aeroplane"}.isdisjoint(val["absent_classes"])
    present = [v for k, v in val.items() if k.startswith("iou_") and k[4:] not in val["absent_classes"]]
    assert all(np.isnan(val[f"iou_{name}"]) for name in val["absent_classes"])
    assert val["miou"] == pytest.approx(np.mean(present))


def test_coco_semantic_trains_several_models(tmp_path, capsys):
    paths = write_coco_semantic_demo(tmp_path / "coco", num_train=8, num_val=4, size=(64, 48))
    argv = ["--experiment", "coco_semantic", "--train_img_dir", paths["train_images"], "--train_mask_dir",
            paths["train_masks"], "--val_img_dir", paths["val_images"], "--val_mask_dir", paths["val_masks"],
            "--set", f"data.classes_file={paths['classes']}", "--set", "data.num_classes=7", *TINY,
            "--epochs", "1", "--lr", "3e-3", "--checkpoint_dir", str(tmp_path / "runs"), "--models", "fastscnn", "unet"]
    assert main(argv) == 0
    runs = sorted(p.name for p in (tmp_path / "runs").iterdir())
    assert [name.rsplit("_", 1)[0] for name in runs] == ["fastscnn_miou", "unet_miou"]
    for name in runs:
        run_dir = tmp_path / "runs" / name
        assert any(p.name.isdigit() for p in (run_dir / "models").iterdir())
        assert "miou:" in (run_dir / "metrics_first_iter.txt").read_text()
        assert "pixel_accuracy:" in (run_dir / "final_metrics.txt").read_text()
        for split in ("train", "val"):
            assert list((run_dir / "tensorboard" / split).glob("events.*"))
    out = capsys.readouterr().out
    assert "validation (fastscnn)" in out and "validation (unet)" in out


def test_classes_come_from_the_prepared_folder(tmp_path, capsys):
    paths = write_coco_semantic_demo(tmp_path / "coco", num_train=4, num_val=2, size=(48, 48))
    argv = ["--experiment", "coco_semantic", "--data_root", str(Path(paths["train_masks"]).parent.parent),
            "--checkpoint_dir", str(tmp_path / "runs")]
    task = tasks.build(tasks.resolve(resolve_config(argv)[0]))
    mapping = json.loads(Path(paths["classes"]).read_text())  # {"0": "background", "1": ...}
    assert task.class_names == tuple(mapping[str(i)] for i in range(len(mapping)))
    assert task.cfg.data.num_classes == len(task.class_names) == 7
    graphdef, state = nnx.split(nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0))))
    images = jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)
    logits = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, images)
    assert logits.shape[-1] == 7
    # An explicit class count that disagrees with the folder's list stays an error.
    assert main([*argv, "--set", "data.num_classes=5"]) == 2
    assert "data.num_classes is 5 but the data has 7 classes" in capsys.readouterr().err


def test_init_from_torch_state_dict(voc, tmp_path):
    import torch
    from flax import nnx

    from segjax.bridge import to_torch_state_dict
    from segjax.models.resnet import ResNet18

    source = ResNet18(rngs=nnx.Rngs(7))  # stands in for an ImageNet torchvision resnet18 file
    path = tmp_path / "resnet18.pth"
    torch.save({k: torch.from_numpy(v) for k, v in to_torch_state_dict(source, "torchvision_resnet").items()}, path)
    out = run(["--experiment", "voc_resnet", "--data_root", str(voc), *TINY, "--set", "model.size=full",
               "--backbone", "resnet18", "--test_only", "--init_from", f"torch:{path}",
               "--checkpoint_dir", str(tmp_path)])
    encoder = out["model_state"]["encoder"]
    np.testing.assert_array_equal(np.asarray(encoder["conv1"]["kernel"][...]), np.asarray(source.conv1.kernel[...]))
    np.testing.assert_array_equal(np.asarray(encoder["layer4"][1]["bn2"]["mean"][...]),
                                  np.asarray(source.layer4[1].bn2.mean[...]))
    assert np.isfinite(out["last_val"]["loss"])
