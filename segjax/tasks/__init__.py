"""Task families. A task joins model, loss, metrics and data for one kind of prediction.

The trainer never branches on an experiment: it asks the task (`segjax.tasks.<cfg.task>.Task`)
for everything that differs, through the contract written in `segjax.tasks.base` (the `Task`
Protocol; `TaskBase` holds what every task shares).
"""
from __future__ import annotations

import importlib
from pathlib import Path

from segjax.config import ConfigError


def task_class(name: str) -> type:
    choices = sorted(p.stem for p in Path(__file__).parent.glob("*.py")
                     if not p.stem.startswith("_") and p.stem != "base")
    if name not in choices:
        raise ConfigError(f"unknown task {name!r}; choose one of {choices}")
    return importlib.import_module(f"segjax.tasks.{name}").Task


def build(cfg):
    return task_class(cfg.task)(cfg)
