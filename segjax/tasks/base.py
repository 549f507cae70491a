"""The task contract (`Task`, a Protocol) and `TaskBase`, the behaviour every task shares.

A task joins model, loss, metrics and data for one kind of prediction; the trainer, evaluate,
predict and export ask it for everything that differs between experiments and never branch on a
name. Building a task reads no data: paths are resolved in `__init__` (the demo data written when
none were given), the data are opened by `train_data()` / `val_data()`, so a model can be
restored, exported or used for prediction from a run directory alone.

Optional capabilities (PyTorch weights, export variants, prediction) are part of the contract:
`TaskBase` answers each with `Unsupported`, a one-line ConfigError naming the task, until a task
provides it.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal, Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from segjax import metrics
from segjax.config import ConfigError
from segjax.data import transforms, voc
from segjax.engine.inference import bilinear_axis, resample


class Unsupported(ConfigError):
    """A task was asked for an optional capability it does not have."""


@runtime_checkable
class Task(Protocol):
    cfg: Any  # segjax.config.Config with data paths resolved
    class_names: tuple[str, ...]  # of the metrics' confusion matrix
    best_metric: str  # the checkpoint kept as best; shown on the progress bar
    best_mode: Literal["max", "min"]
    shown_metrics: tuple[str, ...]  # the summary and log lines show these (when present), the bar the first two
    trainable: Any  # nnx filter of the parameters training updates (the optimizer's `wrt`)

    @staticmethod
    def has_data(data_cfg) -> bool:
        """Were real data paths given? (else the demo data and the experiment's demo variant)."""

    @staticmethod
    def check(cfg) -> None:
        """Raises ConfigError for values that the types alone do not catch."""

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module: ...

    def train_data(self) -> tuple[Sequence, Callable[[Any, np.random.Generator], dict]]:
        """(source, transform(entry, rng)); opens the data. May complete `cfg` with values found in
        the data (class weights), which the trainer saves with the run."""

    def val_data(self) -> tuple[Sequence, Callable[[Any], dict]]: ...

    def loss_and_sums(self, model: nnx.Module, batch: dict, key: jax.Array) -> tuple[jax.Array, tuple[dict, dict]]:
        """Inside jit: (loss, (sums, outputs)); `key` is the step's JAX key (segjax.engine.steps) for
        a loss that samples; `sums` are additive statistics including `records` and `bad_records`
        (the trainer's health check), `outputs` what `visualize` draws."""

    def summarize(self, sums: dict) -> dict:
        """Host sums -> metrics by name (floats are logged; `best_metric` among them)."""

    def visualize(self, batch: dict, outputs: dict, out_dir: Path, tag: str, limit: int) -> list[Path]: ...

    # --- optional capabilities ---
    def torch_weights(self) -> tuple[str, str]:
        """(segjax.bridge scheme, submodule it fills; "" = the whole model) for `--init_from torch:`."""

    def with_num_classes(self, num_classes: int) -> Task:
        """The same task for a model of `num_classes` classes (a whole-model state dict's)."""

    def load_hf_weights(self, model: nnx.Module, path: str) -> None:
        """Fills `model` in place from a Hugging Face `save_pretrained` directory (`--init_from hf:`)."""

    def hf_model(self, path: str) -> tuple[Task, nnx.Module]:
        """(task, model) holding a `save_pretrained` directory's weights and class count (export)."""

    def export_signature(self, variant: str = "default") -> tuple[list[tuple[str, tuple]], list[str]]:
        """ONNX inputs as (name, shape), str dims dynamic, and output names (the PyTorch original's)."""

    def export_forward(self, model: nnx.Module, *inputs: jax.Array, variant: str = "default") -> tuple[jax.Array, ...]:
        """NCHW float32 inputs (images in [0, 1]) -> NCHW outputs, as the PyTorch original."""

    predict_variant: str  # the export variant prediction runs, in JAX and from an .onnx file
    predict_options: tuple[str, ...]  # keyword options predict_inputs needs beyond `size` (e.g. boxes)

    def predict_inputs(self, image: np.ndarray, *, size: tuple[int, int], **options) -> tuple[dict, Any]:
        """One RGB uint8 image [H, W, 3] -> (the `predict_variant`'s export inputs by name, a batch
        of one with `images` as uint8 NHWC of `size` (height, width); context for `postprocess`)."""

    def postprocess(self, outputs: Sequence[np.ndarray], context: Any) -> np.ndarray:
        """The export outputs for `predict_inputs` -> a uint8 class-index map at the image's own size."""

    def palette(self) -> np.ndarray:
        """uint8 [256, 3] colours of the class indices, for prediction overlays."""

    # The evaluation protocol (segjax.engine.inference; tasks with per-pixel class scores).
    eval_outputs: Literal["logits", "probabilities"] | None  # what crop_scores gives; None = no protocol

    def eval_size(self) -> tuple[int, int]:
        """(height, width) the fixed-size validation fits images into: the bound of an empty eval.resize."""

    def val_images(self) -> tuple[Sequence, Callable[[Any], tuple[np.ndarray, np.ndarray] | None]]:
        """(source, read): read(entry) is the validation record's (RGB uint8 [H, W, 3], class-index
        label uint8 [H, W]) at their own size (values outside the classes ignored), None when unreadable."""

    def crop_scores(self, outputs: Sequence[jax.Array], size: tuple[int, int]) -> jax.Array:
        """The `predict_variant`'s export outputs for a batch of crops of `size` -> per-class
        scores float32 [B, K, *size] (jax.numpy, jit-able)."""

    def inference_stages(self) -> list[tuple[str, Callable]]:
        """(name, fn(model, x)) from float NHWC images in [0, 1] to the model's outputs, for
        per-part timing; [] = the model as one part."""


@dataclass(frozen=True)
class Letterbox:
    """Where an image sits in a model input of `size` (height, width): its top-left `content` (height,
    width) box, the rest padding; `height` × `width` is its own size."""

    height: int
    width: int
    size: tuple[int, int]
    content: tuple[int, int]
    scale: float  # input pixels per image pixel


def letterbox(image: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, Letterbox]:
    """An RGB image letterboxed (as in evaluation) into a batch of one [1, height, width, 3] uint8."""
    boxed, scale = transforms.resize_letterbox(image, size)
    height, width = image.shape[:2]
    content_h, content_w, _ = transforms.letterbox_size(height, width, size)
    return boxed[None], Letterbox(height, width, tuple(size), (content_h, content_w), scale)


PIXEL_BUDGET = 1 << 24  # floats resampled at once by class_map: bounds its memory on large images


def class_map(scores: np.ndarray, box: Letterbox) -> np.ndarray:
    """The class (argmax, the first on ties) per pixel of the original image from per-class scores
    [K, h, w] over the whole model input: cropped to the letterbox content, bilinearly resized to the
    image's size, in bands of rows so that large images need little memory."""
    _, h, w = scores.shape
    stop_y, stop_x = box.content[0] * h / box.size[0], box.content[1] * w / box.size[1]
    scores = scores.astype(np.float32, copy=False)
    cols = bilinear_axis(box.width, int(np.ceil(stop_x)), 0.0, stop_x)
    out = np.empty((box.height, box.width), np.uint8)
    band = max(1, PIXEL_BUDGET // (len(scores) * box.width))
    for top in range(0, box.height, band):
        bottom = min(box.height, top + band)
        rows = bilinear_axis(bottom - top, int(np.ceil(stop_y)), top * stop_y / box.height,
                             bottom * stop_y / box.height)
        out[top:bottom] = resample(scores, rows, cols).argmax(0)
    return out


def blend(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, coloured: np.ndarray | None = None,
          alpha: float = 0.5) -> np.ndarray:
    """The overlay of every task and of predict: `palette[mask]` blended into the RGB `image` at
    `alpha` where `coloured` (default: where the mask is not 255, the ignore label), rounded."""
    coloured = mask != 255 if coloured is None else coloured
    out = image.astype(np.float32)
    out[coloured] = (1 - alpha) * out[coloured] + alpha * palette[mask[coloured]]
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class Transform:
    """A picklable grain transform: `example(entry, rng=rng)` in training, `example(entry)` in
    validation or when `fixed` (the same deterministic view every step); `then` post-processes."""

    example: Callable
    then: Callable | None = None
    fixed: bool = False

    def __call__(self, entry, rng: np.random.Generator | None = None) -> dict:
        record = self.example(entry) if self.fixed or rng is None else self.example(entry, rng=rng)
        return record if self.then is None else self.then(record)


def sized(model_cfg, sizes: dict[str, dict]) -> dict:
    """A model's keyword arguments: the variant `model_cfg.size` of a model module's `SIZES`, with
    the config's explicit (not None) fields on top."""
    explicit = {f.name: getattr(model_cfg, f.name) for f in dataclasses.fields(model_cfg)
                if f.name != "size" and getattr(model_cfg, f.name) is not None}
    return {**sizes[model_cfg.size], **explicit}


def record_sums(batch: dict) -> dict:
    """The trainer's health sums: records in the batch (padding excluded) and unreadable ones."""
    return {"records": batch["valid"].sum(), "bad_records": (batch["valid"] & ~batch["image_ok"]).sum()}


class TaskBase:
    """What every task shares. A subclass sets `data_keys` or overrides `has_data`, implements
    `resolve_data`, `build_model`, the data, `loss_and_sums` and `panels`, and names in
    `loss_terms` the per-item means its sums hold (each summed over `count` items)."""

    best_metric: str = "miou"
    best_mode: Literal["max", "min"] = "max"
    data_keys: ClassVar[tuple[str, ...]] = ()  # data config fields that, set, mean real data
    loss_terms: ClassVar[tuple[str, ...]] = ("loss",)
    count_name: ClassVar[str] = "images"  # what `sums["count"]` counts, in the metrics
    export_variants: ClassVar[tuple[str, ...]] = ("default",)
    trainable: Any = nnx.Param  # every parameter trains
    class_names: tuple[str, ...]

    def __init__(self, cfg):
        """`cfg` complete (`resolve`d): building a task reads and writes nothing, and the data are
        opened by train_data/val_data."""
        self.cfg = cfg
        self.compute_dtype = jnp.bfloat16 if cfg.train.precision == "bf16" else jnp.float32

    @classmethod
    def resolve(cls, cfg):
        """The config with all that the task needs from disk filled in: data paths (the demo data
        written when none were given), class lists, values computed from the data. Every entry point
        runs it before building the task; a resolved config comes back unchanged."""
        return dataclasses.replace(cfg, data=cls.resolve_data(cfg.data))

    @classmethod
    def has_data(cls, data_cfg) -> bool:
        return any(getattr(data_cfg, key) for key in cls.data_keys)

    @staticmethod
    def check(cfg) -> None:
        pass

    @classmethod
    def resolve_data(cls, data_cfg):
        """The data config with every path the task reads filled in (demo data when none given)."""
        return data_cfg

    @staticmethod
    def item_sums(batch: dict, count: jax.Array, confusion: jax.Array, **means: jax.Array) -> dict:
        """The sums `summarize` reads: per-item `means` (the `loss_terms`) times the `count` of
        items, the confusion matrix and the trainer's health sums."""
        return {"count": count, **{name: value * count for name, value in means.items()}, "confusion": confusion,
                **record_sums(batch)}

    @property
    def shown_metrics(self) -> tuple[str, ...]:
        """Loss and best metric first (the progress bar's), then the loss terms, mIoU, pixel
        accuracy and, for up to four classes, each class's IoU."""
        per_class = tuple(f"iou_{name}" for name in self.class_names) if len(self.class_names) <= 4 else ()
        return tuple(dict.fromkeys(("loss", self.best_metric, *self.loss_terms[1:], "miou", "pixel_accuracy",
                                    *per_class)))

    def summarize(self, sums: dict) -> dict:
        """Mean loss terms per counted item, and the confusion matrix's IoU, Dice and accuracy."""
        count = max(float(sums["count"]), 1.0)
        out = {name: float(sums[name]) / count for name in self.loss_terms}
        out.update(metrics.summarize_confusion(sums["confusion"], list(self.class_names)))
        out[self.count_name] = int(sums["count"])
        return out

    def panels(self, batch: dict, outputs: dict, index: int) -> list[np.ndarray]:
        """The images side by side in one visualisation of batch item `index` ([] = none)."""
        raise NotImplementedError

    def visualize(self, batch: dict, outputs: dict, out_dir: Path, tag: str, limit: int) -> list[Path]:
        """`prediction_<tag>_<n>.png` for up to `limit` usable images: the task's panels side by side."""
        if "image" not in batch:  # a model on cached features: nothing to draw on
            return []
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for i in np.flatnonzero(batch["valid"] & batch["image_ok"])[:limit]:
            panels = self.panels(batch, outputs, int(i))
            if panels:
                path = out_dir / f"prediction_{tag}_{len(written)}.png"
                Image.fromarray(np.concatenate(panels, axis=1).astype(np.uint8)).save(path)
                written.append(path)
        return written

    # --- optional capabilities ---
    def _unsupported(self, what: str) -> Unsupported:
        return Unsupported(f"{Path(self.cfg.experiment).stem}: task {self.cfg.task!r} has no {what}")

    def torch_weights(self) -> tuple[str, str]:
        raise self._unsupported("PyTorch original to import weights from")

    def with_num_classes(self, num_classes: int) -> TaskBase:
        """The same task for a model of `num_classes` classes (a PyTorch state dict's)."""
        raise self._unsupported(f"class count other than {len(self.class_names)}")

    def load_hf_weights(self, model: nnx.Module, path: str) -> None:
        raise self._unsupported("Hugging Face model to import weights from")

    def hf_model(self, path: str) -> tuple[TaskBase, nnx.Module]:
        raise self._unsupported("Hugging Face model to import weights from")

    def check_variant(self, variant: str) -> None:
        if variant not in self.export_variants:
            raise ValueError(f"unknown export variant {variant!r}; choose one of {list(self.export_variants)}")

    def export_signature(self, variant: str = "default") -> tuple[list[tuple[str, tuple]], list[str]]:
        raise self._unsupported("ONNX export")

    def export_forward(self, model: nnx.Module, *inputs: jax.Array, variant: str = "default"):
        raise self._unsupported("ONNX export")

    predict_variant: ClassVar[str] = "default"
    predict_options: ClassVar[tuple[str, ...]] = ()

    def predict_inputs(self, image: np.ndarray, *, size: tuple[int, int], **options) -> tuple[dict, Any]:
        """The image letterboxed (segjax.tasks.base.letterbox) as `images`."""
        images, box = letterbox(image, size)
        return {"images": images}, box

    def postprocess(self, outputs: Sequence[np.ndarray], context: Any) -> np.ndarray:
        raise self._unsupported("prediction")

    def palette(self) -> np.ndarray:
        """PASCAL VOC's colours."""
        return voc.voc_palette()

    eval_outputs: ClassVar[str | None] = None

    def _no_protocol(self) -> Unsupported:
        return self._unsupported("evaluation protocol (eval.*): its outputs are not per-pixel class scores")

    def eval_size(self) -> tuple[int, int]:
        raise self._no_protocol()

    def val_images(self):
        raise self._no_protocol()

    def crop_scores(self, outputs, size):
        raise self._no_protocol()

    def inference_stages(self) -> list[tuple[str, Callable]]:
        return []
