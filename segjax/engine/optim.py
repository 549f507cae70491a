"""The optimizer an OptimConfig names, as torch.optim with mmsegmentation's schedules runs it.

- Learning-rate schedule per optimizer update: an optional linear warm-up (mmengine's LinearLR),
  then cosine, step, exponential or poly decay (PolyLR) counted from the warm-up's end.
- Parameter groups: ordered `REGEX=lr_mult:X;decay_mult:Y` over parameter paths (the paths of
  `mesh.sharding`, e.g. "backbone/stages/0/conv/kernel"; the first `re.search` match wins), as
  torch.optim param groups with lr·lr_mult and weight_decay·decay_mult. Named presets
  (`PRESETS`) expand in place.
- EMA of the weights: the chain's last transformation keeps `ema = decay·ema + (1 − decay)·param`
  after each update in the optimizer state, so it is checkpointed, sharded and restored with it;
  `ema_weights` swaps it into a model state for validation, evaluation, prediction and export.
"""
from __future__ import annotations

import logging
import math
import re
import typing
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from segjax.config import ConfigError
from segjax.engine.sharding import path_name, regex_and_value

log = logging.getLogger("segjax")

# Mask2Former's build_optimizer (train_net.py): BACKBONE_MULTIPLIER 0.1 on every backbone parameter;
# weight decay 0 for normalisation layers (WEIGHT_DECAY_NORM), nn.Embedding (WEIGHT_DECAY_EMBED: the
# decoder's query_feat / query_embed / level_embed, here transformer/queries_features,
# queries_embedder, level_embed) and Swin's relative_position_bias_table. segjax's Swin has no
# absolute_pos_embed (Mask2Former's configs run Swin with APE off); the pixel decoder's level_embed
# is an nn.Parameter there, so it keeps its decay, as in detectron2.
_NORM = r"(norm|bn)[^/]*(/\d+)?/(scale|bias)$"  # LayerNorm / GroupNorm / BatchNorm scale and bias
PRESETS = {
    "mask2former": (
        rf"^backbone/.*({_NORM}|/relative_position_bias_table$)=lr_mult:0.1;decay_mult:0",
        r"^backbone/=lr_mult:0.1",
        rf"{_NORM}=decay_mult:0",
        r"^transformer/(queries_features|queries_embedder|level_embed)/embedding$=decay_mult:0",
    ),
}


class Group(typing.NamedTuple):
    pattern: re.Pattern
    lr_mult: float = 1.0
    decay_mult: float = 1.0
    preset: str = ""  # the preset it came from: its regexes need not match every model


def parse_groups(items: Sequence[str]) -> list[Group]:
    """`REGEX=lr_mult:X;decay_mult:Y` items and preset names -> groups; ValueError names the bad item."""
    groups = []
    for text in items:
        if text in PRESETS:
            groups += [g._replace(preset=text) for g in parse_groups(PRESETS[text])]
            continue
        pattern, options = regex_and_value(text, f"is neither REGEX=lr_mult:X;decay_mult:Y nor a preset "
                                                  f"({', '.join(PRESETS)})")
        values = {}
        for option in options.split(";"):
            name, sep, value = option.strip().partition(":")
            if name not in ("lr_mult", "decay_mult") or not sep:
                raise ValueError(f"{text!r}: unknown option {option.strip()!r}; the options are lr_mult:X and "
                                 "decay_mult:Y, each a number >= 0")
            try:
                values[name] = float(value)
                valid = 0 <= values[name] < math.inf
            except ValueError:
                valid = False
            if not valid:
                raise ValueError(f"{text!r}: {name} must be a number >= 0, got {value!r}")
        groups.append(Group(pattern, **values))
    return groups


def group_of(name: str, groups: list[Group]) -> Group | None:
    return next((g for g in groups if g.pattern.search(name)), None)


def _decayed_weights(weight_decay: float, groups: list[Group]) -> optax.GradientTransformation:
    """updates + weight_decay·decay_mult·param (optax.add_decayed_weights with the group's rate)."""

    def add(path, u, p):
        group = group_of(path_name(path), groups)
        rate = weight_decay * (group.decay_mult if group else 1.0)
        return u + rate * p if rate else u

    return optax.stateless(lambda updates, params: jax.tree_util.tree_map_with_path(add, updates, params))


def _lr_mults(groups: list[Group]) -> optax.GradientTransformation:
    """updates·lr_mult of each parameter's group."""

    def scale(path, u):
        group = group_of(path_name(path), groups)
        return u * group.lr_mult if group and group.lr_mult != 1 else u

    return optax.stateless(lambda updates, params: jax.tree_util.tree_map_with_path(scale, updates))


def schedule(cfg, steps_per_epoch: int, epochs: int) -> Callable:
    """The learning rate of optimizer update t (0-based), for `epochs` of `steps_per_epoch` micro-batches.

    t < W: lr·(r + (1 − r)·t/W) (LinearLR, start factor r = warmup_ratio); then the decay with t − W
    updates done of T − W: cosine and poly to min_lr at T (CosineAnnealingLR, PolyLR), step and
    exponential by `gamma` per `step_epochs` / per epoch of updates (StepLR / ExponentialLR
    stepped per epoch).
    """
    updates_per_epoch = max(steps_per_epoch // cfg.gradient_accumulation, 1)
    total = max(steps_per_epoch * epochs // cfg.gradient_accumulation, 1)
    warmup = cfg.warmup_steps
    if warmup >= total:
        raise ConfigError(f"optim.warmup_steps={warmup} must be < the run's {total} optimizer updates "
                          f"({epochs} epochs of {steps_per_epoch} steps, gradient_accumulation "
                          f"{cfg.gradient_accumulation})")
    if cfg.scheduler == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, total - warmup, alpha=cfg.min_lr / cfg.lr)
    elif cfg.scheduler == "poly":
        decay = optax.polynomial_schedule(cfg.lr, cfg.min_lr, cfg.power, total - warmup)
    elif cfg.scheduler == "step":
        decay = optax.exponential_decay(cfg.lr, cfg.step_epochs * updates_per_epoch, cfg.gamma, staircase=True)
    elif cfg.scheduler == "exponential":
        decay = optax.exponential_decay(cfg.lr, updates_per_epoch, cfg.gamma, staircase=True)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if not warmup:
        return decay
    ramp = optax.linear_schedule(cfg.lr * cfg.warmup_ratio, cfg.lr, warmup)
    return optax.join_schedules([ramp, decay], [warmup])


def transformation(cfg, lr: Callable) -> optax.GradientTransformation:
    """The optax chain of an OptimConfig with the learning-rate schedule `lr`, per group as torch.optim:
    SGD and Adam add wd·decay_mult·param to the gradient; AdamW decays decoupled, by
    lr·lr_mult·wd·decay_mult·param; every step is scaled by lr·lr_mult."""
    groups = parse_groups(cfg.param_groups)
    decay = _decayed_weights(cfg.weight_decay, groups)
    if cfg.optimizer == "sgd":
        parts = [decay, optax.sgd(lr, momentum=cfg.momentum)]
    elif cfg.optimizer == "adam":
        parts = [decay, optax.adam(lr)]
    else:
        parts = [optax.scale_by_adam(), decay, optax.scale_by_learning_rate(lr)]
    if any(g.lr_mult != 1 for g in groups):
        parts.append(_lr_mults(groups))
    # Nested as before groups and EMA existed, so earlier checkpoints' optimizer states still restore.
    tx = optax.chain(*parts)
    if cfg.gradient_clip > 0:
        tx = optax.chain(optax.clip_by_global_norm(cfg.gradient_clip), tx)
    if cfg.ema_decay:
        tx = optax.chain(tx, ema(cfg.ema_decay))
    if cfg.gradient_accumulation > 1:  # the EMA inside: it follows real updates only
        tx = optax.MultiSteps(tx, every_k_schedule=cfg.gradient_accumulation)
    return tx


def make_optimizer(cfg, steps_per_epoch: int, epochs: int) -> tuple[optax.GradientTransformation, Callable]:
    """optax chain from an OptimConfig and its learning-rate schedule (per update)."""
    lr = schedule(cfg, steps_per_epoch, epochs)
    return transformation(cfg, lr), lr


class EmaState(typing.NamedTuple):
    ema: optax.Params  # the field's name marks the average in the optimizer state's paths


def ema(decay: float) -> optax.GradientTransformation:
    """Last in a chain: keeps decay·ema + (1 − decay)·(params + updates), the weights after this
    update; starts from the initial weights (timm's ModelEmaV3 without warm-up). Updates pass
    through unchanged."""

    def init(params):
        return EmaState(jax.tree.map(jnp.array, params))  # a copy: params and EMA are donated apart

    def update(updates, state, params):
        new = jax.tree.map(lambda e, p, u: decay * e + (1 - decay) * (p + u), state.ema, params, updates)
        return updates, EmaState(new)

    return optax.GradientTransformation(init, update)


def _ema_path(path: tuple) -> tuple | None:
    """The parameter path of an optimizer-state path inside the EMA, else None."""
    return path[path.index("ema") + 1:] if "ema" in path else None


def ema_weights(model_state: nnx.State, opt_state: nnx.State) -> nnx.State:
    """`model_state` with each parameter the optimizer averages replaced by its EMA (`opt_state`:
    the optimizer's state, or the EMA part of it). BatchNorm statistics and frozen parameters stay
    the model's own, as mmengine's EMA with update_buffers=False."""
    averaged = {_ema_path(path): leaf for path, leaf in nnx.to_flat_state(opt_state) if _ema_path(path)}
    return nnx.from_flat_state([(path, leaf.replace(averaged[path].get_value()) if path in averaged else leaf)
                                for path, leaf in nnx.to_flat_state(model_state)])


def ema_target(opt_state: nnx.State, model_state: nnx.State) -> nnx.State:
    """The EMA part of an (abstract) optimizer state, as restore targets placed like the parameters
    they average in `model_state` (abstract or concrete)."""
    placed = dict(nnx.to_flat_state(model_state))

    def target(path, leaf):
        value, where = leaf.get_value(), placed[_ema_path(path)].get_value()
        return leaf.replace(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=where.sharding))

    return nnx.from_flat_state([(path, target(path, leaf)) for path, leaf in nnx.to_flat_state(opt_state)
                                if _ema_path(path)])


def log_groups(param_groups: Sequence[str], params: nnx.State) -> None:
    """Logs each group's trained parameters; a regex of the user's (not a preset's) that matches no
    trained parameter is a ConfigError."""
    groups = parse_groups(param_groups)
    if not groups:
        return
    names = [(path_name(path), x.size) for path, x in jax.tree_util.tree_leaves_with_path(params)]
    for g in groups:
        if not g.preset and not any(g.pattern.search(name) for name, _ in names):
            raise ConfigError(f"optim.param_groups: {g.pattern.pattern!r} matches no trained parameter "
                              f"(paths look like {names[0][0] if names else 'none'!r})")
    tensors, sizes = [0] * (len(groups) + 1), [0] * (len(groups) + 1)  # the last: unmatched
    for name, size in names:
        i = next((i for i, g in enumerate(groups) if g.pattern.search(name)), len(groups))
        tensors[i], sizes[i] = tensors[i] + 1, sizes[i] + size
    for i, g in enumerate([*groups, Group(re.compile("(the rest)"))]):
        log.info("param group %s%s: lr x%g, weight decay x%g: %d tensors, %s parameters", g.pattern.pattern,
                 f" ({g.preset})" if g.preset else "", g.lr_mult, g.decay_mult, tensors[i], f"{sizes[i]:,}")


def restart_ema(opt_state: nnx.State, model_state: nnx.State) -> nnx.State:
    """`opt_state` with its EMA set to `model_state`'s parameters: weights loaded after the
    optimizer was created (train.init_from) start the average."""
    params = dict(nnx.to_flat_state(model_state))

    def start(path, leaf):
        value = params[_ema_path(path)].get_value()
        return leaf.replace(jax.device_put(value, value.sharding, may_alias=False))  # EMA and params donated apart

    return nnx.from_flat_state([(path, start(path, leaf) if _ema_path(path) else leaf)
                                for path, leaf in nnx.to_flat_state(opt_state)])
