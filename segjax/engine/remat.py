"""Activation checkpointing (remat) by config: submodules whose path matches a regex recompute
their activations in the backward pass instead of keeping them, trading compute for memory.

Paths are module attribute paths joined by "/" ("backbone/stages/2"), as in `mesh.sharding`.
A matching module's class is swapped for a subclass whose `__call__` is wrapped in `nnx.remat`;
its state, and so checkpoints, are unchanged.
"""
from __future__ import annotations

import functools
import logging
import re

from flax import nnx

log = logging.getLogger("segjax")


@functools.cache
def _rematerialised(cls: type) -> type:
    return type(cls.__name__, (cls,), {"__call__": nnx.remat(cls.__call__), "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def apply(model: nnx.Module, patterns: tuple[str, ...]) -> list[str]:
    """Wraps every submodule whose path matches one of `patterns`; returns the wrapped paths."""
    if not patterns:
        return []
    compiled = [re.compile(p) for p in patterns]
    wrapped = []
    for path, module in nnx.iter_modules(model):
        name = "/".join(str(p) for p in path)
        if path and any(p.search(name) for p in compiled) and not any(name.startswith(w + "/") for w in wrapped):
            module.__class__ = _rematerialised(type(module))
            wrapped.append(name)
    if wrapped:
        log.info("remat: %d modules recompute activations in the backward pass (%s%s)", len(wrapped),
                 ", ".join(wrapped[:4]), ", ..." if len(wrapped) > 4 else "")
    else:
        log.warning("remat: no module path matches %s", list(patterns))
    return wrapped
