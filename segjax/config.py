"""Typed experiment configs, experiment lookup, `a.b=value` overrides and CLI aliases.

An experiment is a Python file whose `get_config()` returns a frozen `Config`. Built-in ones live
in the `experiments` package; `--experiment path/to/file.py` loads a user's own.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import logging
import math
import re
import sys
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal


class ConfigError(ValueError):
    """A bad experiment name, override key or value; the message names the valid choices."""


def flag(default: Any, name: str = "") -> Any:
    """A config field that is also a command-line flag, as the original PyTorch scripts had it:
    `--<name>` (default: the field's name) is `--set <section>.<field>=`."""
    return field(default=default, metadata={"flag": name})


def flags(cfg: Any, prefix: str = "") -> dict[str, str]:
    """{flag name: dotted key} of every `flag` field in `cfg`'s sections."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out.update(flags(value, f"{prefix}{f.name}."))
        elif "flag" in f.metadata:
            out[f.metadata["flag"] or f.name] = f"{prefix}{f.name}"
    return out


def updated(cfg: Any, **sections: dict) -> Any:
    """`cfg` with fields of its sections replaced: `updated(cfg, train=dict(epochs=3))`."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in sections.items()})


@dataclass(frozen=True)
class OptimConfig:
    optimizer: Literal["adamw", "adam", "sgd"] = flag("adamw")
    lr: float = flag(1e-3)
    weight_decay: float = flag(1e-4)
    momentum: float = 0.9  # sgd only
    # Per optimizer update, after the warm-up: cosine / poly to min_lr at the end, step / exponential per epoch.
    scheduler: Literal["cosine", "step", "exponential", "poly", "none"] = flag("cosine")
    min_lr: float = flag(0.0)  # floor of the cosine and poly schedules (mmseg's eta_min)
    power: float = 0.9  # poly: (lr - min_lr) * (1 - t / T) ** power + min_lr
    warmup_steps: int = 0  # optimizer updates of linear warm-up from lr * warmup_ratio (mmengine LinearLR)
    warmup_ratio: float = 1e-3
    step_epochs: int = 10  # step scheduler: multiply by `gamma` every this many epochs
    gamma: float = 0.1  # step and exponential (per epoch) decay factor
    gradient_clip: float = flag(0.0)  # max global gradient norm; 0 = off
    gradient_accumulation: int = flag(1)  # micro-batches per optimizer update
    # Ordered "REGEX=lr_mult:X;decay_mult:Y" over parameter paths (as mesh.sharding's), torch.optim
    # param groups with lr * lr_mult and weight_decay * decay_mult; the first match wins, unmatched
    # parameters 1, 1. A preset name (engine/optim.py PRESETS: "mask2former") expands in place.
    param_groups: tuple[str, ...] = ()
    # EMA of the weights after each update (0 = off): validation, the best checkpoint, evaluate,
    # predict and export use it; checkpoints hold both.
    ema_decay: float = 0.0


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = flag(10)
    batch_size: int = flag(8)  # global batch, split over every device of every process
    eval_batch_size: int = 0  # 0 = batch_size
    seed: int = flag(0)
    precision: Literal["fp32", "bf16"] = flag("fp32")  # compute dtype; params, BN stats, loss stay f32
    remat: tuple[str, ...] = ()  # regexes over module paths: recompute their activations (saves memory)
    num_workers: int = flag(0)  # grain worker processes; 0 = read in the training process
    validate_every: int = flag(1)  # epochs
    save_every: int = flag(1)  # epochs; the last epoch is always saved
    log_every: int = 10  # steps between metric fetches (the only host syncs in an epoch)
    num_visualizations: int = 4  # validation overlays written per validation
    eval_at_start: bool = False  # validate the untrained model too, as a baseline
    max_bad_record_ratio: float = 0.05  # stop when more records than this are unreadable
    max_nonfinite_steps: int = 20  # stop after this many steps with a NaN/inf loss (skipped)
    run_root: str = flag("runs", "checkpoint_dir")
    # Run directory under run_root; fields: {experiment}, {model} (model.name), {metric}, {timestamp}.
    run_name: str = "{experiment}/{timestamp}"
    checkpoint_subdir: str = "checkpoints"
    resume: str = ""  # run dir / checkpoint dir / "latest": continue exactly
    resume_epochs: int = flag(0)  # with resume: train this many epochs beyond the checkpoint
    # Run/checkpoint to load weights from (no optimizer, no data state); "latest" = newest run.
    init_from: str = flag("")
    test_only: bool = flag(False)  # only validate the checkpoint given by resume / init_from


@dataclass(frozen=True)
class MeshConfig:
    """Device mesh and parameter sharding (README "Scaling out"). Axis sizes multiply to the device
    count; -1 = the devices left over. The batch is split over `data` x `fsdp`."""
    data: int = -1
    fsdp: int = 1
    model: int = 1
    # Ordered "REGEX=RULE" over parameter paths ("backbone/stages/0/conv/kernel"), applied to params,
    # model state and optimizer state alike; the first match wins, unmatched tensors are replicated.
    # RULE: replicate | fsdp (the largest dimension divisible by the fsdp size) | shard_dim:DIM:AXIS.
    sharding: tuple[str, ...] = (".*=fsdp",)
    min_shard_bytes: int = 4 << 20  # the fsdp rule leaves smaller tensors replicated


@dataclass(frozen=True)
class EvalConfig:
    """The evaluation protocol of semantic outputs (validation, segjax.evaluate, segjax.predict), as
    mmsegmentation's test pipeline; README "Evaluation protocol". The defaults are the fast fixed-size
    batched validation (each image resized into the data's eval size); any other value of resize,
    mode, scales or flip runs the protocol per image, metrics at each label's own resolution."""
    # (h, w): keep-ratio resize as mmseg's Resize(scale, keep_ratio=True), long edge <= max, short
    # edge <= min; () = into the data's eval size.
    resize: tuple[int, ...] = ()
    mode: Literal["whole", "slide"] = "whole"  # mmseg's test_cfg mode
    crop: tuple[int, ...] = ()  # slide: crop (h, w); the image is padded to at least this
    stride: tuple[int, ...] = ()  # slide: (h, w), each in [1, crop]
    scales: tuple[float, ...] = (1.0,)  # test-time scales, factors of `resize` (mmseg's img_ratios)
    flip: bool = False  # test-time horizontal flip
    batch_size: int = 4  # slide: crops per forward, one compiled shape (rounded up to the data devices)


@dataclass(frozen=True)
class Config:
    experiment: str
    task: str  # module in segjax.tasks that supplies model, loss, metrics and data
    data: Any
    model: Any
    loss: Any
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # The experiment's demo variant on generated demo data (no data paths were given): saved with
    # the run, so that a demo run cannot pass for one on real data.
    demo: bool = False


def _experiments_package() -> types.ModuleType:
    """`segjax.experiments`: installed there (pyproject's package-dir), or in a source tree the
    experiments/ folder beside segjax/, imported under that name. Either way an unrelated
    `experiments` package on sys.path cannot shadow the built-in experiments."""
    try:
        return importlib.import_module("segjax.experiments")
    except ModuleNotFoundError as e:
        if e.name != "segjax.experiments":
            raise
    folder = Path(__file__).resolve().parent.parent / "experiments"
    spec = importlib.util.spec_from_file_location("segjax.experiments", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["segjax.experiments"] = module
    spec.loader.exec_module(module)
    sys.modules["segjax"].experiments = module
    return module


def builtin_experiments() -> list[str]:
    folder = Path(_experiments_package().__file__).parent
    return sorted(p.stem for p in folder.glob("*.py") if not p.stem.startswith("_"))


def experiment_variants(name: str) -> dict[str, tuple]:
    """{parameter: choices} of an experiment's `get_config` (e.g. mode, model; `demo` is (False, True))."""
    hints = typing.get_type_hints(experiment_module(name).get_config)
    return {param: (False, True) if hint is bool else typing.get_args(hint)
            for param, hint in hints.items() if param != "return"}


def experiment_module(name: str):
    """The module of a built-in experiment, or of a user's experiment file."""
    _experiments_package()  # a user's file may import a built-in experiment
    if name.endswith(".py"):
        path = Path(name).resolve()
        if not path.is_file():
            raise ConfigError(f"experiment file {name} does not exist")
        module_name = f"segjax_user_experiment_{path.stem}"
        module = sys.modules.get(module_name)
        # Imported once per file, as a module is: a config rebuilt by from_dict has the same classes.
        if module is None or module.__file__ != str(path):
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            # Registered before running: dataclasses and get_type_hints look the module up by name.
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[module_name]
                raise
    else:
        choices = builtin_experiments()
        if name not in choices:
            raise ConfigError(f"unknown experiment {name!r}; choose one of {choices} or pass a .py file")
        module = importlib.import_module(f"segjax.experiments.{name}")
    if not hasattr(module, "get_config"):
        raise ConfigError(f"experiment {name!r} has no get_config()")
    return module


def load_experiment(name: str, **variant) -> Config:
    """`name` is a built-in experiment or a path to a Python file with `get_config()`; `variant`
    its keyword arguments (see `experiment_variants`); those it does not take are left out.

    A file's config records the file's absolute path as its experiment, so a saved run can be
    rebuilt from its checkpoint alone; the demo variant's (`demo=True`) records `demo`.
    """
    known = experiment_variants(name)
    cfg = experiment_module(name).get_config(**{k: v for k, v in variant.items() if k in known})
    if name.endswith(".py"):
        cfg = dataclasses.replace(cfg, experiment=str(Path(name).resolve()))
    return dataclasses.replace(cfg, demo=True) if variant.get("demo") else cfg


def _split_commas(text: str) -> list[str]:
    """`text` split at its commas, except those inside a regex quantifier `{m,n}` (escaped braces
    `\\{` do not count)."""
    parts, start, depth, i = [], 0, 0, 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 1  # the escaped character is skipped
        elif char == "{":
            depth += 1
        elif char == "}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
        i += 1
    return parts + [text[start:]]


def _parse_value(text: str, annotation: Any, key: str) -> Any:
    origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if text not in choices:
            raise ConfigError(f"{key}={text!r} is not valid; choose one of {list(choices)}")
        return text
    if origin in (types.UnionType, typing.Union):  # Optional[...]
        if text.lower() in ("none", "null", ""):
            return None
        inner = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _parse_value(text, inner[0], key)
    if origin is tuple:
        (item_type, *_) = typing.get_args(annotation)
        text = text.strip()
        if text.startswith("["):  # JSON list: items may hold commas, e.g. '["wall, building", "sky"]'
            try:
                items = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{key}={text!r} is not a JSON list ({e})") from None
            return _typed(items, annotation, key)
        if text.startswith("(") and text.endswith(")"):  # only the outer pair: a regex keeps its groups
            text = text[1:-1]
        parts = [p for p in _split_commas(text) if p.strip()]
        return tuple(_parse_value(p.strip(), item_type, key) for p in parts)
    try:
        if annotation is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return lowered in ("true", "1", "yes")
        if annotation is int:
            return int(text)
        if annotation is float:
            value = float(text)
            if not math.isfinite(value):
                raise ValueError
            return value
    except ValueError:
        raise ConfigError(f"{key}={text!r} is not a valid {annotation.__name__}") from None
    if annotation is str:
        return text
    raise ConfigError(f"{key} has type {annotation}, which cannot be set from the command line")


def _field_types(obj: Any) -> dict[str, Any]:
    return typing.get_type_hints(type(obj))


def override(cfg: Any, key: str, text: str) -> Any:
    """Returns `cfg` with the dotted field `key` set from its text form, checked against its type."""
    return _override(cfg, key.split("."), 0, text)


def _override(cfg: Any, parts: list[str], depth: int, text: str) -> Any:
    """Sets `parts[depth:]` inside `cfg`, the section at `parts[:depth]`; errors name the whole key."""
    key, head = ".".join(parts), parts[depth]
    if not dataclasses.is_dataclass(cfg):
        raise ConfigError(f"cannot set {key!r}: {'.'.join(parts[:depth])!r} is a value, not a config section")
    names = [f.name for f in dataclasses.fields(cfg)]
    if head not in names:
        raise ConfigError(f"unknown config key {head!r} in {key!r}; valid keys here: {names}")
    current = getattr(cfg, head)
    if depth + 1 < len(parts):
        return dataclasses.replace(cfg, **{head: _override(current, parts, depth + 1, text)})
    if dataclasses.is_dataclass(current):
        fields = [f.name for f in dataclasses.fields(current)]
        raise ConfigError(f"{key!r} is a section; set one of its fields: {fields}")
    value = _parse_value(text, _field_types(cfg)[head], key)
    return dataclasses.replace(cfg, **{head: value})


def parse_set(items: list[str] | tuple[str, ...]) -> list[tuple[str, str]]:
    """`KEY=VALUE` texts (of --set) as (key, value) pairs."""
    pairs = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set expects KEY=VALUE, got {item!r}")
        pairs.append((key.strip(), value.strip()))
    return pairs


def apply(cfg: Any, overrides: list[tuple[str, str]]) -> Any:
    """`cfg` with each (dotted key, text) override applied in order."""
    for key, value in overrides:
        cfg = override(cfg, key, value)
    return cfg


def get_path(cfg: Any, key: str) -> Any:
    for part in key.split("."):
        cfg = getattr(cfg, part)
    return cfg


def has_path(cfg: Any, key: str) -> bool:
    try:
        get_path(cfg, key)
        return True
    except AttributeError:
        return False


def field_type(cfg: Any, key: str) -> Any:
    *parents, last = key.split(".")
    for part in parents:
        cfg = getattr(cfg, part)
    return _field_types(cfg)[last]


def validate(cfg: Config) -> Config:
    """Checks values that a type alone does not; names the offending key."""
    positive = ["train.epochs", "train.batch_size", "train.validate_every", "train.save_every", "train.log_every",
                "optim.gradient_accumulation", "optim.step_epochs"]
    for key in positive:
        if get_path(cfg, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {get_path(cfg, key)}")
    nonnegative = ["optim.lr", "optim.weight_decay", "optim.momentum", "optim.min_lr", "optim.gradient_clip",
                   "train.num_workers", "train.eval_batch_size", "train.resume_epochs", "train.num_visualizations",
                   "train.max_nonfinite_steps", "optim.warmup_steps"]
    for key in nonnegative:
        if get_path(cfg, key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {get_path(cfg, key)}")
    if cfg.optim.lr == 0:
        raise ConfigError("optim.lr must be > 0")
    if cfg.optim.gamma <= 0:
        raise ConfigError(f"optim.gamma must be > 0, got {cfg.optim.gamma}")
    if cfg.optim.power <= 0:
        raise ConfigError(f"optim.power must be > 0, got {cfg.optim.power}")
    if not 0 < cfg.optim.warmup_ratio <= 1:
        raise ConfigError(f"optim.warmup_ratio must be within (0, 1], got {cfg.optim.warmup_ratio}")
    if not 0 <= cfg.optim.ema_decay < 1:
        raise ConfigError(f"optim.ema_decay must be within [0, 1) (0 = off), got {cfg.optim.ema_decay}")
    from segjax.engine.optim import parse_groups  # the group syntax has one home

    try:
        parse_groups(cfg.optim.param_groups)
    except ValueError as e:
        raise ConfigError(f"optim.param_groups: {e}") from None
    if cfg.optim.min_lr > cfg.optim.lr:
        raise ConfigError(f"optim.min_lr ({cfg.optim.min_lr}) must not exceed optim.lr ({cfg.optim.lr})")
    if not 0 <= cfg.train.max_bad_record_ratio <= 1:
        raise ConfigError("train.max_bad_record_ratio must be within [0, 1]")
    for axis in ("data", "fsdp", "model"):
        if getattr(cfg.mesh, axis) == 0 or getattr(cfg.mesh, axis) < -1:
            raise ConfigError(f"mesh.{axis} must be >= 1 or -1 (the devices left over), got {getattr(cfg.mesh, axis)}")
    if [cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.model].count(-1) > 1:
        raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.model may be -1")
    from segjax.engine.sharding import parse_rules  # the rule syntax has one home

    try:
        parse_rules(cfg.mesh.sharding)
    except ValueError as e:
        raise ConfigError(f"mesh.sharding: {e}") from None
    for pattern in cfg.train.remat:
        try:
            re.compile(pattern)
        except re.error as e:
            raise ConfigError(f"train.remat: {pattern!r} is not a regex ({e})") from None
    from segjax.engine.inference import check_eval  # the protocol's rules live with it

    check_eval(cfg.eval)
    if cfg.train.test_only and not (cfg.train.resume or cfg.train.init_from):
        raise ConfigError("test_only needs a checkpoint: pass --resume PATH or --init_from PATH")
    return cfg


def to_dict(cfg: Config) -> dict:
    """The config as typed JSON values (tuples become lists); `from_dict` rebuilds it exactly."""
    return dataclasses.asdict(cfg)


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _typed(value: Any, annotation: Any, key: str) -> Any:
    """A saved (JSON) value as the field's type, checked: no text is re-parsed, so a class name
    with a comma or a regex with braces stays one item."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if annotation is Any:
        return value
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}={value!r} is not valid; choose one of {list(args)}")
        return value
    if origin in (types.UnionType, typing.Union):  # Optional[...]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for i, option in enumerate(inner):
            try:
                return _typed(value, option, key)
            except ConfigError:
                if i == len(inner) - 1:
                    raise
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} is not a list")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_typed(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key}={value!r} needs {len(args)} items")
        return tuple(_typed(v, a, key) for v, a in zip(value, args))
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str)}.get(annotation)
    if ok is None:
        raise ConfigError(f"{key} has type {annotation}, which a saved config cannot hold")
    if not ok(value):
        raise ConfigError(f"{key}={value!r} is not a valid {annotation.__name__}")
    return float(value) if annotation is float else value


def _rebuild(section: Any, saved: dict, prefix: str, unknown: list[str]) -> Any:
    """`section` (a dataclass holding the defaults) with the saved values of its fields; keys it
    has no field for go to `unknown`, fields the saved dict lacks keep their defaults."""
    hints, fields = _field_types(section), {f.name for f in dataclasses.fields(section)}
    values = {}
    for name, value in saved.items():
        key = f"{prefix}{name}"
        if name not in fields:
            unknown.append(key)
            continue
        current = getattr(section, name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ConfigError(f"{key} is a section; the saved config holds {value!r}")
            values[name] = _rebuild(current, value, f"{key}.", unknown)
        else:
            values[name] = _typed(value, hints[name], key)
    return dataclasses.replace(section, **values)


def from_dict(saved: dict) -> Config:
    """Rebuilds a saved config from its typed values (the experiment's classes give the types).

    A key this version has no field for is logged as a warning by name and ignored: a run saved
    by a newer segjax still evaluates, predicts and exports here, and the warning says what was
    dropped. A key the saved config lacks (saved before it existed) keeps its default.
    """
    unknown: list[str] = []
    cfg = _rebuild(load_experiment(saved["experiment"]), saved, "", unknown)
    if unknown:
        logging.getLogger("segjax").warning("the saved config has keys this segjax version does not know, "
                                            "ignored: %s", ", ".join(unknown))
    return cfg


def to_json(cfg: Config) -> str:
    return json.dumps(to_dict(cfg), indent=2)


def save(cfg: Config, path: Path) -> None:
    path.write_text(to_json(cfg) + "\n")
