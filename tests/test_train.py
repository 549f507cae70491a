"""The trainer end to end on a tiny roi_human config: run directory, exact resume, checkpoints,
multi-device parity, NaN and unreadable-record handling, evaluation, the ONNX extractor path."""
import dataclasses
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
import optax
import pytest
from flax import nnx
from helpers import ROI_TINY, ROOT, run

from segjax import evaluate
from segjax.data.demo import write_coco_person_demo
from segjax.engine import steps as steps_lib
from segjax.train import resolve_config, train_and_evaluate

TINY = [
    *ROI_TINY, "--set", "train.log_every=2", "--set", "train.num_visualizations=2",
    "--set", "train.max_bad_record_ratio=0.5", "--batch_size", "4", "--num_workers", "0", "--lr", "3e-3",
]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A small demo set in the real COCO layout, with one truncated JPEG among the training images."""
    root = tmp_path_factory.mktemp("coco")
    paths = write_coco_person_demo(root, num_train=10, num_val=6, image_size=(64, 64))
    first = sorted(Path(paths["train_img_dir"]).glob("*.jpg"))[0]
    first.write_bytes(first.read_bytes()[: first.stat().st_size // 2])
    return paths


def tiny_argv(data: dict, run_root: Path, *extra: str) -> list[str]:
    flags = [f"--{k}={v}" for k, v in data.items()]
    return ["--experiment", "roi_human", *flags, *TINY, "--checkpoint_dir", str(run_root), *extra]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> dict:
    return run(tiny_argv(data, tmp_path_factory.mktemp("runs"), "--epochs", "2"))


def read_metrics(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_run_directory_contents(straight):
    run_dir = Path(straight["run_dir"])
    assert run_dir.parent.name == "roi_human"
    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["data"]["image_size"] == 64 and saved["train"]["epochs"] == 2
    assert "epoch 2" in (run_dir / "train.log").read_text()
    records = read_metrics(run_dir)
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["epoch"] for r in train] == [1, 2] and [r["epoch"] for r in val] == [1, 2]
    for r in records:
        assert {"step", "epoch", "split", "loss", "ce", "dice", "miou", "iou_this_person"} <= r.keys()
    assert all("lr" in r for r in records) and train[1]["lr"] < train[0]["lr"]  # cosine decays
    assert sum(r["bad_records"] for r in train) >= 1  # the truncated JPEG was counted, not fatal
    for split in ("train", "val"):
        assert list((run_dir / "tensorboard" / split).glob("events.out.tfevents.*"))
    assert "miou:" in (run_dir / "metrics_first_iter.txt").read_text()
    final = (run_dir / "final_metrics.txt").read_text()
    assert f"miou: {val[-1]['miou']:.6g}" in final
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert list((run_dir / "visualizations").glob("prediction_epoch002_*.png"))


def test_resume_is_exact(straight, data, tmp_path):
    interrupted = run(tiny_argv(data, tmp_path, "--epochs", "2"), stop_after_epoch=1)
    assert interrupted["last_val"] is not None
    resumed = run(["--experiment", "roi_human", "--resume", interrupted["run_dir"]])
    assert resumed["run_dir"] == interrupted["run_dir"]
    for a, b in zip(jax.tree.leaves(straight["model_state"]), jax.tree.leaves(resumed["model_state"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    for key in ("loss", "miou", "iou_this_person"):
        assert abs(straight["last_val"][key] - resumed["last_val"][key]) <= 1e-6
    # One metrics file holds both halves: epochs 1 and 2 once each for train.
    assert [r["epoch"] for r in read_metrics(resumed["run_dir"]) if r["split"] == "train"] == [1, 2]


def test_resume_skips_half_written_checkpoint_and_extends(straight, tmp_path):
    run_dir = tmp_path / "copy"
    shutil.copytree(straight["run_dir"], run_dir)
    ckpts = run_dir / "checkpoints"
    latest = max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit())
    # What a save killed midway leaves behind: orbax's temporary directory, partly written.
    partial = ckpts / f"{latest + 5}.orbax-checkpoint-tmp"
    shutil.copytree(ckpts / str(latest), partial)
    for f in list(partial.rglob("*"))[:3]:
        if f.is_file():
            f.write_bytes(b"")
    resumed = run(["--experiment", "roi_human", "--resume", str(run_dir), "--resume_epochs", "1"])
    assert resumed["epochs"] == 3
    epochs = [r["epoch"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert epochs == [1, 2, 3]
    assert max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) > latest


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    from segjax.train import main

    assert main(["--experiment", "roi_human", "--resume", str(tmp_path)]) == 2
    assert "no run of 'roi_human' with checkpoints under" in capsys.readouterr().err  # an empty folder of runs


def test_evaluate_table_and_json(straight, capsys):
    run_dir = straight["run_dir"]
    assert evaluate.main([run_dir, "--json", "--no_visualization"]) == 0
    (result,) = json.loads(capsys.readouterr().out)
    best_val = max(r["miou"] for r in read_metrics(run_dir) if r["split"] == "val")
    assert abs(result["metrics"]["miou"] - best_val) < 1e-6  # the best checkpoint was evaluated
    pattern = str(Path(run_dir) / "checkpoints" / "*")
    assert evaluate.main(["--multiple", pattern]) == 0
    table = capsys.readouterr().out
    assert re.search(r"^this_person +\d\.\d{4}$", table, re.M) and "* best by miou" in table
    rows = [line for line in table.splitlines() if "/checkpoints/" in line and not line.startswith("* best")]
    assert len(rows) == len(evaluate.expand(pattern)) >= 1


def test_a_task_with_other_metrics_trains(data, tmp_path, monkeypatch, capsys):
    """The trainer reads no metric by name: a task without mIoU, best by minimal Dice loss."""
    from segjax import train
    from segjax.tasks import roi_instance

    class DiceOnly(roi_instance.Task):
        best_metric, best_mode = "dice", "min"

        def summarize(self, sums):
            return {k: v for k, v in super().summarize(sums).items()
                    if k not in ("miou", "mdice", "pixel_accuracy") and not k.startswith("iou_")}

    monkeypatch.setattr(roi_instance, "Task", DiceOnly)
    summary = run(tiny_argv(data, tmp_path, "--epochs", "1"))
    assert "miou" not in summary["last_val"] and summary["best_step"] == summary["steps"]
    train._print_summary(summary, "")
    assert "dice" in capsys.readouterr().out


def test_test_only_validates_without_training(straight, data, tmp_path):
    out = run(tiny_argv(data, tmp_path, "--test_only", "--init_from", straight["run_dir"]))
    assert out["last_val"]["rois"] > 0
    assert not list(Path(out["run_dir"]).glob("checkpoints/*"))


def test_unreadable_records_above_ratio_stop_the_run(data, tmp_path):
    with pytest.raises(RuntimeError, match="unreadable"):
        run(tiny_argv(data, tmp_path, "--epochs", "1", "--set", "train.max_bad_record_ratio=0"))


def test_nan_loss_is_skipped_then_stops(data, tmp_path):
    cfg, _ = resolve_config(tiny_argv(data, tmp_path, "--epochs", "1", "--set", "train.max_nonfinite_steps=1"))
    cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, ce_weight=float("nan")))  # the CLI refuses nan
    with pytest.raises(RuntimeError, match="NaN/inf loss"):
        train_and_evaluate(cfg)


def test_train_step_leaves_state_unchanged_on_nan():
    class Net(nnx.Module):
        def __init__(self):
            self.linear = nnx.Linear(3, 2, rngs=nnx.Rngs(0))
            self.norm = nnx.BatchNorm(2, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return self.norm(self.linear(x))

    def loss_fn(model, batch, key):
        del key
        loss = (model(batch["x"]) ** 2).mean()
        return loss, ({"loss": loss}, {})

    model = Net()
    optimizer = nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param)
    model_def, model_state = nnx.split(model)
    opt_def, opt_state = nnx.split(optimizer)
    step = steps_lib.make_train_step(model_def, opt_def, loss_fn, (None, None))
    before = jax.tree.map(np.asarray, model_state)
    bad = {"x": jnp.array([[1.0, jnp.nan, 0.0], [0.0, 1.0, 2.0]])}
    model_state, opt_state, sums = step(model_state, opt_state, bad)
    assert int(sums["nonfinite_steps"]) == 1 and float(sums["loss"]) == 0.0
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(model_state)):
        np.testing.assert_array_equal(a, np.asarray(b))  # params and BatchNorm statistics
    model_state, opt_state, sums = step(model_state, opt_state, {"x": jnp.array([[1.0, 2.0, 3.0], [0.0, 1.0, -1.0]])})
    assert int(sums["nonfinite_steps"]) == 0
    assert not np.array_equal(before["linear"]["kernel"], np.asarray(model_state["linear"]["kernel"]))



def test_step_key_follows_the_seed_and_optimizer_step():
    """Training steps draw from fold_in(key(seed), optimizer step), which checkpoints restore (exact
    resume); evaluation always from key(seed)."""
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))

    def loss_fn(model, batch, key):
        loss = (model(batch["x"]) ** 2).mean()
        return loss, ({"loss": loss, "draw": jax.random.uniform(key)}, {})

    model_def, model_state = nnx.split(model)
    opt_def, opt_state = nnx.split(nnx.Optimizer(model, optax.sgd(0.1), wrt=nnx.Param))
    train_step = steps_lib.make_train_step(model_def, opt_def, loss_fn, (None, None), seed=7)
    batch = {"x": jnp.ones((2, 2))}
    draws = []
    for _ in range(2):
        model_state, opt_state, sums = train_step(model_state, opt_state, batch)
        draws.append(float(sums["draw"]))
    assert draws == [float(jax.random.uniform(jax.random.fold_in(jax.random.key(7), i))) for i in range(2)]
    eval_step = steps_lib.make_eval_step(model_def, loss_fn, seed=7)
    assert float(eval_step(model_state, batch)[0]["draw"]) == float(jax.random.uniform(jax.random.key(7)))


def test_inference_programs_take_xla_convolutions_on_cpu():
    """Evaluation and prediction compile convolutions without YNNPACK (faster CNN forwards on this
    CPU, steps.CPU_INFERENCE_OPTIONS); a plain jit keeps it. Same numbers."""
    x = jax.random.normal(jax.random.key(0), (1, 32, 32, 64))
    w = jax.random.normal(jax.random.key(1), (3, 3, 64, 64)) * 0.05

    def conv(x, w):
        return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    default = jax.jit(conv).lower(x, w).compile()
    inference = steps_lib.inference_jit(conv).lower(x, w).compile()
    assert "ynn_fusion" in default.as_text() and "ynn_fusion" not in inference.as_text()
    np.testing.assert_allclose(np.asarray(inference(x, w)), np.asarray(default(x, w)), rtol=1e-5, atol=1e-5)


PARITY_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_disable_most_optimizations", True)
from segjax.train import resolve_config, train_and_evaluate
cfg, _ = resolve_config(json.loads(sys.argv[1]))
out = train_and_evaluate(cfg)
leaves = jax.tree.leaves(out["model_state"])
print("RESULT", json.dumps({"devices": jax.device_count(), "val": out["last_val"]["loss"], "steps": out["steps"],
      "params": [x.tolist() for x in jax.tree.leaves(jax.device_get(out["model_state"]))],
      "device_bytes": sum(x.addressable_shards[0].data.nbytes for x in leaves),
      "bytes": sum(x.nbytes for x in leaves)}))
"""

# mesh.fsdp=4 with no size floor: every tensor with a dimension divisible by 4 is split; the
# 2-class heads have none and must stay replicated, logged.
FSDP = ["--set", "mesh.data=1", "--set", "mesh.fsdp=4", "--set", "mesh.min_shard_bytes=0"]


def parity_run(data, run_root: Path, devices: int, *extra: str) -> tuple[dict, str]:
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": str(ROOT)}
    # SGD: Adam's first update is ~lr*sign(g), which turns reduction-order noise in near-zero
    # gradients into lr-sized differences; SGD's update is linear in the gradient.
    # Batch 16: the ~16 training records make one step per epoch, so two epochs compare two
    # sharded steps (and sharded validations) with the same steps on one device.
    argv = tiny_argv(data, run_root, "--epochs", "2", "--batch_size", "16", "--set", "train.eval_batch_size=8",
                     "--optimizer", "sgd", "--lr", "0.01", *extra)
    proc = subprocess.run([sys.executable, "-c", PARITY_SCRIPT, json.dumps(argv)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT ")), proc.stderr


@pytest.fixture(scope="module")
def one_device(data, tmp_path_factory) -> dict:
    return parity_run(data, tmp_path_factory.mktemp("one"), 1)[0]


@pytest.mark.parametrize("layout", ["data", "fsdp"])
def test_four_devices_match_one(one_device, data, tmp_path, layout):
    result, stderr = parity_run(data, tmp_path, 4, *(FSDP if layout == "fsdp" else []))
    assert result["devices"] == 4 and one_device["steps"] == result["steps"] == 2
    assert abs(one_device["val"] - result["val"]) < 1e-5
    # Element-wise, absolute: a bias that started at 0 is -lr * a gradient summed over many pixels
    # with heavy cancellation, so its *relative* rounding error is large while the absolute one is not.
    # The bound is fp32 reduction-order noise in the first convolutions' filter gradients (jaxlib 0.12.1):
    # after one step, one device with XLA's own convolution kernels instead of YNNPACK's is 3.0e-6 from
    # the default, 4 devices 5.1e-6; the second step grows that to 1.3e-5.
    diffs = [np.abs(np.asarray(a) - np.asarray(b)).max() for a, b in zip(one_device["params"], result["params"])]
    print(f"max parameter difference, 1 device vs 4 ({layout}) after two steps: {max(diffs):.2e}")
    assert max(diffs) < 3e-5
    if layout == "data":
        assert result["device_bytes"] == result["bytes"]  # replicated
    else:
        print(f"per-device state bytes with fsdp=4: {result['device_bytes']} of {result['bytes']}")
        assert result["device_bytes"] < 0.4 * result["bytes"]
        assert "no dimension divides by fsdp=4; replicated" in stderr  # logged, not fatal


def test_onnx_extractor_features_are_cached(data, tmp_path):
    jax2onnx = pytest.importorskip("jax2onnx")

    class Extractor(nnx.Module):  # N×3×64×64 in [0, 1] -> N×16×8×8, like a YOLO neck at stride 8
        def __init__(self):
            self.conv = nnx.Conv(3, 16, (8, 8), strides=8, rngs=nnx.Rngs(0))

        def __call__(self, x):
            return jnp.transpose(self.conv(jnp.transpose(x, (0, 2, 3, 1))), (0, 3, 1, 2))

    onnx_path = tmp_path / "extractor.onnx"
    jax2onnx.to_onnx(Extractor(), [("B", 3, 64, 64)], return_mode="file", output_path=str(onnx_path))
    cache = tmp_path / "cache"
    out = run(tiny_argv(data, tmp_path, "--epochs", "2", "--set", f"data.extractor_onnx={onnx_path}",
                        "--set", f"data.feature_cache_dir={cache}"))
    cached = list(cache.glob("*.npy"))
    # One entry per readable image, train and val; the truncated JPEG gets none.
    train_images, val_images = (list(Path(data[k]).glob("*.jpg")) for k in ("train_img_dir", "val_img_dir"))
    readable = len(train_images) - 1 + len(val_images)
    assert 0 < len(cached) <= readable
    assert np.load(cached[0]).shape == (8, 8, 16)
    assert np.isfinite(out["last_val"]["loss"])


MULTIHOST_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_disable_most_optimizations", True)
from segjax.engine.mesh import initialize_distributed
from segjax.train import resolve_config, train_and_evaluate
address, process_id, argv = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
initialize_distributed(address, 2, process_id)
cfg, _ = resolve_config(argv)
out = train_and_evaluate(cfg)
print("RESULT", json.dumps({"process": jax.process_index(), "devices": jax.device_count(),
      "run_dir": out["run_dir"], "val": out["last_val"]["loss"], "rois": out["last_val"]["rois"],
      "params": [float(abs(x).sum()) for x in jax.tree.leaves(out["model_state"])]}))
"""


def test_two_processes_train_one_model(data, tmp_path):
    """Two processes on one host (one CPU device each) split the records, run one global batch per
    step, and agree on every loss and parameter; both write one shared run and checkpoint."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", "PYTHONPATH": str(ROOT)}
    argv = tiny_argv(data, tmp_path, "--epochs", "1", "--optimizer", "sgd", "--lr", "0.05")
    procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST_SCRIPT, f"127.0.0.1:{port}", str(i), json.dumps(argv)],
                              env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for i in range(2)]
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=400)
            assert proc.returncode == 0, err[-3000:]
            line = next(x for x in out.splitlines() if x.startswith("RESULT"))
            results.append(json.loads(line.removeprefix("RESULT ")))
    finally:
        for proc in procs:
            proc.kill()
    first, second = results
    assert first["devices"] == second["devices"] == 2
    assert first["run_dir"] == second["run_dir"]
    assert first["val"] == second["val"] and first["params"] == second["params"]
    # Every validation ROI was counted once across the two processes.
    from segjax.data.coco import load_person_index

    images, _ = load_person_index(data["val_ann"], data["val_img_dir"])
    assert first["rois"] == sum(len(image.persons) for image in images)
    assert any(p.name.isdigit() for p in (Path(first["run_dir"]) / "checkpoints").iterdir())


def test_trains_on_real_coco_files(realdata, tmp_path):
    tinycoco = realdata / "super_gradients" / "tests" / "data" / "tinycoco"
    ann, images = tinycoco / "annotations" / "instances_val2017.json", tinycoco / "images" / "val2017"
    argv = ["--experiment", "roi_human", "--train_ann", str(ann), "--val_ann", str(ann), "--train_img_dir",
            str(images), "--val_img_dir", str(images), *TINY, "--checkpoint_dir", str(tmp_path), "--epochs", "1",
            "--precision", "bf16"]
    out = run(argv)
    assert out["last_val"]["rois"] == 27  # every person of the real file, none lost to chunking or padding
    assert np.isfinite(out["last_val"]["loss"])
    # bf16 compute keeps parameters and BatchNorm statistics in float32.
    assert {str(x.dtype) for x in jax.tree.leaves(out["model_state"])} == {"float32"}


def test_data_stats_file_sets_the_class_weights(data, tmp_path, capsys):
    from segjax import tasks
    from segjax.train import main

    stats = tmp_path / "stats.json"
    stats.write_text(json.dumps({"num_rois": 3, "pixel_counts": [1, 2, 3], "class_frequencies": [0.2, 0.3, 0.5],
                                 "class_weights": [0.5, 2.0, 4.0]}))
    cfg, _ = resolve_config(tiny_argv(data, tmp_path, "--data_stats", str(stats)))
    task = tasks.build(tasks.resolve(cfg))
    task.train_data()
    np.testing.assert_array_equal(task.cfg.data.class_weights, [0.5, 2.0, 4.0])
    stats.write_text("{not json")
    assert main(tiny_argv(data, tmp_path, "--data_stats", str(stats))) == 2
    assert "stats.json" in capsys.readouterr().err
