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
    if name.isidentifier() and not name.startswith("_") and name != "base":
        try:  # the module itself: no listing of the folder, so building a task touches no file
            return importlib.import_module(f"segjax.tasks.{name}").Task
        except ModuleNotFoundError as e:
            if e.name != f"segjax.tasks.{name}":
                raise
    choices = sorted(p.stem for p in Path(__file__).parent.glob("*.py")
                     if not p.stem.startswith("_") and p.stem != "base")
    raise ConfigError(f"unknown task {name!r}; choose one of {choices}")


def resolve(cfg):
    """`cfg` completed from disk by its task (`TaskBase.resolve`): every entry point's first step."""
    return task_class(cfg.task).resolve(cfg)


def build(cfg):
    """The task of a resolved config; reads and writes nothing."""
    return task_class(cfg.task)(cfg)
