"""Experiment lookup, `a.b=value` overrides, CLI aliases and demo overrides, validation and the
saved-config round trip. Nothing here trains: the command line stops at the resolved config."""
import dataclasses
import itertools
import json
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import setuptools
from helpers import ROOT

from segjax import config as config_lib
from segjax import tasks
from segjax.config import ConfigError, from_dict, load_experiment, override, to_dict, validate
from segjax.train import main, resolve_config

roi_human = config_lib.experiment_module("roi_human")

USER_EXPERIMENT = """
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

from segjax.experiments.roi_human import get_config as roi_human_config
from segjax.config import flag


@dataclass(frozen=True)
class MyLoss:
    mode: Literal["focal", "plain"] = "plain"
    ce_weight: float = flag(1.0)
    dice_weight: float = 0.25


def get_config(demo: bool = False):
    cfg = roi_human_config(demo=demo)
    return dataclasses.replace(cfg, loss=MyLoss(), train=dataclasses.replace(cfg.train, epochs=7))
"""

DATA_FLAGS = ["--train_ann", "a.json", "--val_ann", "b.json", "--train_img_dir", "imgs/a", "--val_img_dir", "imgs/b"]


@pytest.fixture
def base():
    return load_experiment("roi_human")


@pytest.fixture
def user_file(tmp_path):
    path = tmp_path / "mine.py"
    path.write_text(USER_EXPERIMENT)
    return path


# --- experiment lookup -------------------------------------------------------------------------
def test_builtin_experiment_loads_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for name in [m for m in sys.modules if m.startswith("segjax.experiments")]:
        monkeypatch.delitem(sys.modules, name)
    assert "roi_human" in config_lib.builtin_experiments()
    cfg = load_experiment("roi_human")
    assert (cfg.experiment, cfg.task, cfg.train.epochs) == ("roi_human", "roi_instance", 30)


SHADOW = "import json, sys; from segjax import config; print(json.dumps([config.builtin_experiments(), " \
         "config.experiment_module('roi_human').__file__]))"


def test_experiments_cannot_be_shadowed_installed_or_from_source(tmp_path):
    """An unrelated `experiments` package first on sys.path changes nothing, after
    `pip install .` (into a folder) as from the source tree."""
    shadow = tmp_path / "elsewhere"
    (shadow / "experiments").mkdir(parents=True)
    (shadow / "experiments" / "__init__.py").write_text("raise ImportError('the wrong experiments package')\n")
    source, installed = tmp_path / "source", tmp_path / "installed"  # a copy: the build writes beside it
    for name in ("segjax", "experiments"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target",
                    str(installed), str(source)], check=True, capture_output=True, timeout=300)
    for root in (installed, ROOT):
        out = subprocess.run([sys.executable, "-c", SHADOW], cwd=shadow, env={"PYTHONPATH": f"{shadow}:{root}"},
                             check=True, capture_output=True, text=True).stdout
        names, path = json.loads(out)
        assert names == config_lib.builtin_experiments() and Path(path).is_relative_to(root)
    assert (installed / "segjax" / "experiments" / "roi_human.py").is_file()


def test_pyproject_lists_every_package():
    listed = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    assert sorted(listed) == sorted(setuptools.find_packages(str(ROOT), include=["segjax*"]) + ["segjax.experiments"])


def test_unknown_experiment_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown experiment 'nope'; choose one of \[.*'roi_human'.*\]"):
        load_experiment("nope")
    with pytest.raises(ConfigError, match="does not exist"):
        load_experiment("no/such/file.py")


def test_user_experiment_file(user_file, monkeypatch):
    monkeypatch.chdir(user_file.parent)
    cfg = load_experiment("mine.py")
    assert cfg.experiment == str(user_file)
    assert (cfg.train.epochs, cfg.loss.mode, cfg.optim.lr) == (7, "plain", 1e-4)
    # The file's own dataclass (string annotations, a Literal) is overridable like a built-in one.
    assert override(cfg, "loss.mode", "focal").loss.mode == "focal"
    with pytest.raises(ConfigError, match=r"loss.mode='other'.*\['focal', 'plain'\]"):
        override(cfg, "loss.mode", "other")
    # The recorded absolute path rebuilds the config from any working directory.
    monkeypatch.chdir("/")
    assert from_dict(json.loads(config_lib.to_json(cfg))) == cfg


def test_user_experiment_from_the_command_line(user_file):
    cfg, _ = resolve_config(["--experiment", str(user_file), "--ce_weight", "3", "--set", "loss.mode=focal"])
    assert cfg.experiment == str(user_file)
    assert (cfg.loss.ce_weight, cfg.loss.dice_weight, cfg.loss.mode, cfg.train.epochs) == (3.0, 0.25, "focal", 7)
    assert cfg.data.image_size == 128  # roi_human's demo variant, which the file passes on
    with pytest.raises(SystemExit):  # a field declared without flag() is no flag
        resolve_config(["--experiment", str(user_file), "--dice_weight", "3"])


# --- overrides -----------------------------------------------------------------------------------
@pytest.mark.parametrize("key, text, expected", [
    ("train.epochs", "5", 5),
    ("train.batch_size", " 12 ", 12),
    ("optim.lr", "3e-4", 3e-4),
    ("optim.gradient_clip", "2", 2.0),
    ("train.eval_at_start", "true", True),
    ("train.eval_at_start", "YES", True),
    ("train.eval_at_start", "1", True),
    ("data.flip", "false", False),
    ("data.flip", "no", False),
    ("data.flip", "0", False),
    ("data.train_ann", "/data/train.json", "/data/train.json"),
    ("model.backbone_widths", "8, 16,32", (8, 16, 32)),
    ("model.backbone_blocks", "(2,3)", (2, 3)),
    ("model.backbone_blocks", "4", (4,)),
    ("optim.optimizer", "sgd", "sgd"),
    ("train.precision", "bf16", "bf16"),
])
def test_override_parses_by_type(base, key, text, expected):
    cfg = override(base, key, text)
    value = config_lib.get_path(cfg, key)
    assert value == expected
    assert type(value) is type(expected)
    before, after = config_lib.flatten(to_dict(base)), config_lib.flatten(to_dict(cfg))
    assert {k for k in before if before[k] != after[k]} <= {key}


@pytest.mark.parametrize("key, text, message", [
    ("train.epochs", "abc", r"train.epochs='abc' is not a valid int"),
    ("train.epochs", "1.5", r"train.epochs='1.5' is not a valid int"),
    ("optim.lr", "fast", r"optim.lr='fast' is not a valid float"),
    ("optim.lr", "nan", r"optim.lr='nan' is not a valid float"),
    ("optim.gradient_clip", "inf", r"optim.gradient_clip='inf' is not a valid float"),
    ("data.flip", "maybe", r"data.flip='maybe' is not a valid bool"),
    ("model.backbone_widths", "8,x", r"model.backbone_widths='x' is not a valid int"),
    ("optim.optimizer", "lion", r"optim.optimizer='lion' is not valid; choose one of \['adamw', 'adam', 'sgd'\]"),
    ("optim.scheduler", "linear", r"choose one of \['cosine', 'step', 'exponential', 'poly', 'none'\]"),
    ("nope.x", "1", r"unknown config key 'nope' in 'nope.x'; valid keys here: "
                    r"\['experiment', 'task', 'data', 'model', 'loss', 'optim', 'train', 'mesh', 'eval', 'demo'\]"),
    ("train.epochz", "3", r"unknown config key 'epochz' in 'train.epochz'; valid keys here: \[.*'epochs'.*\]"),
    ("data.image_sise", "3", r"'data.image_sise'; valid keys here: \[.*'image_size'.*\]"),
    ("train", "3", r"'train' is a section; set one of its fields: \['epochs', 'batch_size'"),
    ("model", "x", r"'model' is a section; set one of its fields: \['size', 'feature_channels'"),
    ("train.epochs.x", "1", r"cannot set 'train.epochs.x': 'train.epochs' is a value"),
])
def test_override_rejects_bad_keys_and_values(base, key, text, message):
    with pytest.raises(ConfigError, match=message):
        override(base, key, text)


# --- command line --------------------------------------------------------------------------------
def test_aliases_and_set_land_on_their_fields():
    cfg, _ = resolve_config([
        "--experiment", "roi_human", "--epochs", "3", "--lr", "0.01", "--optimizer", "sgd", "--scheduler", "step",
        "--gradient_clip", "1.0", "--batch_size", "4", "--precision", "bf16", "--ce_weight", "2",
        "--dice_weight", "0.5", "--seed", "5", "--num_workers", "2", "--weight_decay", "0.001", "--min_lr", "0.001",
        "--gradient_accumulation", "2", "--validate_every", "3", "--save_every", "4", "--checkpoint_dir", "out",
        "--init_from", "ckpt", "--test_only", "--resume_epochs", "6", "--data_stats", "stats.json",
        "--set", "model.head_width=48", "--set", "optim.gamma=0.5", *DATA_FLAGS,
    ])
    assert (cfg.train.epochs, cfg.train.batch_size, cfg.train.seed, cfg.train.precision) == (3, 4, 5, "bf16")
    assert (cfg.train.num_workers, cfg.train.validate_every, cfg.train.save_every) == (2, 3, 4)
    assert (cfg.train.run_root, cfg.train.init_from, cfg.train.test_only, cfg.train.resume_epochs) == (
        "out", "ckpt", True, 6)
    optim = cfg.optim
    assert (optim.lr, optim.optimizer, optim.scheduler, optim.gradient_clip) == (0.01, "sgd", "step", 1.0)
    assert (cfg.optim.weight_decay, cfg.optim.min_lr, cfg.optim.gradient_accumulation, cfg.optim.gamma) == (
        0.001, 0.001, 2, 0.5)
    assert (cfg.loss.ce_weight, cfg.loss.dice_weight) == (2.0, 0.5)
    assert cfg.model.head_width == 48
    data = cfg.data
    assert (data.train_ann, data.val_ann, data.train_img_dir, data.val_img_dir, data.data_stats) == (
        "a.json", "b.json", "imgs/a", "imgs/b", "stats.json")


def test_demo_overrides_apply_without_data_and_flags_win():
    cfg, _ = resolve_config(["--experiment", "roi_human"])
    assert cfg == load_experiment("roi_human", demo=True) == dataclasses.replace(roi_human.get_config(demo=True),
                                                                                demo=True)
    assert cfg.demo and not resolve_config(["--experiment", "roi_human", *DATA_FLAGS])[0].demo
    assert cfg.data.image_size == 128 and cfg.train.epochs != load_experiment("roi_human").train.epochs

    cfg, _ = resolve_config(["--experiment", "roi_human", "--epochs", "2", "--set", "data.image_size=96",
                             "--lr", "0.02"])
    assert (cfg.data.image_size, cfg.train.epochs, cfg.optim.lr) == (96, 2, 0.02)
    assert cfg.model.size == "tiny"  # the rest of the demo variant still applies


def test_demo_overrides_do_not_apply_with_data_paths():
    cfg, _ = resolve_config(["--experiment", "roi_human", *DATA_FLAGS])
    assert (cfg.data.image_size, cfg.train.epochs, cfg.model.size, cfg.optim.lr) == (640, 30, "full", 1e-4)
    # One path is enough to count as real data; the task then names the missing ones.
    with pytest.raises(ConfigError, match="missing --val_ann --train_img_dir --val_img_dir"):
        resolve_config(["--experiment", "roi_human", "--set", "data.train_ann=a.json"])


def test_print_config(capsys):
    assert main(["--experiment", "roi_human", "--print_config", "--epochs", "3", "--set", "model.head_width=40"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["train"]["epochs"], printed["model"]["head_width"], printed["data"]["image_size"]) == (3, 40, 128)
    # The resolved config: the demo's paths and the class weights computed from its training ROIs.
    assert printed["data"]["train_ann"] and len(printed["data"]["class_weights"]) == 3
    assert from_dict(printed) == tasks.resolve(resolve_config(["--experiment", "roi_human", "--epochs", "3",
                                                               "--set", "model.head_width=40"])[0])


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "train.epochs must be >= 1, got 0"),
    (["--epochs", "abc"], "train.epochs='abc' is not a valid int"),
    (["--batch_size", "-2"], "train.batch_size must be >= 1, got -2"),
    (["--lr", "-1"], "optim.lr must be >= 0, got -1.0"),
    (["--lr", "0"], "optim.lr must be > 0"),
    (["--lr", "nan"], "optim.lr='nan' is not a valid float"),
    (["--set", "nope.x=1"], "unknown config key 'nope' in 'nope.x'"),
    (["--set", "train.epochs"], "--set expects KEY=VALUE, got 'train.epochs'"),
    (["--set", "train=3"], "'train' is a section"),
    (["--set", "optim.optimizer=lion"], "choose one of ['adamw', 'adam', 'sgd']"),
    (["--test_only"], "test_only needs a checkpoint"),
    (["--min_lr", "1"], "optim.min_lr (1.0) must not exceed optim.lr (0.003)"),
    (["--train_ann", "X.json"], "real data needs all of --train_ann --val_ann --train_img_dir --val_img_dir"),
])
def test_bad_command_lines_exit_2_with_a_message(capsys, argv, message):
    assert main(["--experiment", "roi_human", "--print_config", *argv]) == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert captured.out == ""


def test_unknown_experiment_on_the_command_line(capsys):
    assert main(["--experiment", "nope", "--print_config"]) == 2
    assert "unknown experiment 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("flag, value, choices", [
    ("--optimizer", "foo", "'adamw', 'adam', 'sgd'"),
    ("--scheduler", "linear", "'cosine', 'step', 'exponential', 'poly', 'none'"),
    ("--precision", "fp16", "'fp32', 'bf16'"),
])
def test_bad_choices_are_argparse_errors(capsys, flag, value, choices):
    with pytest.raises(SystemExit) as exit_info:
        main(["--experiment", "roi_human", "--print_config", flag, value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{flag}: invalid choice: '{value}'" in err
    assert choices in err


# --- validation and round trip -------------------------------------------------------------------
@pytest.mark.parametrize("key, text, message", [
    ("train.epochs", "0", "train.epochs must be >= 1"),
    ("train.batch_size", "0", "train.batch_size must be >= 1"),
    ("train.validate_every", "0", "train.validate_every must be >= 1"),
    ("train.save_every", "0", "train.save_every must be >= 1"),
    ("train.log_every", "0", "train.log_every must be >= 1"),
    ("optim.gradient_accumulation", "0", "optim.gradient_accumulation must be >= 1"),
    ("optim.step_epochs", "0", "optim.step_epochs must be >= 1"),
    ("optim.lr", "0", "optim.lr must be > 0"),
    ("optim.weight_decay", "-0.1", "optim.weight_decay must be >= 0"),
    ("optim.momentum", "-0.5", "optim.momentum must be >= 0"),
    ("optim.gradient_clip", "-1", "optim.gradient_clip must be >= 0"),
    ("optim.gamma", "0", "optim.gamma must be > 0"),
    ("optim.min_lr", "0.5", r"optim.min_lr \(0.5\) must not exceed optim.lr \(0.0001\)"),
    ("train.num_workers", "-1", "train.num_workers must be >= 0"),
    ("train.eval_batch_size", "-1", "train.eval_batch_size must be >= 0"),
    ("train.resume_epochs", "-1", "train.resume_epochs must be >= 0"),
    ("train.num_visualizations", "-1", "train.num_visualizations must be >= 0"),
    ("train.max_nonfinite_steps", "-1", "train.max_nonfinite_steps must be >= 0"),
    ("train.max_bad_record_ratio", "1.5", r"train.max_bad_record_ratio must be within \[0, 1\]"),
    ("train.max_bad_record_ratio", "-0.1", r"train.max_bad_record_ratio must be within \[0, 1\]"),
    ("train.test_only", "true", "test_only needs a checkpoint"),
])
def test_validate_rejects(base, key, text, message):
    with pytest.raises(ConfigError, match=message):
        validate(override(base, key, text))


def test_validate_accepts(base):
    assert validate(base) is base
    assert validate(override(override(base, "train.test_only", "true"), "train.init_from", "ckpt")).train.test_only
    assert validate(override(override(base, "train.test_only", "true"), "train.resume", "runs/x")).train.test_only
    assert validate(override(base, "optim.min_lr", "1e-4")).optim.min_lr == 1e-4  # equal to lr is fine


def test_round_trip(base):
    cfg = base
    for key, text in [("model.backbone_widths", "8,24,40"), ("model.backbone_blocks", "3"), ("data.flip", "false"),
                      ("train.eval_at_start", "true"), ("optim.lr", "0.000123456789"), ("optim.optimizer", "sgd"),
                      ("data.train_ann", "/data/with, comma.json"), ("train.precision", "bf16"),
                      ("loss.ce_weight", "2.5")]:
        cfg = override(cfg, key, text)
    assert cfg.model.backbone_blocks == (3,)
    assert from_dict(to_dict(cfg)) == cfg
    assert from_dict(json.loads(config_lib.to_json(cfg))) == cfg  # tuples saved as JSON lists
    assert from_dict(to_dict(base)) == base


def test_save_writes_the_json(base, tmp_path):
    config_lib.save(base, tmp_path / "config.json")
    assert from_dict(json.loads((tmp_path / "config.json").read_text())) == base


def _all_variants():
    for name in config_lib.builtin_experiments():
        variants = config_lib.experiment_variants(name)
        for combo in itertools.product(*variants.values()):
            yield name, dict(zip(variants, combo))


@pytest.mark.parametrize("name, variant", list(_all_variants()), ids=lambda v: str(v))
def test_every_experiment_variant_round_trips(name, variant):
    cfg = load_experiment(name, **variant)
    assert from_dict(json.loads(config_lib.to_json(cfg))) == cfg


def test_round_trip_keeps_commas_and_braces_in_items():
    cfg = load_experiment("coco_semantic")
    names = ("background", "wall, building, edifice", "sky")
    cfg = override(cfg, "data.class_names", json.dumps(names))  # JSON list: items may hold commas
    cfg = override(cfg, "mesh.sharding", r"stages/\d{1,2}/.*=fsdp,.*=replicate")  # the comma form still splits
    cfg = override(cfg, "train.remat", r'["blocks/\\d{1,2}", "(a|b){2,}"]')
    assert cfg.data.class_names == names
    assert cfg.mesh.sharding == (r"stages/\d{1,2}/.*=fsdp", ".*=replicate")
    assert cfg.train.remat == (r"blocks/\d{1,2}", "(a|b){2,}")
    validate(cfg)
    assert from_dict(json.loads(config_lib.to_json(cfg))) == cfg


def test_from_dict_checks_types_and_names_unknown_keys(base, caplog):
    saved = json.loads(config_lib.to_json(base))
    saved["train"]["epochz"], saved["newer_section"] = 3, {"x": 1}
    del saved["optim"]["gamma"]  # saved before the field existed: its default
    with caplog.at_level("WARNING", logger="segjax"):
        assert from_dict(saved) == base
    assert "train.epochz, newer_section" in caplog.text
    for key, value, message in [("epochs", "3", r"train.epochs='3' is not a valid int"),
                                ("epochs", True, "is not a valid int"),
                                ("precision", "fp16", r"choose one of \['fp32', 'bf16'\]"),
                                ("remat", "a,b", r"train.remat='a,b' is not a list")]:
        bad = json.loads(config_lib.to_json(base))
        bad["train"][key] = value
        with pytest.raises(ConfigError, match=message):
            from_dict(bad)


@pytest.mark.parametrize("text, message", [
    ('["a", 1]', r"data.class_names=1 is not a valid str"),
    ('["a",', r"is not a JSON list"),
])
def test_set_json_list_is_checked(text, message):
    with pytest.raises(ConfigError, match=message):
        override(load_experiment("coco_semantic"), "data.class_names", text)
