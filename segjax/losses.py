"""Losses shared by the tasks. Inputs are logits (cast to float32 here) and integer targets."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp

from segjax.ops.matching import METHODS, hungarian_match
from segjax.ops.point_sample import point_sample
from segjax.ops.resize import resize_bilinear, resize_nearest


def weighted_cross_entropy(logits: jnp.ndarray, target: jnp.ndarray, weight: jnp.ndarray,
                           class_weights: jnp.ndarray | None = None,
                           label_smoothing: float = 0.0) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Softmax cross-entropy as PyTorch's `F.cross_entropy(weight=class_weights,
    label_smoothing=ε)` with mean reduction computes it:

        sum_i w_i [(1 − ε) c_{t_i} (−log p_{i,t_i}) + ε/K sum_k c_k (−log p_{i,k})] / sum_i w_i c_{t_i}

    (c = class weights, all 1 when None; K classes). `weight` (broadcast to target) is a per-item
    weight: 0 masks items out (padding, ignore), as `ignore_index` does. Returns (mean, sum of
    w_i c_{t_i}); the mean is 0 when that sum is 0 (PyTorch gives NaN).
    """
    logits = logits.astype(jnp.float32)
    num_classes = logits.shape[-1]
    safe_target = jnp.clip(target, 0, num_classes - 1).astype(jnp.int32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, safe_target[..., None], axis=-1)[..., 0]
    w = jnp.broadcast_to(weight, target.shape).astype(jnp.float32)
    target_w = w if class_weights is None else w * class_weights[safe_target]
    total = target_w.sum()
    loss = (nll * target_w).sum()
    if label_smoothing:  # the uniform part of the target, each class weighted by its own weight
        smooth = -(log_probs if class_weights is None else log_probs * class_weights).sum(-1)
        loss = (1.0 - label_smoothing) * loss + label_smoothing / num_classes * (smooth * w).sum()
    return loss / jnp.maximum(total, 1e-12), total


def ohem_pixel_weight(logits: jnp.ndarray, target: jnp.ndarray, valid: jnp.ndarray, thresh: float,
                      min_kept: int) -> jnp.ndarray:
    """mmsegmentation's `OHEMPixelSampler(thresh, min_kept).sample` (bool instead of 0/1 float):
    the hard pixels among `valid` ones [B, H, W]. With p the softmax probability of the target
    class (no gradient) and p_sorted the valid pixels' p in ascending order, a valid pixel is kept
    when p < max(p_sorted[min(min_kept·B, n − 1)], thresh), n the number of valid pixels.
    Static shapes: invalid pixels sort last (+inf) instead of being removed."""
    logits = jax.lax.stop_gradient(logits.astype(jnp.float32))
    safe_target = jnp.clip(target, 0, logits.shape[-1] - 1).astype(jnp.int32)
    prob = jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), safe_target[..., None], axis=-1)[..., 0]
    ordered = jnp.sort(jnp.where(valid, prob, jnp.inf).reshape(-1))
    count = valid.sum()
    index = jnp.maximum(jnp.minimum(min(min_kept * target.shape[0], ordered.size - 1), count - 1), 0)
    min_threshold = jnp.where(count > 0, ordered[index], 0.0)
    return valid & (prob < jnp.maximum(min_threshold, thresh))


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


def _pair_mask_costs(x: jnp.ndarray, t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mean sigmoid BCE and soft Dice (smoothing 1) of every prediction x [B, Q, N] (logits)
    against every target t [B, T, N] in [0, 1]: two [B, Q, T] matching costs."""
    # BCE(x, t) = softplus(x) - x t per pixel, so the mean over pixels for all pairs is one einsum.
    bce = (jax.nn.softplus(x).sum(-1)[..., None] - jnp.einsum("bqn,btn->bqt", x, t)) / x.shape[-1]
    p = jax.nn.sigmoid(x)
    inter = jnp.einsum("bqn,btn->bqt", p, t)
    dice = 1.0 - (2.0 * inter + 1.0) / (p.sum(-1)[..., None] + t.sum(-1)[:, None, :] + 1.0)
    return bce, dice


def _mask_losses(x: jnp.ndarray, t: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Mean sigmoid BCE and soft Dice (smoothing 1) of matched pairs x (logits), t [..., N] -> [...]."""
    bce = jnp.mean(jax.nn.softplus(x) - x * t, axis=-1)
    p = jax.nn.sigmoid(x)
    dice = 1.0 - (2.0 * (p * t).sum(-1) + 1.0) / (p.sum(-1) + t.sum(-1) + 1.0)
    return bce, dice


def _query_classes(rows, cols, matched, classes, num_queries: int, no_object: int) -> jnp.ndarray:
    """[B, Q] class target of every query: its matched target's class, else `no_object`."""
    images = jnp.arange(rows.shape[0])[:, None]
    matched_class = jnp.where(matched, jnp.take_along_axis(classes, cols, axis=1), no_object)
    query_class = jnp.full((rows.shape[0], num_queries), no_object, jnp.int32)
    return query_class.at[images, rows].set(matched_class)


def _class_loss(logits, query_class, no_object_weight: float, image_weight=1.0) -> jnp.ndarray:
    """Softmax cross-entropy of all queries, "no object" (the last logit) weighted by `no_object_weight`."""
    class_weights = jnp.ones(logits.shape[-1], jnp.float32).at[-1].set(no_object_weight)
    return weighted_cross_entropy(logits, query_class, image_weight, class_weights)[0]


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
    cost_mask, cost_dice = _pair_mask_costs(cost_masks.reshape(batch, num_queries, -1),
                                            cost_targets.reshape(batch, targets.shape[1], -1))
    cost = class_weight * cost_class + mask_weight * cost_mask + dice_weight * cost_dice
    rows, cols, matched = hungarian_match(cost, valid, method=match_method)  # [B, K]

    # Classification over all queries: matched queries take their target's class.
    query_class = _query_classes(rows, cols, matched, classes, num_queries, no_object)
    loss_class = _class_loss(logits, query_class, no_object_weight)

    # Masks of the matched pairs only [B, K, H*W].
    images = jnp.arange(batch)[:, None]
    x = masks.reshape(batch, num_queries, -1)[images, rows]
    t = targets.reshape(batch, targets.shape[1], -1)[images, cols]
    num_targets = jnp.maximum(valid.sum(), 1).astype(jnp.float32)
    weight = matched.astype(jnp.float32)
    bce, dice = _mask_losses(x, t)
    loss_mask = jnp.sum(bce * weight) / num_targets
    loss_dice = jnp.sum(dice * weight) / num_targets

    loss = class_weight * loss_class + mask_weight * loss_mask + dice_weight * loss_dice
    parts = dict(loss_class=loss_class, loss_mask=loss_mask, loss_dice=loss_dice,
                 num_targets=num_targets)
    return loss, parts


def semantic_targets(labels: jnp.ndarray, num_classes: int) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Label maps [B, H, W] as padded set targets, one per class as transformers' Mask2Former
    image processor makes them, with static shapes: masks [B, K, H, W] uint8 (slot k = class k),
    classes [B, K] and valid [B, K] (the class is present). Other values (255 = ignore) are in no
    mask, so ignored pixels are negatives of every target, as in the original."""
    classes = jnp.arange(num_classes, dtype=jnp.int32)
    masks = (labels[:, None].astype(jnp.int32) == classes[:, None, None]).astype(jnp.uint8)
    return masks, jnp.broadcast_to(classes, (labels.shape[0], num_classes)), masks.any(axis=(2, 3))

@dataclass(frozen=True)
class Mask2FormerLoss:
    """Mask2Former's set criterion (transformers' `Mask2FormerLoss`), static-shaped for `jit`.

    Called as `loss(sets, target_masks, target_classes, target_valid, key, image_weight=None)`:
      sets: (class logits [B, Q, K + 1], mask logits [B, Q, h, w]) pairs, the final prediction
        and the auxiliary ones in any order; each is matched and scored on its own, the loss is
        the sum over all sets. Mask logits are PyTorch-style [B, Q, h, w], as every segjax query
        model returns them; h, w need not be the targets' size (points are normalised).
      target_masks [B, T, H, W] (binary, any dtype; uint8 saves memory), target_classes [B, T]
        in [0, K), target_valid [B, T]: targets padded to a static T; an image without a valid
        target trains its class loss only (every query "no object").
      image_weight [B]: 0 drops an image (batch padding, unreadable) from every term.
    Per set and image, queries are matched to valid targets by the Hungarian algorithm on
    mask_weight·BCE + class_weight·(−p(class)) + dice_weight·Dice at `num_points` uniform
    points shared by predictions and targets (non-finite costs are matched last, never fatal).
    Matched pairs are scored at importance-sampled points: `oversample_ratio`·num_points
    uniform points, the `importance_sample_ratio`·num_points most uncertain (smallest |logit|)
    of them plus fresh uniform ones; BCE is averaged over points, Dice has smoothing 1, both are
    summed over pairs / num_masks (valid targets of the batch, at least 1). The class loss is
    cross-entropy over all queries with weight `no_object_weight` on "no object" (index K).
    All points come from `key`. Returns (loss, parts) with the unweighted terms summed over sets.
    """

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = 5.0
    no_object_weight: float = 0.1
    num_points: int = 12544
    oversample_ratio: float = 3.0
    importance_sample_ratio: float = 0.75
    match_method: str = "optax"

    def __post_init__(self):
        if self.num_points < 1 or self.oversample_ratio < 1 or not 0 <= self.importance_sample_ratio <= 1:
            raise ValueError(f"need num_points >= 1, oversample_ratio >= 1 and 0 <= importance_sample_ratio <= 1, "
                             f"got {self.num_points}, {self.oversample_ratio}, {self.importance_sample_ratio}")
        if self.match_method not in METHODS:
            raise ValueError(f"unknown matching method {self.match_method!r}; choose one of {METHODS}")

    @property
    def num_uncertain(self) -> int:
        return int(self.importance_sample_ratio * self.num_points)  # transformers' rounding

    def draw_points(self, key: jax.Array, batch: int, pairs: int) -> tuple[jax.Array, jax.Array, jax.Array]:
        """One set's uniform points (x, y): matching [B, N, 2], oversampled [B, P, ratio·N, 2] and
        fresh [B, P, N − uncertain, 2] per matched pair (P = min(Q, T) pair slots)."""
        keys = jax.random.split(key, 3)
        return (jax.random.uniform(keys[0], (batch, self.num_points, 2)),
                jax.random.uniform(keys[1], (batch, pairs, int(self.num_points * self.oversample_ratio), 2)),
                jax.random.uniform(keys[2], (batch, pairs, self.num_points - self.num_uncertain, 2)))

    def __call__(self, sets: Sequence[tuple[jax.Array, jax.Array]], target_masks, target_classes, target_valid,
                 key: jax.Array, image_weight=None) -> tuple[jax.Array, dict[str, jax.Array]]:
        batch, num_queries = sets[0][0].shape[:2]
        pairs = min(num_queries, target_masks.shape[1])
        points = [self.draw_points(k, batch, pairs) for k in jax.random.split(key, len(sets))]
        return self.loss_at_points(sets, target_masks, target_classes, target_valid, points, image_weight)

    def match(self, class_logits, mask_logits, target_masks, target_classes, target_valid, points):
        """(rows, cols, matched) [B, min(Q, T)] of one set, as `hungarian_match`, at `points` [B, N, 2]."""
        logits = class_logits.astype(jnp.float32)
        if mask_logits.shape[:2] != logits.shape[:2] or target_masks.shape[:2] != target_classes.shape:
            raise ValueError(f"shapes disagree: class logits {logits.shape}, mask logits {mask_logits.shape}, "
                             f"target masks {target_masks.shape}, target classes {target_classes.shape}")
        classes = jnp.clip(target_classes, 0, logits.shape[-1] - 2).astype(jnp.int32)  # padding may be -1
        cost_class = -jnp.take_along_axis(jax.nn.softmax(logits, axis=-1), classes[:, None, :], axis=-1)
        cost_mask, cost_dice = _pair_mask_costs(point_sample(mask_logits.astype(jnp.float32), points[:, None]),
                                                point_sample(target_masks, points[:, None]))
        cost = self.mask_weight * cost_mask + self.class_weight * cost_class + self.dice_weight * cost_dice
        return hungarian_match(cost, target_valid, method=self.match_method)

    def loss_at_points(self, sets, target_masks, target_classes, target_valid, points, image_weight=None):
        """The loss with each set's (matching, oversampled, fresh) points given (see `draw_points`)."""
        batch, num_queries, num_logits = sets[0][0].shape
        image_weight = jnp.ones(batch, jnp.float32) if image_weight is None else image_weight.astype(jnp.float32)
        target_masks = jnp.asarray(target_masks)  # host arrays too (indexed by traced matches below)
        target_valid = jnp.asarray(target_valid, bool) & (image_weight[:, None] > 0)
        classes = jnp.clip(target_classes, 0, num_logits - 2).astype(jnp.int32)
        num_masks = jnp.maximum(target_valid.sum(), 1).astype(jnp.float32)
        images = jnp.arange(batch)[:, None]
        terms = []
        for (class_logits, mask_logits), (match_points, oversampled, fresh) in zip(sets, points, strict=True):
            rows, cols, matched = self.match(class_logits, mask_logits, target_masks, classes, target_valid,
                                             match_points)
            query_class = _query_classes(rows, cols, matched, classes, num_queries, num_logits - 1)
            loss_class = _class_loss(class_logits.astype(jnp.float32), query_class, self.no_object_weight,
                                     image_weight[:, None])
            pair_logits = mask_logits.astype(jnp.float32)[images, rows]  # [B, P, h, w]
            pair_targets = target_masks[images, cols]  # [B, P, H, W]
            # Importance sampling: the most uncertain of the oversampled points, chosen without gradient.
            uncertainty = -jnp.abs(point_sample(jax.lax.stop_gradient(pair_logits), oversampled))
            _, chosen = jax.lax.top_k(uncertainty, self.num_uncertain)
            pair_points = jnp.concatenate(
                [jnp.take_along_axis(oversampled, chosen[..., None], axis=-2), fresh], axis=-2)
            bce, dice = _mask_losses(point_sample(pair_logits, pair_points), point_sample(pair_targets, pair_points))
            weight = matched.astype(jnp.float32)
            terms.append((loss_class, jnp.sum(bce * weight) / num_masks, jnp.sum(dice * weight) / num_masks))
        loss_class, loss_mask, loss_dice = (sum(parts) for parts in zip(*terms))
        loss = self.class_weight * loss_class + self.mask_weight * loss_mask + self.dice_weight * loss_dice
        return loss, {"loss_class": loss_class, "loss_mask": loss_mask, "loss_dice": loss_dice, "num_masks": num_masks}
