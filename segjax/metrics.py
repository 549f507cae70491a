"""Segmentation metrics from a confusion matrix accumulated on device as integer sums.

`confusion_matrix` runs inside jit; `summarize_confusion` turns the summed matrix into IoU, Dice
and accuracy on the host. Classes absent from both prediction and target are left out of the
mean (their IoU is undefined) and reported under `absent_classes`.
"""
from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def confusion_matrix(target: jnp.ndarray, pred: jnp.ndarray, num_classes: int, valid: jnp.ndarray | None = None,
                     ignore_index: int | None = None) -> jnp.ndarray:
    """int32 [num_classes, num_classes], rows = target, columns = prediction.

    Pixels where `valid` is False, or whose target equals `ignore_index` or lies outside
    [0, num_classes), are not counted. Predictions outside that range count as the nearest class.
    """
    keep = jnp.ones(target.shape, bool) if valid is None else jnp.broadcast_to(valid, target.shape)
    keep &= (target >= 0) & (target < num_classes)
    if ignore_index is not None:
        keep &= target != ignore_index
    target = jnp.clip(target.astype(jnp.int32), 0, num_classes - 1)
    pred = jnp.clip(pred.astype(jnp.int32), 0, num_classes - 1)
    flat = (target * num_classes + pred).reshape(-1)
    counts = jnp.bincount(flat, weights=keep.reshape(-1).astype(jnp.int32), length=num_classes * num_classes)
    return counts.astype(jnp.int32).reshape(num_classes, num_classes)


def summarize_confusion(confusion: np.ndarray, class_names: list[str]) -> dict:
    """mIoU, per-class IoU and Dice, pixel accuracy; absent classes are excluded from means."""
    cm = np.asarray(confusion, dtype=np.int64)
    true_pos = np.diag(cm).astype(np.float64)
    target_total = cm.sum(axis=1)
    pred_total = cm.sum(axis=0)
    union = target_total + pred_total - true_pos
    present = union > 0
    iou = np.where(present, true_pos / np.maximum(union, 1), np.nan)
    dice = np.where(present, 2 * true_pos / np.maximum(target_total + pred_total, 1), np.nan)
    out = {
        "miou": float(np.nanmean(iou)) if present.any() else float("nan"),
        "mdice": float(np.nanmean(dice)) if present.any() else float("nan"),
        "pixel_accuracy": float(true_pos.sum() / max(cm.sum(), 1)),
        "absent_classes": [name for name, p in zip(class_names, present) if not p],
    }
    for name, value in zip(class_names, iou):
        out[f"iou_{name}"] = float(value)
    return out
