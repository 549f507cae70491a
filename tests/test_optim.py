"""Learning-rate schedules, parameter groups and the EMA of the weights (segjax/engine/optim.py)
against their reference formulas and torch.optim; the EMA through training, resume and evaluation."""
import dataclasses
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import ROI_TINY, run

from segjax import evaluate, train
from segjax.config import ConfigError, OptimConfig, from_dict, load_experiment, override, validate
from segjax.data.demo import write_coco_person_demo
from segjax.engine import optim as optim_lib
from segjax.engine import sharding as sharding_lib
from segjax.engine.setup import restore_model
from segjax.engine.sharding import path_name
from segjax.models.mask2former import MASK2FORMER_VARIANTS, Mask2Former


def optim_cfg(**changes) -> OptimConfig:
    return dataclasses.replace(OptimConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0,
                                           scheduler="none"), **changes)


def lrs(schedule, n):
    return np.array([float(schedule(t)) for t in range(n)])


# --- schedules -----------------------------------------------------------------------------------
def reference_lr(cfg: OptimConfig, t: int, total: int, per_epoch: int) -> float:
    """mmsegmentation's LinearLR then the decay, closed form, in float64."""
    lr, w, r = cfg.lr, cfg.warmup_steps, cfg.warmup_ratio
    if t < w:
        return lr * (r + (1 - r) * t / w)
    s, n = t - w, total - w
    if cfg.scheduler == "poly":
        return (lr - cfg.min_lr) * (1 - s / n) ** cfg.power + cfg.min_lr
    if cfg.scheduler == "cosine":
        return cfg.min_lr + (lr - cfg.min_lr) * (1 + np.cos(np.pi * s / n)) / 2
    if cfg.scheduler == "step":
        return lr * cfg.gamma ** (s // (cfg.step_epochs * per_epoch))
    if cfg.scheduler == "exponential":
        return lr * cfg.gamma ** (s // per_epoch)
    return lr


@pytest.mark.parametrize("scheduler", ["poly", "cosine", "step", "exponential", "none"])
@pytest.mark.parametrize("warmup", [0, 7])
def test_schedule_matches_the_closed_form(scheduler, warmup):
    # 12 micro-batches per epoch, 2 accumulated: 6 updates per epoch, 5 epochs = 30 updates.
    cfg = optim_cfg(scheduler=scheduler, warmup_steps=warmup, warmup_ratio=0.01, min_lr=0.004, power=0.7,
                    step_epochs=2, gamma=0.5, gradient_accumulation=2)
    _, schedule = optim_lib.make_optimizer(cfg, steps_per_epoch=12, epochs=5)
    expected = [reference_lr(cfg, t, 30, 6) for t in range(30)]
    np.testing.assert_allclose(lrs(schedule, 30), expected, rtol=1e-6, atol=1e-7 * cfg.lr)  # float32 rounding


@pytest.mark.parametrize("scheduler", ["poly", "cosine"])
def test_warmup_and_decay_match_torch_sequential_lr(ref, scheduler):
    torch = ref.torch
    lr, warmup, total, ratio = 0.02, 5, 23, 1e-3
    param = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([param], lr=lr)
    ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=ratio, end_factor=1.0, total_iters=warmup)
    if scheduler == "poly":
        decay = torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=total - warmup, power=0.9)
        min_lr = 0.0  # PolynomialLR decays to 0
    else:
        min_lr = 1e-4
        decay = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total - warmup, eta_min=min_lr)
    chained = torch.optim.lr_scheduler.SequentialLR(opt, [ramp, decay], milestones=[warmup])
    theirs = []
    for _ in range(total):  # the rate each update uses, stepping per update
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        chained.step()
    cfg = optim_cfg(lr=lr, scheduler=scheduler, warmup_steps=warmup, warmup_ratio=ratio, min_lr=min_lr)
    _, schedule = optim_lib.make_optimizer(cfg, steps_per_epoch=total, epochs=1)
    np.testing.assert_allclose(lrs(schedule, total), theirs, rtol=1e-6, atol=1e-7 * lr)


def test_updates_use_the_scheduled_rate():
    cfg = optim_cfg(scheduler="poly", warmup_steps=2, power=1.0)
    tx, schedule = optim_lib.make_optimizer(cfg, steps_per_epoch=6, epochs=1)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    grad = np.array([1.0, -2.0], np.float32)
    for t in range(6):
        updates, state = tx.update({"w": jnp.asarray(grad)}, state, params)
        np.testing.assert_allclose(updates["w"], -reference_lr(cfg, t, 6, 6) * grad, rtol=1e-6, atol=1e-7 * cfg.lr)


# --- parameter groups ----------------------------------------------------------------------------
GROUPS = ("backbone/.*norm=lr_mult:0.1;decay_mult:0", "^backbone/=lr_mult:0.1", "bias$=decay_mult:0",
          "head=lr_mult:2;decay_mult:0.5")
SHAPES = {"backbone/conv/kernel": (3, 4), "backbone/norm/scale": (4,), "head/kernel": (4, 2), "head/bias": (2,),
          "neck/kernel": (2, 2)}
# The same groups written out by hand for torch: (lr_mult, decay_mult) per parameter.
TORCH_GROUPS = {"backbone/norm/scale": (0.1, 0.0), "backbone/conv/kernel": (0.1, 1.0), "head/bias": (1.0, 0.0),
                "head/kernel": (2.0, 0.5), "neck/kernel": (1.0, 1.0)}


def nested(flat: dict) -> dict:
    out = {}
    for name, value in flat.items():
        first, second = name.split("/", 1)
        out.setdefault(first, {})
        if "/" in second:
            mid, last = second.split("/")
            out[first].setdefault(mid, {})[last] = value
        else:
            out[first][second] = value
    return out


@pytest.mark.parametrize("optimizer, scheduler", [("sgd", "none"), ("adam", "none"), ("adamw", "poly")])
def test_param_groups_match_torch_optim(ref, optimizer, scheduler):
    torch = ref.torch
    rng = np.random.default_rng(0)
    init = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    curvature = {k: rng.uniform(0.5, 2.0, size=s).astype(np.float32) for k, s in SHAPES.items()}
    shift = {k: rng.normal(size=s).astype(np.float32) for k, s in SHAPES.items()}
    lr, wd, steps, warmup = (0.05 if optimizer == "sgd" else 0.01), 0.1, 6, 2

    def torch_loss(p, name):  # a different quadratic per parameter: gradient c * p + d
        return (0.5 * torch.from_numpy(curvature[name]).double() * p ** 2
                + torch.from_numpy(shift[name]).double() * p).sum()

    def jax_loss(tree):
        return sum((0.5 * curvature[path_name(path)] * p ** 2 + shift[path_name(path)] * p).sum()
                   for path, p in jax.tree_util.tree_leaves_with_path(tree))

    # torch in float64: the difference is then float32 rounding of ours alone.
    params = {k: torch.nn.Parameter(torch.from_numpy(v.astype(np.float64))) for k, v in init.items()}
    kind = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[optimizer]
    extra = {"momentum": 0.9} if optimizer == "sgd" else {}
    opt = kind([{"params": [params[k]], "lr": lr * m, "weight_decay": wd * d} for k, (m, d) in TORCH_GROUPS.items()],
               lr=lr, **extra)
    sched = None
    if scheduler == "poly":
        sched = torch.optim.lr_scheduler.SequentialLR(opt, [
            torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=warmup),
            torch.optim.lr_scheduler.PolynomialLR(opt, total_iters=steps - warmup, power=0.9)], milestones=[warmup])
    theirs = []
    for _ in range(steps):
        opt.zero_grad()
        sum(torch_loss(p, k) for k, p in params.items()).backward()
        opt.step()
        if sched:
            sched.step()
        theirs.append({k: p.detach().numpy().copy() for k, p in params.items()})

    cfg = optim_cfg(optimizer=optimizer, lr=lr, weight_decay=wd, momentum=0.9, param_groups=GROUPS,
                    scheduler=scheduler, warmup_steps=warmup if sched else 0, warmup_ratio=0.1)
    tx, _ = optim_lib.make_optimizer(cfg, steps_per_epoch=steps, epochs=1)
    ours = nested({k: jnp.asarray(v) for k, v in init.items()})
    state = tx.init(ours)
    grad_fn = jax.jit(jax.grad(jax_loss))
    for expected in theirs:
        updates, state = tx.update(grad_fn(ours), state, ours)
        ours = optax.apply_updates(ours, updates)
        got = {path_name(path): np.asarray(x) for path, x in jax.tree_util.tree_leaves_with_path(ours)}
        for name in SHAPES:
            np.testing.assert_allclose(got[name], expected[name], rtol=0, atol=1e-6, err_msg=name)


def test_groups_take_the_first_match_and_log_their_counts(caplog):
    groups = optim_lib.parse_groups(GROUPS)
    assert [(g.lr_mult, g.decay_mult) for g in groups] == [(0.1, 0.0), (0.1, 1.0), (1.0, 0.0), (2.0, 0.5)]
    for name, mults in TORCH_GROUPS.items():
        group = optim_lib.group_of(name, groups)
        assert ((group.lr_mult, group.decay_mult) if group else (1.0, 1.0)) == mults, name
    params = nested({k: jnp.zeros(s) for k, s in SHAPES.items()})
    with caplog.at_level("INFO", logger="segjax"):
        optim_lib.log_groups(GROUPS, params)
    assert "param group ^backbone/: lr x0.1, weight decay x1: 1 tensors, 12 parameters" in caplog.text
    # head/bias went to the earlier bias$
    assert "param group head: lr x2, weight decay x0.5: 1 tensors, 8 parameters" in caplog.text
    assert "param group (the rest): lr x1, weight decay x1: 1 tensors, 4 parameters" in caplog.text
    with pytest.raises(ConfigError, match=r"optim.param_groups: 'nowhere' matches no trained parameter"):
        optim_lib.log_groups(("nowhere=lr_mult:2",), params)


def mask2former_expectation(model) -> dict[str, tuple[float, float]]:
    """detectron2 Mask2Former build_optimizer by module type: (lr_mult, decay_mult) per parameter."""
    norms = (nnx.LayerNorm, nnx.GroupNorm, nnx.BatchNorm)
    expected = {}
    for module_path, module in nnx.iter_modules(model):
        for path, _ in jax.tree_util.tree_leaves_with_path(nnx.state(module, nnx.Param)):
            if len(path_name(path).split("/")) > 1:
                continue  # a parameter belongs to the module that holds it directly
            name = "/".join([*map(str, module_path), path_name(path)])
            lr = 0.1 if name.startswith("backbone/") else 1.0
            no_decay = (isinstance(module, (*norms, nnx.Embed))
                        or name.endswith(("relative_position_bias_table", "absolute_pos_embed")))
            expected[name] = (lr, 0.0 if no_decay else 1.0)
    return expected


@pytest.mark.parametrize("variant", ["tiny", "resnet50"])
def test_mask2former_preset_is_detectron2s_build_optimizer(variant):
    model = nnx.eval_shape(lambda: Mask2Former(3, **MASK2FORMER_VARIANTS[variant], rngs=nnx.Rngs(0)))
    expected = mask2former_expectation(model)
    names = [path_name(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))]
    assert sorted(expected) == sorted(names)
    groups = optim_lib.parse_groups(("mask2former",))
    got = {}
    for name in names:
        group = optim_lib.group_of(name, groups)
        got[name] = (group.lr_mult, group.decay_mult) if group else (1.0, 1.0)
    assert got == expected
    assert {v for v in got.values()} == {(0.1, 0.0), (0.1, 1.0), (1.0, 0.0), (1.0, 1.0)}
    if variant == "tiny":  # every regex of the preset names parameters of the Swin model
        for g in groups:
            assert any(g.pattern.search(n) for n in names), g.pattern.pattern


# --- EMA -----------------------------------------------------------------------------------------
class Tiny(nnx.Module):
    def __init__(self, rngs):
        self.linear = nnx.Linear(3, 2, rngs=rngs)
        self.bn = nnx.BatchNorm(2, rngs=rngs)

    def __call__(self, x):
        return self.bn(self.linear(x))


@pytest.mark.parametrize("accumulation", [1, 3])
def test_ema_follows_the_parameter_trajectory(accumulation):
    decay, micro_steps = 0.7, 12
    cfg = optim_cfg(optimizer="adamw", lr=0.05, weight_decay=0.1, ema_decay=decay,
                    gradient_accumulation=accumulation)
    tx, _ = optim_lib.make_optimizer(cfg, steps_per_epoch=micro_steps, epochs=1)
    model = Tiny(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(0)

    @nnx.jit
    def step(model, optimizer, x):
        grads = nnx.grad(lambda m: jnp.sum(m(x) ** 3))(model)
        optimizer.update(model, grads)

    def flat_params():
        return {path_name(p): np.asarray(x, np.float64) for p, x in
                jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param))}

    ema = flat_params()  # starts at the initial weights
    for i in range(micro_steps):
        step(model, optimizer, jnp.asarray(rng.normal(size=(4, 3)), jnp.float32))
        if (i + 1) % accumulation == 0:  # an optimizer update
            ema = {k: decay * ema[k] + (1 - decay) * v for k, v in flat_params().items()}
    averaged = optim_lib.ema_weights(nnx.state(model), nnx.state(optimizer))
    got = {path_name(p): np.asarray(x) for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(model))}
    for path, x in jax.tree_util.tree_leaves_with_path(averaged):
        name = path_name(path)
        if name in ema:
            np.testing.assert_allclose(x, ema[name], rtol=1e-5, atol=1e-6, err_msg=name)
            assert not np.allclose(x, got[name], atol=1e-4), name  # the average is not the weights
        else:  # BatchNorm statistics are the model's own
            np.testing.assert_array_equal(x, got[name])


def test_ema_is_sharded_as_its_parameters():
    mesh = jax.sharding.AbstractMesh((1, 2, 1), ("data", "fsdp", "model"))
    tx, _ = optim_lib.make_optimizer(optim_cfg(ema_decay=0.9, gradient_accumulation=2), 4, 1)

    def create():
        model = Tiny(nnx.Rngs(0))
        return model, nnx.Optimizer(model, tx, wrt=nnx.Param)

    model, optimizer = nnx.eval_shape(create)
    model_shardings, opt_shardings = sharding_lib.state_shardings(
        nnx.state(model), nnx.state(optimizer), mesh, sharding_lib.parse_rules((".*=fsdp",)), 0)
    params = {path_name(p): s.spec for p, s in jax.tree_util.tree_leaves_with_path(model_shardings)}
    ema = {"/".join(path_name(p).split("/ema/")[1:]): s.spec
           for p, s in jax.tree_util.tree_leaves_with_path(opt_shardings) if "/ema/" in path_name(p)}
    assert sorted(ema) == ["bn/bias", "bn/scale", "linear/bias", "linear/kernel"]
    assert all(spec == params[name] for name, spec in ema.items())
    assert params["linear/kernel"] == jax.sharding.PartitionSpec(None, "fsdp")  # split, not replicated


# --- through training, resume, evaluation and prediction ------------------------------------------------
EMA_FLAGS = ["--set", "optim.ema_decay=0.6", "--set", "optim.scheduler=poly", "--set", "optim.warmup_steps=1",
             "--set", "optim.gradient_accumulation=2", "--set", "optim.param_groups=backbone=lr_mult:0.5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    return write_coco_person_demo(tmp_path_factory.mktemp("coco"), num_train=16, num_val=4, image_size=(64, 64))


def argv(data: dict, run_root: Path, *extra: str) -> list[str]:
    return ["--experiment", "roi_human", *(f"--{k}={v}" for k, v in data.items()), *ROI_TINY,
            "--batch_size", "4", "--num_workers", "0", "--lr", "3e-3", "--epochs", "2",
            "--set", "train.num_visualizations=0", "--set", "train.log_every=2",
            "--checkpoint_dir", str(run_root), *EMA_FLAGS, *extra]


@pytest.fixture(scope="module")
def straight(data, tmp_path_factory) -> dict:
    return run(argv(data, tmp_path_factory.mktemp("runs")))


def records(run_dir: str) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_train_rows_carry_the_last_updates_rate(straight):
    cfg = from_dict(json.loads((Path(straight["run_dir"]) / "config.json").read_text())).optim
    assert (cfg.scheduler, cfg.warmup_steps, cfg.gradient_accumulation) == ("poly", 1, 2)
    # A row's step counts micro-batches, 2 per update: its last update is step // 2 - 1 (0-based).
    rows = [r for r in records(straight["run_dir"]) if r["split"] == "train"]
    assert [r["epoch"] for r in rows] == [1, 2] and rows[-1]["step"] == straight["steps"]
    total = straight["steps"] // 2
    for r in rows:
        assert r["lr"] == pytest.approx(reference_lr(cfg, r["step"] // 2 - 1, total, total // 2), rel=1e-6)


def test_resume_with_ema_is_exact(straight, data, tmp_path):
    interrupted = run(argv(data, tmp_path), stop_after_epoch=1)
    resumed = run(["--experiment", "roi_human", "--resume", interrupted["run_dir"]])
    for key in ("model_state", "opt_state"):  # the EMA lives in the optimizer state
        for a, b in zip(jax.tree.leaves(straight[key]), jax.tree.leaves(resumed[key])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    assert abs(straight["last_val"]["loss"] - resumed["last_val"]["loss"]) <= 1e-6


def test_validation_evaluate_and_restore_use_the_ema(straight):
    run_dir = straight["run_dir"]
    ema_state = optim_lib.ema_weights(straight["model_state"], straight["opt_state"])
    last = Path(run_dir) / "checkpoints" / str(straight["steps"])
    restored = restore_model(last)  # what predict and export_onnx load
    for a, b in zip(jax.tree.leaves(restored.state), jax.tree.leaves(ema_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(ema_state),
                                                         jax.tree.leaves(straight["model_state"])))
    # evaluate: the validation of the training run (EMA weights), not the raw weights.
    averaged = evaluate.evaluate_checkpoint(last, visualize=False)["metrics"]
    raw = evaluate.evaluate_checkpoint(last, visualize=False, overrides=["optim.ema_decay=0"])["metrics"]
    val = [r for r in records(run_dir) if r["split"] == "val" and r["step"] == straight["steps"]][-1]
    assert averaged["loss"] == pytest.approx(val["loss"], abs=1e-6)
    assert abs(raw["loss"] - averaged["loss"]) > 1e-4


def test_init_from_an_ema_run_starts_from_its_average(straight, data, tmp_path):
    last = Path(straight["run_dir"]) / "checkpoints" / str(straight["steps"])
    summary = run(argv(data, tmp_path, "--init_from", str(last), "--test_only"))
    ema_state = optim_lib.ema_weights(straight["model_state"], straight["opt_state"])
    for a, b in zip(jax.tree.leaves(summary["model_state"]), jax.tree.leaves(ema_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert summary["last_val"]["loss"] == pytest.approx(straight["last_val"]["loss"], abs=1e-6)


# --- bad input -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def base():
    return load_experiment("roi_human")


@pytest.mark.parametrize("key, text, message", [
    ("optim.power", "0", r"optim.power must be > 0, got 0.0"),
    ("optim.warmup_steps", "-1", r"optim.warmup_steps must be >= 0, got -1"),
    ("optim.warmup_ratio", "0", r"optim.warmup_ratio must be within \(0, 1\], got 0.0"),
    ("optim.warmup_ratio", "1.5", r"optim.warmup_ratio must be within \(0, 1\]"),
    ("optim.ema_decay", "1", r"optim.ema_decay must be within \[0, 1\) \(0 = off\), got 1.0"),
    ("optim.ema_decay", "-0.1", r"optim.ema_decay must be within \[0, 1\)"),
    ("optim.param_groups", "backbone=lr:0.1",
     r"optim.param_groups: 'backbone=lr:0.1': unknown option 'lr:0.1'; the options are lr_mult:X and decay_mult:Y"),
    ("optim.param_groups", "backbone=lr_mult:-1", r"'backbone=lr_mult:-1': lr_mult must be a number >= 0, got '-1'"),
    ("optim.param_groups", "backbone=decay_mult:x", r"decay_mult must be a number >= 0, got 'x'"),
    ("optim.param_groups", "backbone",
     r"'backbone' is neither REGEX=lr_mult:X;decay_mult:Y nor a preset \(mask2former\)"),
    ("optim.param_groups", "back(bone=lr_mult:2", r"'back\(bone=lr_mult:2': bad regex"),
])
def test_validate_rejects(base, key, text, message):
    with pytest.raises(ConfigError, match=message):
        validate(override(base, key, text))


def test_groups_and_presets_parse_from_the_command_line(base):
    cfg = validate(override(base, "optim.param_groups", "head=lr_mult:10,mask2former,norm=decay_mult:0"))
    assert cfg.optim.param_groups == ("head=lr_mult:10", "mask2former", "norm=decay_mult:0")
    groups = optim_lib.parse_groups(cfg.optim.param_groups)
    assert len(groups) == 2 + len(optim_lib.PRESETS["mask2former"]) and groups[1].preset == "mask2former"


@pytest.mark.parametrize("extra, message", [
    (["--set", "optim.warmup_steps=6"], "optim.warmup_steps=6 must be < the run's 6 optimizer updates"),
    (["--set", "optim.param_groups=nowhere=lr_mult:2"], "optim.param_groups: 'nowhere' matches no trained parameter"),
    (["--set", "optim.ema_decay=1.5"], "optim.ema_decay must be within [0, 1)"),
])
def test_training_mistakes_are_one_line_and_exit_2(data, tmp_path, capsys, extra, message):
    assert train.main(argv(data, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and message in err[-1], err
    assert re.search("Traceback", "\n".join(err)) is None
