"""What every entry point shares: a task is built without touching its data (export and restore
work from a run directory alone), and a user's mistake is one line on stderr with exit status 2."""
import contextlib
import io
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import ROI_TINY, load_tool

from segjax import evaluate, predict, tasks, train
from segjax.config import load_experiment, override
from segjax.data.demo import write_coco_person_demo
from segjax.data.errors import DataError
from segjax.engine.setup import restore_model
from segjax.export.runtime import make_session
from segjax.tasks.base import Task
from segjax.train import resolve_config, train_and_evaluate


@pytest.mark.parametrize("experiment, paths", [
    ("roi_human", {"data.train_ann": "a.json", "data.val_ann": "b.json", "data.train_img_dir": "a",
                   "data.val_img_dir": "b"}),
    ("voc_resnet", {"data.data_root": "voc"}),
    ("coco_semantic", {"data.data_root": "coco", "data.num_classes": "4"}),
    ("hybrid_p3m", {"data.train_images": "a", "data.train_masks": "b", "data.val_images": "c", "data.val_masks": "d",
                    "data.image_size": "64"}),
])
def test_building_a_task_reads_no_data(experiment, paths, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # none of these paths exists
    cfg = load_experiment(experiment)
    for key, value in paths.items():
        cfg = override(cfg, key, value)
    task = tasks.build(cfg)
    assert isinstance(task, Task)  # the contract's attributes and methods
    model = nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))
    assert jax.tree.leaves(nnx.state(model)) and task.export_signature()
    with pytest.raises((DataError, FileNotFoundError)):  # the data are opened here, and found missing
        task.val_data()


def test_export_and_restore_after_the_training_data_is_deleted(tmp_path):
    data = write_coco_person_demo(tmp_path / "coco", num_train=4, num_val=2, image_size=(64, 64))
    flags = [f"--{k}={v}" for k, v in data.items()]
    cfg, _ = resolve_config(["--experiment", "roi_human", *flags, *ROI_TINY, "--epochs", "1", "--batch_size", "4",
                             "--num_workers", "0", "--set", "train.num_visualizations=0",
                             "--checkpoint_dir", str(tmp_path / "runs")])
    run_dir = Path(train_and_evaluate(cfg)["run_dir"])
    shutil.rmtree(tmp_path / "coco")

    restored = restore_model(run_dir)
    assert len(restored.task.cfg.data.class_weights) == 3  # computed in training, saved with the run
    model = nnx.merge(restored.graphdef, restored.state)
    rois = jnp.array([[0, 4, 4, 40, 60]], jnp.float32)
    masks = model(jnp.zeros((1, 64, 64, 3)), rois)
    assert masks.shape == (1, 56, 56, 3) and np.isfinite(np.asarray(masks)).all()

    out = tmp_path / "roi.onnx"
    argv = ["--experiment", "roi_human", "--checkpoint", str(run_dir), "--variant", "end_to_end", "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert load_tool("export_onnx").main(argv) == 0, stdout.getvalue()
    (onnx_masks,) = make_session(out, prefer=("cpu",)).run(None, {"images": np.zeros((1, 3, 64, 64), np.float32),
                                                                  "rois": np.asarray(rois)})
    np.testing.assert_allclose(onnx_masks, np.moveaxis(np.asarray(masks), -1, 1), atol=1e-4)


def _main(name):
    return {"train": train.main, "evaluate": evaluate.main, "predict": predict.main}.get(name) or load_tool(name).main


@pytest.mark.parametrize("entry, argv, message", [
    ("train", ["--experiment", "roi_human", "--train_ann", "X.json"],
     "real data needs all of --train_ann --val_ann --train_img_dir --val_img_dir; missing --val_ann"),
    ("train", ["--experiment", "nope"], "unknown experiment 'nope'"),
    ("train", ["--experiment", "voc_resnet", "--resume", "{tmp}/nowhere"], "no checkpoint at"),
    ("evaluate", ["{tmp}/nowhere"], "no checkpoint at"),
    ("evaluate", ["--multiple", "{tmp}/none*"], "no checkpoint matches"),
    ("predict", ["--checkpoint", "{tmp}/nowhere", "--image", "a.jpg"], "no checkpoint at"),
    ("export_onnx", ["--experiment", "voc_resnet", "--init_from", "w.pth", "--out", "x.onnx"],
     "--init_from expects torch:PATH"),
    ("export_onnx", ["--experiment", "voc_resnet", "--checkpoint", "{tmp}/nowhere", "--out", "x.onnx"],
     "no run of 'voc_resnet' with checkpoints under"),
    ("export_onnx", ["--experiment", "voc_resnet", "--init_from", "torch:{tmp}/w.pth", "--out", "x.onnx"],
     "w.pth"),
    ("benchmark", ["--experiment", "roi_human", "--set", "train.epochs"], "--set expects KEY=VALUE"),
])
def test_user_mistakes_are_one_line_and_exit_2(entry, argv, message, tmp_path, capsys):
    assert _main(entry)([a.replace("{tmp}", str(tmp_path)) for a in argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert not any("Traceback" in line for line in err), err
