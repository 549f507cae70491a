"""Scaling out and surviving it: sharding rules, the mesh, a training stream independent of the
topology, restore on other device / process counts, SIGTERM/SIGINT, SIGKILL at random moments,
damaged checkpoints, and a dead process failing the others instead of hanging them."""
import json
import logging
import os
import queue
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import ROOT, run
from jax.sharding import AbstractMesh, AxisType
from test_train import tiny_argv

from segjax import config as config_lib
from segjax import evaluate
from segjax.data import pipeline
from segjax.data.demo import write_coco_person_demo
from segjax.engine import mesh as mesh_lib
from segjax.engine import preemption, remat
from segjax.engine import sharding as sharding_lib
from segjax.engine.checkpoint import Checkpointer
from segjax.train import main


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return write_coco_person_demo(tmp_path_factory.mktemp("coco"), num_train=10, num_val=6, image_size=(64, 64))


# ----------------------------------------------------------------------------------------------
# Sharding rules and the mesh (in-process: rules only need the mesh's axis sizes)
# ----------------------------------------------------------------------------------------------
class Net(nnx.Module):
    def __init__(self):
        self.backbone = nnx.Linear(64, 32, rngs=nnx.Rngs(0))
        self.head = nnx.Linear(32, 6, rngs=nnx.Rngs(0))
        self.wide = nnx.Linear(6, 20, rngs=nnx.Rngs(0))
        self.norm = nnx.BatchNorm(6, rngs=nnx.Rngs(0))


def specs(rules, min_bytes=0) -> dict[str, tuple]:
    mesh = AbstractMesh((1, 4, 2), mesh_lib.AXES, axis_types=(AxisType.Auto,) * 3)

    def create():
        model = Net()
        return model, nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

    model, optimizer = nnx.eval_shape(create)
    shardings = sharding_lib.state_shardings(nnx.state(model), nnx.state(optimizer), mesh,
                                             sharding_lib.parse_rules(rules), min_bytes)
    return {sharding_lib.path_name(p): tuple(s.spec) for p, s in jax.tree_util.tree_flatten_with_path(shardings)[0]}


def test_sharding_rules_first_match_and_optimizer_state_follows(caplog):
    with caplog.at_level(logging.INFO, logger="segjax"):
        got = specs(("^backbone/=replicate", "head/kernel=shard_dim:-1:model", ".*=fsdp"))
    assert got["0/backbone/kernel"] == ()  # a frozen-backbone style rule wins over the later fsdp
    assert got["0/head/kernel"] == (None, "model")
    assert got["0/wide/kernel"] == (None, "fsdp")  # the largest dimension that 4 divides (20, not 6)
    for moment in ("mu", "nu"):  # Adam's moments take their parameter's sharding
        assert got[f"1/opt_state/0/{moment}/wide/kernel"] == (None, "fsdp")
        assert got[f"1/opt_state/0/{moment}/head/kernel"] == (None, "model")
    assert got["1/opt_state/0/count"] == ()
    # 6-element vectors cannot be split 4 ways: replicated and logged, never an error.
    assert got["0/head/bias"] == got["0/norm/mean"] == ()
    assert "head/bias (6,): no dimension divides by fsdp=4; replicated" in caplog.text
    # Tensors under the size floor stay replicated.
    assert specs((".*=fsdp",), min_bytes=1 << 20)["0/wide/kernel"] == ()


def test_bad_rules_and_mesh_sizes_are_config_errors(data, tmp_path):
    from segjax.train import resolve_config

    for bad in ("fsdp", "x=shard", "x=shard_dim:a:model", "(=fsdp"):
        with pytest.raises(config_lib.ConfigError, match="mesh.sharding"):
            resolve_config(tiny_argv(data, tmp_path, "--set", f"mesh.sharding={bad}"))
    with pytest.raises(config_lib.ConfigError, match="at most one"):
        resolve_config(tiny_argv(data, tmp_path, "--set", "mesh.fsdp=-1"))
    assert mesh_lib.make_mesh().shape == {"data": jax.device_count(), "fsdp": 1, "model": 1}
    with pytest.raises(config_lib.ConfigError, match="multiply to 3"):
        mesh_lib.make_mesh(data=3)


class Numbers:
    def __len__(self):
        return 12

    def __getitem__(self, i):
        return i


def augment(i, rng):
    return {"x": np.int64(i), "noise": rng.integers(1 << 30)}


def test_training_stream_does_not_depend_on_processes_and_starts_at_a_step(monkeypatch):
    def batches(processes: int, index: int, start_step: int = 0, n: int = 5) -> list[dict]:
        monkeypatch.setattr(jax, "process_count", lambda: processes)
        monkeypatch.setattr(jax, "process_index", lambda: index)
        it = iter(pipeline.train_dataset(Numbers(), augment, local_batch=4 // processes, seed=5, num_workers=0,
                                         start_step=start_step))
        return [next(it) for _ in range(n)]

    whole = batches(1, 0)
    halves = zip(batches(2, 0), batches(2, 1))
    for full, (a, b) in zip(whole, halves):  # two processes read the rows of the same global batches
        for key in ("x", "noise"):
            np.testing.assert_array_equal(full[key], np.concatenate([a[key], b[key]]))
    for want, got in zip(whole[3:], batches(1, 0, start_step=3, n=2)):  # epoch 2 included (12 / 4 = 3)
        np.testing.assert_array_equal(want["noise"], got["noise"])


def test_stop_signal_sets_a_flag_then_a_second_one_interrupts():
    previous = signal.getsignal(signal.SIGINT)
    with preemption.StopSignal() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.received == "SIGINT" and stop.stop_now(step=7, sync_every=10)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
    assert signal.getsignal(signal.SIGINT) is previous


# ----------------------------------------------------------------------------------------------
# Subprocess helpers: every child is bounded by a timeout and killed with its session
# ----------------------------------------------------------------------------------------------
def env(devices: int) -> dict:
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1"}


class Child:
    """A training process whose stderr lines can be waited for."""

    def __init__(self, args: list[str], devices: int = 1):
        self.proc = subprocess.Popen([sys.executable, *args], env=env(devices), cwd=ROOT, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        self.text = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.proc.stdout:
            self.text.append(line)
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 240) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None:
                    break
                continue
            if re.search(pattern, line):
                return line
        self.kill()
        raise AssertionError(f"never saw {pattern!r}; output:\n{''.join(self.text)[-3000:]}")

    def finish(self, timeout: float = 240) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            self.kill()

    def kill(self):
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def train_args(argv: list[str]) -> list[str]:
    return ["-c", "import jax; jax.config.update('jax_disable_most_optimizations', True); "
                  "import sys; from segjax.train import main; sys.exit(main(sys.argv[1:]))", *argv]


def checkpoint_contents(run_dir: Path) -> tuple[int, dict, list[np.ndarray]]:
    """(latest step, its metadata, its model and optimizer leaves) of a run, read on this device."""
    from segjax.engine.setup import restore_model

    checkpointer = Checkpointer(Path(run_dir) / "checkpoints", read_only=True)
    step = checkpointer.latest_step()
    meta = checkpointer.meta(step)
    checkpointer.close()
    state = restore_model(Path(run_dir) / "checkpoints" / str(step)).state
    return step, meta, [np.asarray(x) for x in jax.tree.leaves(state)]


# ----------------------------------------------------------------------------------------------
# SIGTERM and SIGKILL at random moments: the resumed run equals an uninterrupted one
# ----------------------------------------------------------------------------------------------
def test_signals_and_kills_then_resume_equal_an_uninterrupted_run(data, tmp_path):
    rng = random.Random(2026)
    argv = tiny_argv(data, tmp_path / "runs", "--epochs", "3")
    reference = run(tiny_argv(data, tmp_path / "reference", "--epochs", "3"))

    # 1. SIGTERM inside epoch 1: finish the step, save, exit 75.
    child = Child(train_args(argv))
    line = child.wait_for(r"epoch 1 step \d+ \(\d+/\d+\): loss")
    steps_per_epoch = int(re.search(r"/(\d+)\)", line).group(1))
    assert steps_per_epoch >= 3  # else there is no "inside" of an epoch
    child.proc.send_signal(signal.SIGTERM)
    assert child.finish() == preemption.EXIT_PREEMPTED, "".join(child.text)[-3000:]
    out = "".join(child.text)
    saved = int(re.search(r"saved checkpoint step (\d+) after SIGTERM", out).group(1))
    # On an idle machine the last steps of the tiny epoch can finish before the signal lands: the
    # save is then at the epoch's end (the resumed run must still equal the reference).
    assert 0 < saved <= steps_per_epoch and "--resume" in out
    run_dir = Path(re.search(r"run directory (\S+);", out).group(1))

    # 2. SIGKILL during a validation (right after the epoch's train metrics are logged).
    child = Child(train_args(["--experiment", "roi_human", "--resume", str(run_dir)]))
    child.wait_for(rf"resumed from .* step {saved} ")
    child.wait_for(r"epoch 2 step \d+ train:")
    time.sleep(rng.uniform(0, 0.05))
    child.kill()

    # 3. SIGKILL while epoch 2's checkpoint is being written: as soon as orbax's temporary
    # directory appears (it is renamed to the step when complete).
    child = Child(train_args(["--experiment", "roi_human", "--resume", str(run_dir)]))
    child.wait_for(r"saving checkpoint step \d+ \(epoch 2\)")
    deadline = time.monotonic() + 60
    while not list((run_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*")) and time.monotonic() < deadline:
        time.sleep(0.001)
    child.kill()
    assert list((run_dir / "checkpoints").glob("*.orbax-checkpoint-tmp*")), "the save finished before the kill"

    # 4. Resume to the end; same step, parameters, optimizer-independent metrics as the reference.
    assert main(["--experiment", "roi_human", "--resume", str(run_dir)]) == 0
    want_step, want_meta, want = checkpoint_contents(reference["run_dir"])
    got_step, got_meta, got = checkpoint_contents(run_dir)
    assert got_step == want_step == 3 * steps_per_epoch
    for a, b in zip(want, got):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-6)
    for key in ("loss", "miou", "iou_this_person"):
        assert abs(got_meta["val"][key] - want_meta["val"][key]) <= 1e-6


def test_damaged_checkpoint_names_the_step_and_an_earlier_one_resumes(data, tmp_path, capsys):
    first = run(tiny_argv(data, tmp_path / "runs", "--epochs", "2"), stop_after_epoch=1)
    ckpts = Path(first["run_dir"]) / "checkpoints"
    (early,) = [p for p in ckpts.iterdir() if p.name.isdigit()]
    # A later step to damage: a copy of the complete one under a later number.
    latest = int(early.name) + 1
    shutil.copytree(early, ckpts / str(latest))

    arrays = sorted((f for f in (ckpts / str(latest) / "model").rglob("*") if f.is_file() and f.stat().st_size > 64),
                    key=lambda f: -f.stat().st_size)
    arrays[0].write_bytes(arrays[0].read_bytes()[: arrays[0].stat().st_size // 3])  # truncated array file
    assert main(["--experiment", "roi_human", "--resume", first["run_dir"]]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint step {latest} in {ckpts} cannot be read" in err and f"earlier steps: [{early.name}]" in err

    (ckpts / str(latest) / "meta" / "metadata").unlink()  # missing metadata
    assert main(["--experiment", "roi_human", "--resume", first["run_dir"]]) == 2
    assert f"checkpoint step {latest} in {ckpts} cannot be read" in capsys.readouterr().err

    # Recovery as README says: an explicit earlier step is refused while later ones exist ...
    assert main(["--experiment", "roi_human", "--resume", str(early)]) == 2
    assert "move them aside" in capsys.readouterr().err
    # ... and once the damaged one is moved aside, --resume continues from the earlier step.
    (ckpts / str(latest)).rename(tmp_path / "damaged")
    assert main(["--experiment", "roi_human", "--resume", first["run_dir"]]) == 0
    assert max(int(p.name) for p in ckpts.iterdir() if p.name.isdigit()) == 2 * int(early.name)


# ----------------------------------------------------------------------------------------------
# Restore on other topologies: 4 devices (fsdp) -> 2 processes -> 1 device, equal to 1 device
# ----------------------------------------------------------------------------------------------
SEGMENT_SCRIPT = """
import json, sys
import jax
jax.config.update("jax_disable_most_optimizations", True)
from segjax.engine.mesh import initialize_distributed
from segjax.train import resolve_config, train_and_evaluate
argv, stop_after, processes = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
if processes > 1:
    initialize_distributed(sys.argv[4], processes, int(sys.argv[5]), heartbeat_timeout=int(sys.argv[6]))
out = train_and_evaluate(resolve_config(argv)[0], stop_after_epoch=stop_after)
print("RUN_DIR", out["run_dir"], flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def segment(argv: list[str], stop_after: int, *, devices: int = 1, processes: int = 1, heartbeat: int = 30):
    port = free_port()
    return [Child(["-c", SEGMENT_SCRIPT, json.dumps(argv), str(stop_after), str(processes), f"127.0.0.1:{port}",
                   str(i), str(heartbeat)], devices=devices) for i in range(processes)]


def test_resume_on_other_device_and_process_counts(data, tmp_path):
    # As in test_train's four-devices-match-one: SGD, batch 16 (one step per epoch). The restore
    # itself is exact, but each sharding sums gradients in its own order, and SGD with BatchNorm
    # amplifies that fp32 noise step by step: at batch 4 (4 steps an epoch), one fsdp epoch
    # already ends 1.2e-5 from one device while 4 data-parallel steps end 1.6e-6 away.
    sgd = ["--epochs", "3", "--optimizer", "sgd", "--lr", "0.01", "--batch_size", "16",
           "--set", "train.eval_batch_size=8"]
    reference = run(tiny_argv(data, tmp_path / "reference", *sgd))
    fsdp = ["--set", "mesh.data=2", "--set", "mesh.fsdp=2", "--set", "mesh.min_shard_bytes=0"]
    (child,) = segment(tiny_argv(data, tmp_path / "runs", *sgd, *fsdp), 1, devices=4)
    assert child.finish() == 0, "".join(child.text)[-3000:]
    run_dir = re.search(r"RUN_DIR (\S+)", "".join(child.text)).group(1)
    # evaluate (and predict and export, which share its restore_model) read the 4-device checkpoint here.
    evaluated = evaluate.evaluate_checkpoint(run_dir, visualize=False)
    saved_val = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()][-1]
    assert saved_val["split"] == "val" and abs(evaluated["metrics"]["loss"] - saved_val["loss"]) < 1e-5
    # Epoch 2 on two processes with one device each (the saved mesh sizes no longer fit: reset them).
    resume = ["--experiment", "roi_human", "--resume", run_dir, "--set", "mesh.data=-1", "--set", "mesh.fsdp=1"]
    children = segment(resume, 2, processes=2)
    for c in children:
        assert c.finish() == 0, "".join(c.text)[-3000:]
    # Epoch 3 here, on one device.
    resumed = run(resume)
    assert resumed["steps"] == reference["steps"]
    for a, b in zip(jax.tree.leaves(reference["model_state"]), jax.tree.leaves(resumed["model_state"])):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-5)
    assert abs(resumed["last_val"]["loss"] - reference["last_val"]["loss"]) < 1e-5


# ----------------------------------------------------------------------------------------------
# A dead process fails the others within the heartbeat timeout instead of hanging them
# ----------------------------------------------------------------------------------------------
def test_a_dead_process_fails_the_other_instead_of_hanging(data, tmp_path):
    children = segment(tiny_argv(data, tmp_path, "--epochs", "50"), 50, processes=2, heartbeat=5)
    try:
        children[1].wait_for(r"epoch 1 step \d+ \(")
        children[1].kill()
        started = time.monotonic()
        rc = children[0].finish(timeout=60)
        waited = time.monotonic() - started
    finally:
        for c in children:
            c.kill()
    out = "".join(children[0].text)
    assert rc != 0 and waited < 45, out[-2000:]
    assert "stopped sending heartbeats" in out or "another task died" in out, out[-2000:]


# ----------------------------------------------------------------------------------------------
# Activation checkpointing by config
# ----------------------------------------------------------------------------------------------
class Block(nnx.Module):
    def __init__(self, width: int, rngs: nnx.Rngs):
        self.up = nnx.Linear(width, 4 * width, rngs=rngs)
        self.norm = nnx.BatchNorm(4 * width, rngs=rngs)
        self.down = nnx.Linear(4 * width, width, rngs=rngs)

    def __call__(self, x):
        return x + self.down(jax.nn.gelu(self.norm(self.up(x))))


class Tower(nnx.Module):
    def __init__(self):
        self.blocks = nnx.List([Block(16, nnx.Rngs(i)) for i in range(4)])

    def __call__(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_remat_keeps_fewer_activations_for_the_backward_pass_and_changes_no_result():
    x = jax.random.normal(jax.random.key(0), (256, 16))

    def kept_bytes_and_gradients(patterns):
        model = Tower()
        wrapped = remat.apply(model, patterns)
        graphdef, state = nnx.split(model)

        def loss(state):
            return (nnx.merge(graphdef, state)(x) ** 2).mean()

        # The backward function's closure holds exactly what the forward pass kept for it.
        _, backward = jax.vjp(loss, state)
        kept = sum(leaf.nbytes for leaf in jax.tree.leaves(backward))
        return wrapped, kept, jax.grad(loss)(state)

    _, plain_bytes, plain = kept_bytes_and_gradients(())
    wrapped, remat_bytes, rematted = kept_bytes_and_gradients((r"^blocks/\d+$",))
    assert wrapped == ["blocks/0", "blocks/1", "blocks/2", "blocks/3"]
    print(f"activations kept for the backward pass: {plain_bytes} bytes plain, {remat_bytes} with remat")
    assert remat_bytes < 0.5 * plain_bytes
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-7)
