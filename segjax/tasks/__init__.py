"""Task families. A task joins model, loss, metrics and data for one kind of prediction.

The trainer never branches on an experiment: it asks the task (`segjax.tasks.<cfg.task>.Task`)
for everything that differs. A task provides:

- `cfg`: the config with data paths resolved (demo data substituted when none were given);
- `class_names`, `best_metric`, `best_mode`;
- `build_model(rngs)`: the NNX model for the config's precision;
- `train_data()` -> (source, transform(entry, rng)) and `val_data()` -> (source, transform(entry));
- `loss_and_sums(model, batch)` -> (loss, (sums, outputs)): runs inside jit; `sums` are additive
  statistics, `outputs` what `visualize` draws;
- `summarize(sums)` -> metrics dict; `visualize(batch, outputs, out_dir, tag, limit)`;
- `torch_weights()` -> (segjax.bridge scheme, submodule it fills) or None, for `--init_from torch:`;
- `export_signature(variant)` -> ([(input name, shape)], [output names]), string dims dynamic, and
  `export_forward(model, *inputs)`: the model with PyTorch-style NCHW inputs and outputs (a task
  with export variants also takes `variant=`);
- module functions `has_data(data_cfg)` (were real data paths given?) and `validate(cfg)`
  (raises ConfigError for values the types alone do not catch).
"""
from __future__ import annotations

import importlib
from pathlib import Path

from segjax.config import ConfigError


def task_module(name: str):
    choices = sorted(p.stem for p in Path(__file__).parent.glob("*.py") if not p.stem.startswith("_"))
    if name not in choices:
        raise ConfigError(f"unknown task {name!r}; choose one of {choices}")
    return importlib.import_module(f"segjax.tasks.{name}")


def build(cfg):
    return task_module(cfg.task).Task(cfg)
