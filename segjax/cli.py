"""The command line every entry point shares: experiment, its variants, `--set` and the config's
flags, resolved into a validated config; user mistakes end in one line and exit status 2.

An experiment's variants are the keyword arguments of its `get_config` (`--mode`, `demo`); a
config field declared with `segjax.config.flag` is also a flag (`--epochs`, `--train_ann`, …).
"""
from __future__ import annotations

import argparse
import sys
import typing
from collections.abc import Sequence
from pathlib import Path

from segjax import config as config_lib
from segjax import tasks
from segjax.errors import ArgumentParser


def _flag_type(cfg, key: str) -> dict:
    annotation = config_lib.field_type(cfg, key)
    if typing.get_origin(annotation) is typing.Literal:
        return dict(choices=list(typing.get_args(annotation)))
    if annotation is bool:
        return dict(nargs="?", const="true", metavar="BOOL")
    return dict(metavar=getattr(annotation, "__name__", "VALUE").upper())


def parse(parser: argparse.ArgumentParser, argv: Sequence[str] | None, *, flags: bool = True) -> argparse.Namespace:
    """Parses `argv` with `parser` plus the experiment's arguments: `--experiment`, `--set`, a flag
    per variant of `get_config` (`--mode`) and, with `flags`, the config's field flags. `--help`
    lists them once `--experiment` is given."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = ArgumentParser(add_help=False)
    pre.add_argument("--experiment")
    name = pre.parse_known_args(argv)[0].experiment
    parser.add_argument("--experiment", required=True,
                        help=f"built-in name ({', '.join(config_lib.builtin_experiments())}) or a .py file")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any config field, e.g. --set optim.lr=3e-4 (repeatable)")
    if name:
        variants = config_lib.experiment_variants(name)
        if "mode" in variants:
            parser.add_argument("--mode", choices=variants["mode"], help="a variant of the experiment")
        if flags:
            group = parser.add_argument_group("config fields (flags of the original scripts)")
            base = config_lib.load_experiment(name)
            for flag, key in config_lib.flags(base).items():
                group.add_argument(f"--{flag}", dest=f"field:{key}", help=f"= --set {key}=...", **_flag_type(base, key))
    return parser.parse_args(argv)


def overrides(args: argparse.Namespace) -> list[tuple[str, str]]:
    """Field flags, then --set, as (key, text) pairs."""
    fields = [(k.removeprefix("field:"), str(v)) for k, v in vars(args).items()
              if k.startswith("field:") and v is not None]
    return fields + config_lib.parse_set(args.set)


def checked(cfg: config_lib.Config) -> config_lib.Config:
    tasks.task_class(cfg.task).check(cfg)
    return config_lib.validate(cfg)


def check_data_paths(cfg: config_lib.Config) -> None:
    """A data path (the task's `data_keys`) that does not exist is named in one line (before the data
    are opened, whose errors are about their layout)."""
    flag_of = {key: flag for flag, key in config_lib.flags(cfg).items()}
    for key in tasks.task_class(cfg.task).data_keys:
        path = getattr(cfg.data, key)
        if path and not Path(path).exists():
            name = f"--{flag_of[f'data.{key}']}" if f"data.{key}" in flag_of else f"data.{key}"
            raise FileNotFoundError(f"{name} {path} does not exist")


def demo_notice(cfg: config_lib.Config) -> str:
    """What a run on the demo data says first and last: no data were given, so it is no real run."""
    flag_of = {key: flag for flag, key in config_lib.flags(cfg).items()}
    given = " / ".join(f"--{flag_of.get(f'data.{key}', f'set data.{key}=')}"
                       for key in tasks.task_class(cfg.task).data_keys)
    return (f"DEMO RUN: no data given ({given}), so this runs on segjax's generated demo data, not yours "
            "(saved as demo: true in its config.json)")


def experiment_config(args: argparse.Namespace, *, demo: bool = True, **variant) -> config_lib.Config:
    """The config the command line asks for: the experiment's variant (`--mode`; its demo variant
    when `demo` and no data were given), then flags and --set, validated. `variant` adds keyword
    arguments of get_config (e.g. model)."""
    variant = {**({"mode": args.mode} if getattr(args, "mode", None) else {}), **variant}
    pairs = overrides(args)
    cfg = config_lib.apply(config_lib.load_experiment(args.experiment, **variant), pairs)
    if demo and not tasks.task_class(cfg.task).has_data(cfg.data):
        cfg = config_lib.apply(config_lib.load_experiment(args.experiment, demo=True, **variant), pairs)
    return checked(cfg)
