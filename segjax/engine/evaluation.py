"""Validation, for training and segjax.evaluate alike: `make_evaluator` compiles once per run,
`validate_model` runs the validation set with a model state and returns the task's metrics.

The config's `eval` section decides how (README "Evaluation protocol"). At its defaults, fixed-size
batches go through the task's `loss_and_sums` on the mesh (fast; loss included). Otherwise each
image is read at its own size and segmented on the host by segjax.engine.inference (keep-ratio
resize, whole or sliding window, test-time scales and flip) around a jitted forward of fixed-shape
crop batches; its confusion matrix is taken at the label's own resolution (no loss: NaN).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from flax import nnx
from tqdm import tqdm

from segjax.data import pipeline
from segjax.engine import inference
from segjax.engine import mesh as mesh_lib
from segjax.engine import steps as steps_lib


@dataclass(frozen=True)
class Evaluator:
    """What validation needs besides the model state; built once by `make_evaluator`."""

    task: Any
    mesh: jax.sharding.Mesh
    cfg: Any
    step: Callable  # fixed-size: the eval step (sums, outputs); protocol: jitted crop scores
    protocol: inference.Protocol | None


def score_fn(task, model_def) -> Callable:
    """fn(state, crops uint8 NHWC [B, h, w, 3]) -> per-class scores float32 [B, K, h, w]: the
    task's predict variant (its exported graph) and `crop_scores`; jit it."""
    def scores(state, crops):
        model = nnx.merge(model_def, state)
        outputs = task.export_forward(model, inference.images_nchw(crops, jax.numpy), variant=task.predict_variant)
        return task.crop_scores(outputs, crops.shape[1:3])

    return scores


class CropScorer:
    """A jitted `score_fn` with a model state as the protocol's forward (numpy in and out); on a
    mesh the crops are split over its batch axes and the scores come back whole to every process."""

    def __init__(self, fn: Callable, state, mesh: jax.sharding.Mesh | None = None):
        self.fn, self.state, self.mesh = fn, state, mesh

    def __call__(self, crops: np.ndarray) -> np.ndarray:
        if self.mesh is not None:
            crops = jax.make_array_from_callback(crops.shape, mesh_lib.batch_sharding(self.mesh),
                                                 lambda index: crops[index])
        return np.asarray(self.fn(self.state, crops))


def task_protocol(task, *, min_batch: int = 1, fixed_size: tuple[int, int] | None = None) -> inference.Protocol:
    """The task's `eval` section resolved (ConfigError when it cannot run, or the task has no
    per-pixel class scores)."""
    return inference.build_protocol(task.cfg.eval, task.eval_size(), task.eval_outputs, min_batch=min_batch,
                                    fixed_size=fixed_size)


def make_evaluator(task, model_def, mesh: jax.sharding.Mesh, cfg) -> Evaluator:
    """Validation of models of `model_def` (an eval-mode graph) on `mesh`, as `cfg.eval` says."""
    if not inference.uses_protocol(cfg.eval):
        return Evaluator(task, mesh, cfg, steps_lib.make_eval_step(model_def, task.loss_and_sums, cfg.train.seed),
                         None)
    protocol = task_protocol(task, min_batch=mesh.shape["data"] * mesh.shape["fsdp"])
    step = steps_lib.inference_jit(score_fn(task, model_def), out_shardings=mesh_lib.replicated(mesh))
    return Evaluator(task, mesh, cfg, step, protocol)


def validate_model(evaluator: Evaluator, model_state, *, on_first_batch: Callable | None = None) -> dict:
    """Runs the validation set once; returns the task's metrics. `on_first_batch(batch, outputs)`
    gets the first batch and its outputs (`pred`) as host numpy, for drawing."""
    if evaluator.protocol is None:
        return _validate_batches(evaluator, model_state, on_first_batch)
    return _validate_images(evaluator, model_state, on_first_batch)


def _validate_batches(evaluator: Evaluator, model_state, on_first_batch) -> dict:
    """Fixed-size batches; sums stay on device per batch and are flushed to 64-bit host totals
    every `log_every` batches."""
    task, mesh, cfg = evaluator.task, evaluator.mesh, evaluator.cfg
    source, transform = task.val_data()
    global_batch = cfg.train.eval_batch_size or cfg.train.batch_size
    local_batch = mesh_lib.check_batch_size(global_batch, mesh)
    totals = steps_lib.HostSums()
    pending = None
    batches = pipeline.eval_batches(source, transform, local_batch=local_batch, global_batch=global_batch,
                                    num_workers=cfg.train.num_workers)
    for i, batch in enumerate(batches):
        sums, outputs = evaluator.step(model_state, mesh_lib.to_global_batch(batch, mesh))
        if i == 0 and on_first_batch is not None:
            on_first_batch(batch, mesh_lib.to_local(outputs, mesh))
        pending = sums if pending is None else steps_lib.add_sums(pending, sums)
        if (i + 1) % cfg.train.log_every == 0:
            totals.add(pending)
            pending = None
    if pending is not None:
        totals.add(pending)
    return task.summarize(totals.total)


def confusion_matrix(label: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """int64 [K, K] (rows label, columns prediction) over the pixels whose label is a class: the
    ignore index and any other value outside [0, K) are not counted (metrics.confusion_matrix's rule)."""
    keep = label < num_classes
    flat = label[keep].astype(np.int64) * num_classes + np.minimum(pred[keep], num_classes - 1)
    return np.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _validate_images(evaluator: Evaluator, model_state, on_first_batch) -> dict:
    """Every process segments every image (the crops split over the mesh), so each holds the totals."""
    task = evaluator.task
    num_classes = len(task.class_names)
    scorer = CropScorer(evaluator.step, model_state, evaluator.mesh)
    source, read = task.val_images()
    sums = {"count": 0, "records": len(source), "bad_records": 0,
            "confusion": np.zeros((num_classes, num_classes), np.int64),
            **{name: float("nan") for name in task.loss_terms}}  # no loss: images of any size, no targets
    for entry in tqdm(source, desc="validate", unit="image", leave=False, dynamic_ncols=True,
                      disable=jax.process_index() != 0):
        pair = read(entry)
        if pair is None:
            sums["bad_records"] += 1
            continue
        image, label = pair
        pred = inference.segment(image, evaluator.protocol, scorer)
        sums["confusion"] += confusion_matrix(label, pred, num_classes)
        if sums["count"] == 0 and on_first_batch is not None:
            on_first_batch({"image": image[None], "mask": label[None], "valid": np.ones(1, bool),
                            "image_ok": np.ones(1, bool)}, {"pred": pred[None]})
        sums["count"] += 1
    return task.summarize(sums)
