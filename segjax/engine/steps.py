"""Jitted training and evaluation steps over split NNX state.

A task supplies `loss_and_sums(model, batch, key) -> (loss, (sums, outputs))` where `sums` is a
dict of additive statistics (counts, summed losses, confusion matrices). The same function serves
training (with gradients) and evaluation, so train and val metrics mean the same thing. `key` is
the step's JAX key for a loss that samples (Mask2Former's points): in training it is the run's
seed folded with the optimizer's step count, which checkpoints restore, so `--resume` draws the
same points; evaluation uses one fixed key, so every validation measures the same way.
"""
from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LossFn = Callable[[nnx.Module, dict, jax.Array], tuple[jnp.ndarray, tuple[dict, dict]]]


def _keep_old_unless(ok: jnp.ndarray, new, old_leaves: list):
    leaves, treedef = jax.tree.flatten(new)
    return jax.tree.unflatten(treedef, [jnp.where(ok, a, b) for a, b in zip(leaves, old_leaves)])


def make_train_step(model_def, opt_def, loss_fn: LossFn, state_shardings, seed: int = 0, wrt=nnx.Param):
    """(model_state, opt_state, batch) -> (model_state, opt_state, sums), buffers donated.

    Gradients are taken for the parameters `wrt` selects (an nnx filter, the optimizer's): frozen
    parts get none and cost no backward pass.

    A step whose loss is NaN/inf leaves every state unchanged (BatchNorm statistics included)
    and is counted in `sums["nonfinite_steps"]`, so one bad batch cannot poison the run.
    """

    def step(model_state, opt_state, batch):
        # Leaves taken before merging: the merged modules update their variables in place.
        old_leaves = jax.tree.leaves((model_state, opt_state))
        model = nnx.merge(model_def, model_state)
        optimizer = nnx.merge(opt_def, opt_state)
        key = jax.random.fold_in(jax.random.key(seed), optimizer.step[...])
        (loss, (sums, _)), grads = nnx.value_and_grad(loss_fn, argnums=nnx.DiffState(0, wrt), has_aux=True)(
            model, batch, key)
        optimizer.update(model, grads)
        finite = jnp.isfinite(loss)
        new_model, new_opt = _keep_old_unless(finite, (nnx.state(model), nnx.state(optimizer)), old_leaves)
        sums = jax.tree.map(lambda x: jnp.where(finite, x, jnp.zeros_like(x)), sums)
        sums["nonfinite_steps"] = (~finite).astype(jnp.int32)
        return new_model, new_opt, sums

    return jax.jit(step, donate_argnums=(0, 1), out_shardings=(*state_shardings, None))


# Forward-only programs on XLA:CPU: jaxlib 0.10.2's default YNNPACK fusions (matrix products,
# convolutions, reductions) less the convolutions, which XLA then runs itself. CNN forwards ran
# 10-20 % faster (tools/benchmark.py --against torch); train steps keep the default (mixed there).
CPU_INFERENCE_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type":
                         "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"}


def inference_jit(fn: Callable, **kwargs) -> Callable:
    """`jax.jit` for evaluation and prediction, with CPU_INFERENCE_OPTIONS on the CPU."""
    return jax.jit(fn, compiler_options=CPU_INFERENCE_OPTIONS if jax.default_backend() == "cpu" else None, **kwargs)


def make_eval_step(eval_model_def, loss_fn: LossFn, seed: int = 0):
    def step(model_state, batch):
        return loss_fn(nnx.merge(eval_model_def, model_state), batch, jax.random.key(seed))[1]

    return inference_jit(step)


@jax.jit
def add_sums(total: dict, sums: dict) -> dict:
    return jax.tree.map(jnp.add, total, sums)


class HostSums:
    """Accumulates device sums on the host in 64-bit, so long epochs cannot overflow int32."""

    def __init__(self):
        self.total = None

    def add(self, device_sums: dict) -> None:
        host = jax.tree.map(lambda x: np.asarray(x, np.float64 if np.issubdtype(np.asarray(x).dtype, np.floating)
                                                 else np.int64), jax.device_get(device_sums))
        self.total = host if self.total is None else jax.tree.map(np.add, self.total, host)

    def to_json(self) -> dict:
        return {k: [str(v.dtype), v.tolist()] for k, v in (self.total or {}).items()}

    @classmethod
    def from_json(cls, saved: dict | None) -> HostSums:
        sums = cls()
        if saved:
            sums.total = {k: np.asarray(values, dtype) for k, (dtype, values) in saved.items()}
        return sums
