"""What every entry point shares: a task is built without touching its data (export, restore and
prediction work from a run directory alone), and a user's mistake is one line on stderr with exit status 2."""
import contextlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import ROI_TINY, ROOT, load_tool
from PIL import Image

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
    ("roadways_mask2former", {"data.data_root": "roads"}),
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


_FILE_EVENTS = ("open", "os.listdir", "os.scandir", "os.mkdir", "os.remove", "os.rename", "os.rmdir",
                "os.truncate", "shutil.copyfile", "shutil.rmtree")
_file_events: list | None = None  # recording when a list


def _record_file_access(event: str, args: tuple) -> None:
    if _file_events is not None and event in _FILE_EVENTS:
        _file_events.append((event, args[0] if args else None))


sys.addaudithook(_record_file_access)  # audit hooks stay for the process; recording is off by default


@pytest.mark.parametrize("experiment", ["roi_human", "voc_resnet", "coco_semantic", "hybrid_p3m",
                                        "roadways_mask2former"])
def test_a_resolved_config_builds_its_task_without_touching_a_file(experiment, tmp_path, monkeypatch):
    """tasks.resolve does the I/O (demo data, class lists, the Hugging Face architecture); building the
    task and its model from the resolved config then opens, lists and writes no file."""
    global _file_events
    monkeypatch.setenv("SEGJAX_DEMO_ROOT", str(tmp_path / "demo"))
    cfg = tasks.resolve(load_experiment(experiment, demo=True))
    assert tasks.resolve(cfg) == cfg  # resolved once and for all

    def build():
        task = tasks.build(cfg)
        return task, nnx.eval_shape(lambda: task.build_model(nnx.Rngs(0)))

    build()  # imports (which read modules) happen here
    _file_events = []
    try:
        task, model = build()
    finally:
        events, _file_events = _file_events, None
    assert events == [] and jax.tree.leaves(nnx.state(model))
    assert task.cfg == cfg


def test_export_restore_and_predict_after_the_training_data_is_deleted(tmp_path, realdata, capsys):
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

    # Prediction from the run (JAX, --boxes) and from the .onnx file alone (its detections JSON)
    # on a real COCO photo: the same masks at the original size.
    image = realdata / "super_gradients/tests/data/tinycoco/images/val2017/000000471345.jpg"
    boxes = [(30.5, 40.0, 300.0, 470.0), (250.0, 20.0, 600.0, 400.0)]
    detections = [{"image_id": 471345, "category_id": 1, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": 0.9}
                  for x1, y1, x2, y2 in boxes]
    detections += [{"image_id": 471345, "category_id": 1, "bbox": [0, 0, 640, 480], "score": 0.3},  # below 0.5
                   {"image_id": 471345, "category_id": 3, "bbox": [0, 0, 640, 480], "score": 0.9},  # a car
                   {"image_id": 1, "category_id": 1, "bbox": [0, 0, 10, 10], "score": 0.9}]  # another image
    (tmp_path / "det.json").write_text(json.dumps(detections))
    jax_argv = ["--checkpoint", str(run_dir), "--image", str(image), "--out_dir", str(tmp_path / "jax")]
    assert predict.main([*jax_argv, *(f"--boxes={','.join(map(str, b))}" for b in boxes)]) == 0
    assert predict.main(["--onnx", str(out), "--image", str(image), "--detections", str(tmp_path / "det.json"),
                         "--out_dir", str(tmp_path / "onnx")]) == 0
    mask = np.asarray(Image.open(tmp_path / "jax" / "000000471345_mask.png"))
    np.testing.assert_array_equal(mask, np.asarray(Image.open(tmp_path / "onnx" / "000000471345_mask.png")))
    assert mask.shape == (480, 640) and set(np.unique(mask)) <= {0, 1, 2}
    assert not mask[:, 600:].any() and not mask[:20].any()  # outside every box: background
    assert Image.open(tmp_path / "jax" / "000000471345_overlay.png").size == (640, 480)
    # A model without boxes, or detections that are not a results list, are one-line errors.
    assert predict.main(jax_argv) == 2
    (tmp_path / "bad.json").write_text(json.dumps({"annotations": []}))
    assert predict.main([*jax_argv, "--detections", str(tmp_path / "bad.json")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "give --boxes or --detections" in err[-2] and "is a JSON list" in err[-1], err


LOG_LINE = re.compile(r"\d\d:\d\d:\d\d (INFO|WARNING) ")  # the console log's lines (segjax.engine.runlog)


def _main(name):
    return {"train": train.main, "evaluate": evaluate.main, "predict": predict.main}.get(name) or load_tool(name).main


@pytest.mark.parametrize("entry, argv, message", [
    ("train", ["--experiment", "roi_human", "--train_ann", "X.json"],
     "real data needs all of --train_ann --val_ann --train_img_dir --val_img_dir; missing --val_ann"),
    ("train", ["--experiment", "nope"], "unknown experiment 'nope'"),
    ("train", ["--experiment", "voc_resnet", "--resume", "{tmp}/nowhere"],
     "checkpoint path {tmp}/nowhere does not exist"),
    ("train", ["--experiment", "voc_resnet", "--mode", "bogus"], "argument --mode: invalid choice: 'bogus'"),
    ("train", ["--experiment", "voc_resnet", "--data_root", "{tmp}/nope"], "--data_root {tmp}/nope does not exist"),
    ("train", ["--experiment", "roi_human", "--train_ann", "{tmp}/a.json", "--val_ann", "{tmp}/b.json",
               "--train_img_dir", "{tmp}", "--val_img_dir", "{tmp}"], "--train_ann {tmp}/a.json does not exist"),
    ("train", ["--experiment", "voc_resnet", "--epochz", "3"], "unrecognized arguments: --epochz 3"),
    ("evaluate", ["{tmp}/nowhere"], "checkpoint path {tmp}/nowhere does not exist"),
    ("evaluate", ["--multiple", "{tmp}/none*"], "no checkpoint matches"),
    ("evaluate", ["a", "--multiple", "b"], "give either CHECKPOINT or --multiple GLOB"),
    ("evaluate", ["{tmp}"], "no run of any experiment with checkpoints under {tmp}"),
    ("predict", ["--checkpoint", "{tmp}/nowhere", "--image", "{tmp}"], "checkpoint path {tmp}/nowhere does not exist"),
    ("predict", ["--checkpoint", "{tmp}", "--image", "{tmp}/nope.jpg"], "--image {tmp}/nope.jpg does not exist"),
    ("predict", ["--checkpoint", "{tmp}", "--input_dir", "{tmp}/nope"], "--input_dir {tmp}/nope does not exist"),
    ("predict", ["--checkpoint", "{tmp}"], "give --image or --input_dir"),
    ("export_onnx", ["--experiment", "voc_resnet", "--init_from", "w.pth", "--out", "x.onnx"],
     "--init_from expects torch:PATH"),
    ("export_onnx", ["--experiment", "voc_resnet", "--checkpoint", "{tmp}/nowhere", "--out", "x.onnx"],
     "checkpoint path {tmp}/nowhere does not exist"),
    ("export_onnx", ["--experiment", "voc_resnet", "--checkpoint", "{tmp}", "--out", "x.onnx"],
     "no run of 'voc_resnet' with checkpoints under {tmp}"),
    ("export_onnx", ["--experiment", "voc_resnet", "--out", "x.onnx"], "one of the arguments --checkpoint --init_from"),
    ("export_onnx", ["--experiment", "voc_resnet", "--init_from", "torch:{tmp}/w.pth", "--out", "x.onnx"],
     "w.pth"),
    ("benchmark", ["--experiment", "roi_human", "--set", "train.epochs"], "--set expects KEY=VALUE"),
])
def test_user_mistakes_are_one_line_and_exit_2(entry, argv, message, tmp_path, capsys):
    """Exactly one line on stderr (no argparse usage dump, no traceback) and exit status 2, whether
    the mistake is argparse's (SystemExit) or the entry point's (its return value)."""
    try:
        status = _main(entry)([a.replace("{tmp}", str(tmp_path)) for a in argv])
    except SystemExit as e:
        status = e.code
    assert status == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not LOG_LINE.match(line)]
    assert len(err) == 1 and err[0].startswith("error: "), err
    assert message.replace("{tmp}", str(tmp_path)) in err[0], err


def test_a_batch_the_devices_do_not_divide_is_one_line(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=2", "JAX_PLATFORMS": "cpu",
           "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "segjax.train", "--experiment", "voc_resnet", "--batch_size", "3",
                           "--set", f"data.demo_root={tmp_path}", "--checkpoint_dir", str(tmp_path / "runs")],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if not LOG_LINE.match(line)]
    assert errors == ["error: batch size 3 must be a multiple of mesh data x fsdp = 2 and of the 1 processes"], \
        proc.stderr
