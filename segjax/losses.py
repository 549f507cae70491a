"""Losses shared by the tasks. Inputs are logits (cast to float32 here) and integer targets."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from segjax.ops.matching import hungarian_match
from segjax.ops.resize import resize_bilinear, resize_nearest


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


def set_prediction_loss(
    pred_logits: jnp.ndarray,
    pred_masks: jnp.ndarray,
    target_masks: jnp.ndarray,
    target_classes: jnp.ndarray,
    target_valid: jnp.ndarray,
    *,
    no_object_weight: float = 0.1,
    class_weight: float = 2.0,
    mask_weight: float = 5.0,
    dice_weight: float = 5.0,
    cost_size: tuple[int, int] | None = None,
    match_method: str = "optax",
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """DETR / Mask2Former set-prediction loss for query-based mask models; runs under `jit`.

    pred_logits: [B, Q, C + 1] class logits, index C = "no object".
    pred_masks: [B, Q, H, W] mask logits.
    target_masks: [B, T, H, W] binary masks, targets padded to a fixed T.
    target_classes: [B, T] ints in [0, C); target_valid: [B, T] bool, False for padding.
    For the person task C = 1: "person" is class 0 and "no object" is class 1.

    Queries are matched one-to-one to valid targets by the Hungarian algorithm on the cost
    class_weight * -p(class) + mask_weight * BCE + dice_weight * Dice, computed without
    gradient, on masks resized to `cost_size` (predictions bilinearly, targets nearest) when
    given, to save memory. Then:
      loss_class  softmax cross-entropy over all queries; unmatched queries target "no object",
                  whose weight is `no_object_weight` (mean weighted as PyTorch's `weight=`);
      loss_mask   per-pixel-mean sigmoid BCE of each matched mask, summed, / number of targets;
      loss_dice   soft Dice (smoothing 1) of each matched mask, summed, / number of targets.
    The loss is their sum with the same weights as the cost. The number of targets counts
    valid targets over the whole batch (at least 1). Returns (loss, parts).
    """
    batch, num_queries, num_logits = pred_logits.shape
    no_object = num_logits - 1
    if (pred_masks.shape[:2] != (batch, num_queries)
            or target_masks.shape[:2] != target_classes.shape):
        raise ValueError(
            f"shapes disagree: pred_logits {pred_logits.shape}, pred_masks {pred_masks.shape}, "
            f"target_masks {target_masks.shape}, target_classes {target_classes.shape}")
    if pred_masks.shape[2:] != target_masks.shape[2:]:
        raise ValueError(f"pred_masks {pred_masks.shape} and target_masks {target_masks.shape} "
                         "must have the same spatial size")
    logits = pred_logits.astype(jnp.float32)
    masks = pred_masks.astype(jnp.float32)
    targets = target_masks.astype(jnp.float32)
    valid = target_valid.astype(bool)
    classes = jnp.clip(target_classes, 0, no_object - 1).astype(jnp.int32)  # padding may be -1

    # Matching cost [B, Q, T].
    probs = jax.nn.softmax(logits, axis=-1)
    cost_class = -jnp.take_along_axis(probs, classes[:, None, :], axis=-1)
    cost_masks, cost_targets = masks, targets
    if cost_size is not None:
        cost_masks = jnp.moveaxis(resize_bilinear(jnp.moveaxis(masks, 1, -1), cost_size), -1, 1)
        cost_targets = jnp.moveaxis(
            resize_nearest(jnp.moveaxis(targets, 1, -1), cost_size), -1, 1)
    x = cost_masks.reshape(batch, num_queries, -1)
    t = cost_targets.reshape(batch, targets.shape[1], -1)
    # BCE(x, t) = softplus(x) - x t per pixel, so the mean over pixels for all pairs is one einsum.
    cost_mask = (jax.nn.softplus(x).sum(-1)[..., None]
                 - jnp.einsum("bqn,btn->bqt", x, t)) / x.shape[-1]
    p = jax.nn.sigmoid(x)
    inter = jnp.einsum("bqn,btn->bqt", p, t)
    cost_dice = 1.0 - (2.0 * inter + 1.0) / (p.sum(-1)[..., None] + t.sum(-1)[:, None, :] + 1.0)
    cost = class_weight * cost_class + mask_weight * cost_mask + dice_weight * cost_dice
    rows, cols, matched = hungarian_match(cost, valid, method=match_method)  # [B, K]

    # Classification over all queries: matched queries take their target's class.
    images = jnp.arange(batch)[:, None]
    matched_class = jnp.where(matched, jnp.take_along_axis(classes, cols, axis=1), no_object)
    query_class = jnp.full((batch, num_queries), no_object, jnp.int32)
    query_class = query_class.at[images, rows].set(matched_class)
    class_weights = jnp.ones(num_logits, jnp.float32).at[no_object].set(no_object_weight)
    loss_class, _ = weighted_cross_entropy(logits, query_class, 1.0, class_weights)

    # Masks of the matched pairs only [B, K, H*W].
    x = masks.reshape(batch, num_queries, -1)[images, rows]
    t = targets.reshape(batch, targets.shape[1], -1)[images, cols]
    num_targets = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    weight = matched.astype(jnp.float32)
    bce = jnp.mean(jax.nn.softplus(x) - x * t, axis=-1)
    loss_mask = jnp.sum(bce * weight) / num_targets
    p = jax.nn.sigmoid(x)
    dice = 1.0 - (2.0 * (p * t).sum(-1) + 1.0) / (p.sum(-1) + t.sum(-1) + 1.0)
    loss_dice = jnp.sum(dice * weight) / num_targets

    loss = class_weight * loss_class + mask_weight * loss_mask + dice_weight * loss_dice
    parts = dict(loss_class=loss_class, loss_mask=loss_mask, loss_dice=loss_dice,
                 num_targets=num_targets)
    return loss, parts
