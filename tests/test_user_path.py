"""The user's path end to end: a demo run says so; class names with commas survive training,
resume, evaluation, prediction and ONNX export; one checkpoint resolver for every entry point;
strict JSON, full paths and per-class IoU in evaluate; log lines never on a progress bar's line;
no third-party warnings unless --verbose; demo data written once under concurrency; the split and
subset tools' pools and their refusal to overwrite the demo's lists."""
import contextlib
import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import ROOT, load_tool
from PIL import Image
from test_roads_data import _cityscapes_tree, _scene

from segjax import evaluate, predict, train
from segjax.config import from_dict
from segjax.engine import setup
from segjax.engine.checkpoint import find_checkpoint_dir
from segjax.export.runtime import read_metadata

# VOC's 21 classes renamed, some with commas (ADE20K's style): one class each, never split.
NAMES = ["background", "wall, building, edifice", "floor, flooring", *(f"class {i}" for i in range(3, 21))]
LOG_LINE = re.compile(r"\d\d:\d\d:\d\d (INFO|WARNING) ")
TINY = ["--set", "model.size=tiny", "--backbone", "resnet18", "--set", "data.crop_size=48", "--set",
        "data.eval_size=64", "--batch_size", "8", "--num_workers", "0", "--set", "train.log_every=4",
        "--set", "train.num_visualizations=0", "--set", "train.eval_at_start=false", "--epochs", "1"]


def _never_raised(text):
    raise AssertionError(f"not strict JSON: {text}")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """`python -m segjax.train --experiment voc_resnet` without data (the demo), comma class names."""
    tmp = tmp_path_factory.mktemp("user_path")
    argv = ["--experiment", "voc_resnet", "--set", f"data.demo_root={tmp / 'demo'}", "--checkpoint_dir",
            str(tmp / "runs"), *TINY, "--set", f"data.class_names={json.dumps(NAMES)}"]
    with contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()) as err:
        assert train.main(argv) == 0, err.getvalue()
    run_dir = Path(re.search(r"run directory: (\S+)", out.getvalue()).group(1))
    return {"tmp": tmp, "run_dir": run_dir, "stdout": out.getvalue(), "stderr": err.getvalue()}


def test_a_demo_run_says_so_first_last_and_in_its_config(demo_run):
    screens = [line.split("\r")[-1] for line in demo_run["stderr"].splitlines() if line.split("\r")[-1].strip()]
    assert "DEMO RUN: no data given (--data_root / --train_img_dir / --val_img_dir)" in screens[0], screens[:3]
    assert demo_run["stdout"].strip().splitlines()[-1].startswith("DEMO RUN: "), demo_run["stdout"]
    assert json.loads((demo_run["run_dir"] / "config.json").read_text())["demo"] is True


def test_log_lines_never_share_a_progress_bar_line(demo_run):
    """What a terminal shows of each line is what follows its last carriage return: a log line there
    starts with its time, never behind a bar's text."""
    screens = [line.split("\r")[-1] for line in demo_run["stderr"].splitlines()]
    logged = [s for s in screens if " INFO " in s or " WARNING " in s]
    assert logged and all(LOG_LINE.match(s) for s in logged), [s for s in logged if not LOG_LINE.match(s)]
    assert "epoch 1/1" in demo_run["stderr"]  # the bar was drawn


def test_train_summary_lists_every_class_iou(demo_run):
    lines = demo_run["stdout"].splitlines()
    start = lines.index(next(line for line in lines if line.startswith("IoU per class")))
    rows = lines[start + 1:start + 1 + len(NAMES)]
    assert [row[:len(name)] for row, name in zip(rows, NAMES)] == NAMES
    assert all(re.fullmatch(r"\s+(\d\.\d{4}|absent)", row[len(name):]) for row, name in zip(rows, NAMES)), rows


def test_comma_class_names_survive_resume_evaluate_and_predict(demo_run, tmp_path, monkeypatch, capsys,
                                                                     caplog):
    run_dir = demo_run["run_dir"]
    assert json.loads((run_dir / "config.json").read_text())["data"]["class_names"] == NAMES
    monkeypatch.chdir(demo_run["tmp"])  # holds runs/: "latest" is its newest run

    # Resume for one more epoch: the saved config comes back with its class list whole.
    resumed, _ = train.resolve_config(["--experiment", "voc_resnet", "--resume", str(run_dir), "--resume_epochs",
                                       "1"])
    assert resumed.data.class_names == tuple(NAMES) and resumed.demo
    summary = train.train_and_evaluate(resumed)
    assert summary["run_dir"] == str(run_dir) and summary["steps"] == 2 * 96 // 8
    capsys.readouterr()

    # evaluate --json: strict JSON (an absent class's NaN IoU is null), every class by its name.
    with caplog.at_level(logging.WARNING):
        assert evaluate.main(["latest", "--json", "--no_visualization"]) == 0
    assert not [r for r in caplog.records if r.name == "absl"]  # orbax's read-only chatter: only with --verbose
    results = json.loads(capsys.readouterr().out, parse_constant=_never_raised)
    metrics = results[0]["metrics"]
    assert [k[4:] for k in metrics if k.startswith("iou_")] == NAMES
    assert None in [metrics[f"iou_{name}"] for name in NAMES]  # the demo draws a few classes only
    step_dir = str(run_dir / "checkpoints" / str(summary["best_step"]))
    assert results[0]["checkpoint"] == step_dir and results[0]["demo"] is True

    # The table: the full checkpoint path, every class's IoU; --verbose shows the third-party warnings.
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert evaluate.main([str(run_dir), "--no_visualization", "--verbose"]) == 0
    assert any("read only" in r.getMessage() for r in caplog.records if r.name == "absl")
    table = capsys.readouterr().out
    assert f" {step_dir} " in table and "(demo data)" in table and "IoU per class" in table
    assert all(re.search(rf"^{re.escape(name)}\s+(\d\.\d{{4}}|absent)$", table, re.M) for name in NAMES), table

    # Prediction from a folder of runs (the form export always took).
    image = next((demo_run["tmp"] / "demo" / "voc").rglob("*.jpg"))
    assert predict.main(["--checkpoint", "runs/voc_resnet", "--image", str(image), "--out_dir",
                         str(tmp_path / "jax")]) == 0
    assert Image.open(tmp_path / "jax" / f"{image.stem}_mask.png").size == Image.open(image).size


def test_comma_class_names_survive_onnx_export_and_prediction(demo_run, tmp_path, monkeypatch):
    monkeypatch.chdir(demo_run["tmp"])
    out = tmp_path / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()):
        assert load_tool("export_onnx").main(["--experiment", "voc_resnet", "--checkpoint", "latest",
                                              "--out", str(out)]) == 0
    meta = read_metadata(out)
    assert meta["class_names"] == NAMES and from_dict(meta["config"]).data.class_names == tuple(NAMES)
    image = next((demo_run["tmp"] / "demo" / "voc").rglob("*.jpg"))
    for source, name in ((["--checkpoint", "runs"], "jax"), (["--onnx", str(out)], "onnx")):
        assert predict.main([*source, "--image", str(image), "--out_dir", str(tmp_path / name)]) == 0
    jax_mask, onnx_mask = (np.asarray(Image.open(tmp_path / d / f"{image.stem}_mask.png")) for d in ("jax", "onnx"))
    assert (jax_mask == onnx_mask).mean() > 0.99


def test_every_checkpoint_form_resolves_alike(demo_run, monkeypatch):
    run_dir = demo_run["run_dir"]
    monkeypatch.chdir(demo_run["tmp"])
    best = setup.locate(run_dir)
    assert best.parent == run_dir / "checkpoints" and best.name.isdigit()
    for form in (run_dir / "checkpoints", best, demo_run["tmp"] / "runs", "runs/voc_resnet", "latest"):
        assert setup.locate(form, "voc_resnet") == best, form
    assert find_checkpoint_dir(best) == (best.parent, int(best.name))
    with pytest.raises(FileNotFoundError, match="no run of 'roi_human' with checkpoints under"):
        setup.locate("runs", "roi_human")
    with pytest.raises(FileNotFoundError, match="runs/nope does not exist"):
        setup.locate("runs/nope")


def test_print_config_shows_the_demo_model_size(capsys):
    """The road demo's model is the tiny one of its "pretrained" directory: the printed config says
    so, and that it is the demo."""
    assert train.main(["--experiment", "roadways_mask2former", "--print_config"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["model"]["size"] == "tiny" and printed["demo"] is True


WRITE_DEMO = ("import logging, sys; logging.basicConfig(level=logging.INFO, format='%(message)s'); "
              "from segjax.data.demo import write_voc_demo; write_voc_demo(sys.argv[1], num_train=24, num_val=6)")


def test_concurrent_runs_write_the_demo_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    procs = [subprocess.Popen([sys.executable, "-c", WRITE_DEMO, str(tmp_path / "voc")], env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for _ in range(2)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], logs
    assert sum(text.count("writing voc demo data") for text in logs) == 1, logs
    assert sum(text.count("reusing voc demo data") for text in logs) == 1, logs
    root = tmp_path / "voc" / "VOCdevkit" / "VOC2012"
    listed = (root / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    assert len(listed) == 24 and all((root / "JPEGImages" / f"{n}.jpg").is_file() for n in listed)


def _road_pool(root: Path) -> None:
    """A Cityscapes-style pool: 6 train and 3 val images, one val label all ignore (255)."""
    for split, count in (("train", 6), ("val", 3)):
        _cityscapes_tree(root, split, {f"d{i % 2}/{i:03d}": _scene(i) for i in range(count)})
    _cityscapes_tree(root, "val", {"d0/ignored": (_scene(9)[0], np.full((24, 40), 255, np.uint8))})


def _tool(name, argv, capsys):
    status = load_tool(name).main([str(a) for a in argv])
    return status, capsys.readouterr()


def test_split_dataset_pools_every_folder_and_skips_all_ignore_labels(tmp_path, capsys):
    _road_pool(tmp_path)
    status, out = _tool("split_dataset", ["--data_root", tmp_path, "--fractions", "0.5,0.25,0.25"], capsys)
    assert status == 0, out.err
    assert "split 9 images (skipped: {'all_ignore': 1})" in out.out
    listed = sorted(p for s in ("train", "val", "test") for p in (tmp_path / "splits" / f"{s}.txt").read_text().split())
    assert listed == sorted(f"leftImg8bit/{s}/d{i % 2}/{i:03d}_leftImg8bit.png"
                            for s, n in (("train", 6), ("val", 3)) for i in range(n))


def test_select_subset_ranks_the_split_list_when_there_is_one(tmp_path, capsys):
    _road_pool(tmp_path)
    status, out = _tool("select_subset", ["--data_root", tmp_path, "--num", "2", "--out_dir", tmp_path / "a"], capsys)
    assert status == 0 and "ranked 6 images of leftImg8bit/train/" in out.out, out  # no split lists: the folder
    assert _tool("split_dataset", ["--data_root", tmp_path, "--fractions", "0.5,0.25,0.25"], capsys)[0] == 0
    train_list = (tmp_path / "splits" / "train.txt").read_text().split()
    status, out = _tool("select_subset", ["--data_root", tmp_path, "--num", "2", "--out_dir", tmp_path / "b"], capsys)
    assert status == 0 and f"ranked {len(train_list)} images of {tmp_path / 'splits' / 'train.txt'}" in out.out
    scores = (tmp_path / "b" / "scores.csv").read_text().splitlines()[1:]
    assert sorted(row.split(",")[0] for row in scores) == sorted(train_list)


@pytest.mark.parametrize("name, extra", [("split_dataset", []), ("select_subset", ["--out_dir", "{root}/subset"])])
def test_the_tools_refuse_to_overwrite_the_demo(name, extra, tmp_path, capsys):
    _road_pool(tmp_path)
    (tmp_path / "segjax_roads_demo.json").write_text("{}")  # the demo's marker (segjax.data.demo.cached_demo)
    status, out = _tool(name, ["--data_root", tmp_path, *(a.replace("{root}", str(tmp_path)) for a in extra)], capsys)
    assert status == 2
    err = [line for line in out.err.strip().splitlines() if not line.startswith("reading labels")]
    assert len(err) == 1 and "inside segjax's demo data" in err[0] and "give --out_dir elsewhere" in err[0], err
    assert not (tmp_path / "splits").exists() and not (tmp_path / "subset").exists()


UNUSED_INITIALIZER = """
import sys

import numpy as np
import onnxruntime
from onnx import TensorProto, helper, numpy_helper

from segjax.engine.runlog import quiet_onnxruntime

quiet_onnxruntime(verbose=sys.argv[1] == "verbose")
io = [helper.make_tensor_value_info(name, TensorProto.FLOAT, [1]) for name in ("x", "y")]
graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", io[:1], io[1:],
                          initializer=[numpy_helper.from_array(np.zeros(1, np.float32), "unused")])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
"""


@pytest.mark.parametrize("mode", ["quiet", "verbose"])
def test_onnxruntime_graph_warnings_only_with_verbose(mode):
    """onnxruntime's "Removing initializer" warnings (printed by its C++ logger on every Mask2Former
    session) are hidden by default (export_onnx, predict --onnx) and shown with --verbose."""
    proc = subprocess.run([sys.executable, "-c", UNUSED_INITIALIZER, mode], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert ("Removing initializer 'unused'" in proc.stderr) == (mode == "verbose"), proc.stderr
