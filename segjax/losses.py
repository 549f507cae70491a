"""Losses shared by the tasks. Inputs are logits (cast to float32 here) and integer targets."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def weighted_cross_entropy(logits: jnp.ndarray, target: jnp.ndarray, weight: jnp.ndarray,
                           class_weights: jnp.ndarray | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Class-weighted softmax cross-entropy as PyTorch computes it: sum(w_t * ce) / sum(w_t).

    `weight` (broadcast to target) masks pixels out (padding, ignore). Returns (mean, sum of weights).
    """
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    safe_target = jnp.clip(target, 0, num_classes - 1).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe_target[..., None], axis=-1)[..., 0]
    w = jnp.broadcast_to(weight, target.shape).astype(jnp.float32)
    if class_weights is not None:
        w = w * class_weights[safe_target]
    total = w.sum()
    return (nll * w).sum() / jnp.maximum(total, 1e-12), total


def soft_dice_loss(probs: jnp.ndarray, target: jnp.ndarray, weight: jnp.ndarray, eps: float = 1.0) -> jnp.ndarray:
    """Per-item soft Dice loss, 1 - (2|P∩T| + eps) / (|P| + |T| + eps), summed over the trailing
    spatial axes. `probs`, `target` in [0, 1] with shape [K, ...]; `weight` [K] masks items out;
    returns the weighted mean over items."""
    axes = tuple(range(1, probs.ndim))
    probs = probs.astype(jnp.float32)
    target = target.astype(jnp.float32)
    inter = (probs * target).sum(axes)
    denom = probs.sum(axes) + target.sum(axes)
    per_item = 1.0 - (2.0 * inter + eps) / (denom + eps)
    weight = weight.astype(jnp.float32)
    return (per_item * weight).sum() / jnp.maximum(weight.sum(), 1e-12)
