"""Portrait masks from a query-based model (the `hybrid_p3m` experiment).

Data are square memmaps prepared by `tools/prepare_p3m.py` from P3M-10k (+ Supervisely Person), or
the original PyTorch pipeline's float16 files, one person mask per image. The model predicts
`num_queries` (class, mask) pairs; class 0 is "person" and index 1 "no object". Training uses the
set-prediction loss on padded multi-instance targets from the data: per image `mask_labels`
[T, H, W] (uint8), `class_labels` [T] and `label_valid` [T]; a portrait's are its person mask
(T = 1, valid when it has person pixels), added by `person_targets`.

Metric rule: the combined prediction of an image is, per pixel, the max over the queries whose
person probability exceeds `loss.score_threshold` of sigmoid(mask logit) × person probability;
pixels above 0.5 are person. A 2-class (background / person) confusion matrix of that against
the ground truth gives mIoU, per-class IoU, pixel accuracy and Dice. Letterbox padding counts as
background, as in the prepared files.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segjax import losses, metrics
from segjax.config import ConfigError, flag
from segjax.data import demo
from segjax.data.demo_portrait import prepare_portrait_demo
from segjax.data.errors import DataError
from segjax.data.memmap import STORAGE, MemmapSource, read_sidecar, storage_names
from segjax.data.transforms import augment_portrait, eval_portrait
from segjax.models.hybrid import SIZES, HybridQueryModel
from segjax.tasks.base import Letterbox, TaskBase, Transform, blend, class_map, record_sums, sized

log = logging.getLogger("segjax")

CLASS_NAMES = ("background", "person")  # of the metrics; the model's classes are ("person",)
PERSON = 0  # the model's class index of "person"; num_classes=1, so "no object" is 1
_MEMMAP_KEYS = ("train_images", "train_masks", "val_images", "val_masks")
FULL_SIZE = 640  # the published input side (P3M-10k prepared at 640×640)


@dataclass(frozen=True)
class QueryMaskDataConfig:
    # Folder of memmaps from tools/prepare_p3m.py: {split}_{image_size}_{u8|fp16}_{images,masks}.mmap.
    # Empty with no explicit files below = the portrait demo, prepared by the same code.
    data_dir: str = flag("")
    # Explicit memmap files (e.g. the original PyTorch pipeline's); each takes precedence over data_dir.
    train_images: str = ""
    train_masks: str = ""
    val_images: str = ""
    val_masks: str = ""
    # How files without a .json sidecar are stored; empty = from the sidecar, or from the file-name
    # tag in data_dir (u8: uint8 NHWC, fp16: float16 NCHW, the original pipeline's format).
    memmap_dtype: Literal["", "uint8", "float16", "float32"] = ""
    memmap_layout: Literal["", "NHWC", "NCHW"] = ""
    # Model input side; the memmaps' records must have this size. 0 = the prepared size (that of
    # the sidecars, or the one size in data_dir); FULL_SIZE for the demo data.
    image_size: int = 0
    flip: bool = True  # training augmentation (segjax.data.transforms.augment_portrait)
    scale_min: float = 0.75  # zoom about the centre, drawn from [scale_min, scale_max]
    scale_max: float = 1.25
    color_jitter: float = 0.2  # brightness/contrast/saturation factors within 1 ± this
    overfit_one: bool = False  # sanity check: train and validate on the first training record only
    demo_root: str = ""  # where demo data is written; default ~/.cache/segjax/demo


@dataclass(frozen=True)
class QueryMaskModelConfig:
    """HybridQueryModel arguments; None takes the value of the `size` variant (models.hybrid.SIZES)."""

    size: Literal["full", "tiny"] = "full"
    backbone_depths: tuple[int, ...] | None = None
    backbone_widths: tuple[int, ...] | None = None
    backbone_stem_width: int | None = None
    backbone_negative_slope: float | None = None  # None = 0.1; timm's darknet53 uses 0.01
    fpn_channels: int | None = None
    num_queries: int | None = None
    d_model: int | None = None
    num_layers: int | None = None
    num_heads: int | None = None
    dim_feedforward: int | None = None
    dropout_rate: float | None = None


@dataclass(frozen=True)
class SetLossConfig:
    """The set-prediction loss of every query model: weights (they enter the matching cost too)
    and Mask2Former's point sampling (`segjax.losses.Mask2FormerLoss`)."""

    class_weight: float = 2.0
    mask_weight: float = 5.0
    dice_weight: float = flag(5.0)
    no_object_weight: float = 0.1  # class weight of "no object" in the classification loss
    # 0: matching and mask loss over every pixel, each image normalised by its own targets (hybrid_p3m).
    # > 0: Mask2Former's criterion (segjax.losses.Mask2FormerLoss) at this many points (Mask2Former:
    # 12544), importance-sampled, normalised by the batch's targets; points come from the step's key.
    num_points: int = 0
    oversample_ratio: float = 3.0  # with num_points: uniform candidates per point
    importance_sample_ratio: float = 0.75  # with num_points: share of points taken where |logit| is least
    match_method: Literal["optax", "scipy"] = "optax"


@dataclass(frozen=True)
class QueryMaskLossConfig(SetLossConfig):
    cost_size: int = 0  # matching cost on masks resized to this square (saves memory); 0 = full size
    score_threshold: float = 0.5  # metrics: queries with a lower person probability are left out
    best_metric: Literal["miou", "loss"] = "miou"  # the checkpoint kept as best: max mIoU or min loss


def check_set_loss(loss: SetLossConfig) -> None:
    for key in ("class_weight", "mask_weight", "dice_weight", "no_object_weight"):
        if getattr(loss, key) < 0:
            raise ConfigError(f"loss.{key} must be >= 0, got {getattr(loss, key)}")
    if loss.num_points < 0 or loss.oversample_ratio < 1 or not 0 <= loss.importance_sample_ratio <= 1:
        raise ConfigError(f"need loss.num_points >= 0, loss.oversample_ratio >= 1 and "
                          f"0 <= loss.importance_sample_ratio <= 1, got {loss.num_points}, {loss.oversample_ratio}, "
                          f"{loss.importance_sample_ratio}")


def point_criterion(loss: SetLossConfig) -> losses.Mask2FormerLoss:
    """Mask2Former's criterion with the config's weights and points (loss.num_points > 0)."""
    return losses.Mask2FormerLoss(
        class_weight=loss.class_weight, mask_weight=loss.mask_weight, dice_weight=loss.dice_weight,
        no_object_weight=loss.no_object_weight, num_points=loss.num_points, oversample_ratio=loss.oversample_ratio,
        importance_sample_ratio=loss.importance_sample_ratio, match_method=loss.match_method)


def check(cfg) -> None:
    data, loss = cfg.data, cfg.loss
    if 0 < data.image_size < 16:
        raise ConfigError(f"data.image_size must be >= 16 (one decoder token at stride 16), got {data.image_size}")
    if not 0 < data.scale_min <= data.scale_max:
        raise ConfigError(f"need 0 < data.scale_min <= data.scale_max, got {data.scale_min}, {data.scale_max}")
    if not 0 <= data.color_jitter < 1:
        raise ConfigError(f"data.color_jitter must be within [0, 1), got {data.color_jitter}")
    kwargs = sized(cfg.model, SIZES)
    if len(kwargs["backbone_depths"]) != 5 or len(kwargs["backbone_widths"]) != 5:
        raise ConfigError(f"model.backbone_depths and model.backbone_widths need 5 stages, got "
                          f"{kwargs['backbone_depths']} and {kwargs['backbone_widths']}")
    if kwargs["d_model"] % 4 or kwargs["d_model"] % kwargs["num_heads"]:
        raise ConfigError(f"model.d_model ({kwargs['d_model']}) must be a multiple of 4 (sine positions) "
                          f"and of model.num_heads ({kwargs['num_heads']})")
    for key in ("backbone_stem_width", "fpn_channels", "num_queries", "num_layers", "num_heads", "dim_feedforward"):
        if kwargs[key] < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {kwargs[key]}")
    if not 0 <= kwargs["dropout_rate"] < 1:
        raise ConfigError(f"model.dropout_rate must be within [0, 1), got {kwargs['dropout_rate']}")
    check_set_loss(loss)
    if loss.cost_size < 0:
        raise ConfigError(f"loss.cost_size must be >= 0, got {loss.cost_size}")
    if not 0 <= loss.score_threshold < 1:
        raise ConfigError(f"loss.score_threshold must be within [0, 1), got {loss.score_threshold}")


def _prepared_memmaps(data_dir: Path, split: str, size: int) -> tuple[str, str, str]:
    """(images, masks, dtype) of a split in a tools/prepare_p3m.py output folder; uint8 first."""
    if not data_dir.is_dir():
        raise DataError(f"data.data_dir {data_dir} is not a directory (give the --out_dir of tools/prepare_p3m.py)")
    for dtype in STORAGE:
        images, masks = (data_dir / name for name in storage_names(split, size, dtype))
        if images.is_file():
            return str(images), str(masks), dtype
    found = sorted(p.name for p in data_dir.glob("*_images.mmap")) or "no memmaps"
    raise DataError(f"{data_dir}: no {split} memmaps of size {size} ({', '.join(storage_names(split, size, 'uint8'))} "
                    f"or their fp16 versions); found {found}. Set data.image_size to the prepared size")


def _prepared_size(data: QueryMaskDataConfig) -> int:
    """The records' size: the training images' sidecar, else the one size prepared in data_dir."""
    if data.train_images and Path(f"{data.train_images}.json").is_file():
        return int(read_sidecar(f"{data.train_images}.json")["size"])
    sizes = sorted({int(p.name.split("_")[1]) for p in Path(data.data_dir or ".").glob("train_*_images.mmap")
                    if p.name.split("_")[1].isdigit()}) if data.data_dir else []
    if len(sizes) != 1:
        raise DataError(f"{data.data_dir or data.train_images}: cannot tell the records' size "
                        f"({'prepared sizes ' + str(sizes) if sizes else 'no sidecar'}); set data.image_size")
    return sizes[0]


def _resolve_data(data: QueryMaskDataConfig) -> QueryMaskDataConfig:
    """Explicit memmap paths: the demo's when no data is given, else found in data_dir."""
    if not Task.has_data(data):
        size = data.image_size or FULL_SIZE
        root = (Path(data.demo_root) if data.demo_root else demo.default_demo_root()) / "portrait"
        paths = prepare_portrait_demo(root, root / f"memmaps_{size}", size=size)
        log.info("no data given: using the demo portrait dataset at %s, prepared into memmaps", root)
        return dataclasses.replace(data, image_size=size, **paths)
    missing = [k for k in _MEMMAP_KEYS if not getattr(data, k)]
    if missing and not data.data_dir:
        raise DataError(f"give --data_dir, or all of data.{', data.'.join(_MEMMAP_KEYS)}; missing {missing}")
    if not data.image_size:
        data = dataclasses.replace(data, image_size=_prepared_size(data))
    updates = {}
    for split in sorted({k.split("_")[0] for k in missing}):
        images, masks, dtype = _prepared_memmaps(Path(data.data_dir), split, data.image_size)
        updates.update({k: v for k, v in ((f"{split}_images", images), (f"{split}_masks", masks)) if k in missing})
        if not data.memmap_dtype:  # sidecar-less files of the original pipeline are known by their tag
            updates.update(memmap_dtype=dtype, memmap_layout=STORAGE[dtype][1])
    return dataclasses.replace(data, **updates)


def person_targets(record: dict) -> dict:
    """The record with its person mask as the set loss's one padded target (invalid when empty)."""
    mask = record["mask"]
    return {**record, "mask_labels": mask[None], "class_labels": np.full(1, PERSON, np.int32),
            "label_valid": np.asarray([mask.any()])}


def combine_queries(pred_logits: jnp.ndarray, pred_masks: jnp.ndarray, class_index: int,
                    score_threshold: float) -> jnp.ndarray:
    """Per-pixel score [B, H, W] of one class: the max over the queries whose probability of that
    class exceeds `score_threshold` of sigmoid(mask) × that probability (0 where none does)."""
    probs = jax.nn.softmax(pred_logits.astype(jnp.float32), axis=-1)[..., class_index]
    weight = jnp.where(probs > score_threshold, probs, 0.0)[..., None, None]
    return jnp.max(weight * jax.nn.sigmoid(pred_masks.astype(jnp.float32)), axis=1)


class Task(TaskBase):
    class_names = CLASS_NAMES
    data_keys = ("data_dir", *_MEMMAP_KEYS)
    loss_terms = ("loss", "loss_class", "loss_mask", "loss_dice")
    check = staticmethod(check)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.best_metric = cfg.loss.best_metric
        self.best_mode = "min" if self.best_metric == "loss" else "max"
        self._sources: dict[str, MemmapSource] = {}

    @classmethod
    def resolve_data(cls, data: QueryMaskDataConfig) -> QueryMaskDataConfig:
        return _resolve_data(data)

    def torch_weights(self) -> tuple[str, str]:
        """timm's darknet53 state dict into the backbone (`--init_from torch:PATH`)."""
        if self.cfg.model.backbone_negative_slope != 0.01:
            raise ConfigError("timm darknet53 weights need timm's LeakyReLU slope: "
                              "--set model.backbone_negative_slope=0.01")
        return "timm_darknet53", "backbone"

    def build_model(self, rngs: nnx.Rngs) -> HybridQueryModel:
        return HybridQueryModel(1, **sized(self.cfg.model, SIZES), dtype=self.compute_dtype,
                                param_dtype=jnp.float32, rngs=rngs)

    # --- data ---
    def _source(self, split: str) -> MemmapSource:
        """The split's memmaps, opened (and their sizes checked) on first use."""
        if split not in self._sources:
            data = self.cfg.data
            self._sources[split] = source = MemmapSource(
                getattr(data, f"{split}_images"), getattr(data, f"{split}_masks"), dtype=data.memmap_dtype or None,
                layout=data.memmap_layout or None, size=data.image_size)
            log.info("%s: %d records from %s", split, len(source), source.image_path)
        return self._sources[split]

    def train_data(self):
        data = self.cfg.data
        source = self._source("train")
        if data.overfit_one:
            # One record, repeated to fill a batch: training should drive its loss towards zero.
            return [source[0]] * self.cfg.train.batch_size, Transform(eval_portrait, then=person_targets,
                                                                      fixed=True)
        return source, Transform(functools.partial(augment_portrait, flip=data.flip,
                                                   scale=(data.scale_min, data.scale_max),
                                                   color_jitter=data.color_jitter), then=person_targets)

    def val_data(self):
        source = self._source("train" if self.cfg.data.overfit_one else "val")
        return ([source[0]] if self.cfg.data.overfit_one else source), Transform(eval_portrait, then=person_targets)

    # --- loss and metrics (inside jit) ---
    def _image_loss(self, logits, masks, target_masks, target_classes, target_valid):
        """set_prediction_loss of one image and its padded targets [T, H, W]."""
        loss_cfg = self.cfg.loss
        return losses.set_prediction_loss(
            logits[None], masks[None], target_masks[None], target_classes[None], target_valid[None],
            no_object_weight=loss_cfg.no_object_weight, class_weight=loss_cfg.class_weight,
            mask_weight=loss_cfg.mask_weight, dice_weight=loss_cfg.dice_weight,
            cost_size=(loss_cfg.cost_size,) * 2 if loss_cfg.cost_size else None, match_method=loss_cfg.match_method)

    def _point_loss(self, logits, masks, batch, target_valid, key, image_ok):
        """Mask2Former's criterion over the batch (loss.num_points > 0)."""
        return point_criterion(self.cfg.loss)([(logits, masks)], batch["mask_labels"], batch["class_labels"],
                                              target_valid, key, image_weight=image_ok)

    def loss_and_sums(self, model: HybridQueryModel, batch: dict, key: jax.Array):
        out = model(batch["image"].astype(self.compute_dtype) / 255.0)  # uint8 travels, device normalises
        logits = out["pred_logits"].astype(jnp.float32)
        masks = out["pred_masks"].astype(jnp.float32)
        image_ok = batch["valid"] & batch["image_ok"]
        # An image without a valid target (no person pixels) trains all its queries as "no object".
        target_valid = image_ok[:, None] & batch["label_valid"]
        count = image_ok.sum()
        total = lambda x: jnp.where(image_ok, x, 0.0).sum()  # noqa: E731
        if self.cfg.loss.num_points:
            loss, parts = self._point_loss(logits, masks, batch, target_valid, key, image_ok)
            totals = {name: value * count for name, value in (("loss", loss), *parts.items())}
        else:
            # Per image, so that padded and unreadable examples drop out of every term, the
            # classification included; the batch loss is the mean over usable images, each normalised
            # by its own number of targets. With one target per image this equals the batch-normalised
            # DETR loss whenever every image has a person.
            per_image, parts = jax.vmap(self._image_loss)(logits, masks, batch["mask_labels"].astype(jnp.float32),
                                                          batch["class_labels"], target_valid)
            loss = total(per_image) / jnp.maximum(count, 1)
            totals = {"loss": total(per_image), **{name: total(value) for name, value in parts.items()}}
        pred = combine_queries(logits, masks, PERSON, self.cfg.loss.score_threshold) > 0.5
        sums = {
            "count": count,
            **{name: totals[name] for name in ("loss", "loss_class", "loss_mask", "loss_dice")},
            "confusion": metrics.confusion_matrix(batch["mask"], pred, len(CLASS_NAMES), image_ok[:, None, None]),
            **record_sums(batch),
        }
        return loss, (sums, {"pred": pred.astype(jnp.uint8)})

    def summarize(self, sums: dict) -> dict:
        out = super().summarize(sums)
        out["dice"] = out["mdice"]
        out["dice_person"] = 2 * out["iou_person"] / (1 + out["iou_person"])  # binary Dice from IoU
        return out

    # --- visualisation (host) ---
    def panels(self, batch: dict, outputs: dict, index: int) -> list[np.ndarray]:
        """Image | ground truth | prediction, person in red."""
        image = batch["image"][index]
        red = np.zeros((256, 3), np.uint8)
        red[1:] = (255, 0, 0)
        return [image, *(blend(image, mask, red, mask > 0) for mask in (batch["mask"][index], outputs["pred"][index]))]

    # --- inference and export (segjax.predict, ONNX export) ---
    def export_signature(self, variant: str = "default") -> tuple[list[tuple[str, tuple]], list[str]]:
        """ONNX inputs as (name, shape), string dims dynamic, and output names (PyTorch's)."""
        self.check_variant(variant)
        size = self.cfg.data.image_size
        return [("images", ("B", 3, size, size))], ["pred_logits", "pred_masks"]

    def export_forward(self, model: HybridQueryModel, images_nchw: jnp.ndarray, *,
                       variant: str = "default") -> tuple[jnp.ndarray, jnp.ndarray]:
        """NCHW float32 images in [0, 1] -> (pred_logits [B, Q, 2], pred_masks [B, Q, H, W]) float32."""
        out = model(jnp.transpose(images_nchw, (0, 2, 3, 1)).astype(self.compute_dtype))
        return out["pred_logits"].astype(jnp.float32), out["pred_masks"].astype(jnp.float32)

    def inference_stages(self) -> list[tuple[str, Callable]]:
        """(name, fn(model, x)) run in order from float NHWC images to the model's outputs."""
        size = (self.cfg.data.image_size,) * 2
        return [("backbone", lambda model, images: model.backbone(images)),
                ("fpn", lambda model, features: model.fpn(features)),
                ("decoder", lambda model, pyramid: model.decoder(pyramid[0], size))]

    # --- prediction (segjax.predict) ---
    def palette(self) -> np.ndarray:
        """VOC's colours with the person in red, as in the visualisations."""
        palette = super().palette()
        palette[1] = (255, 0, 0)
        return palette

    def class_scores(self, pred_logits: np.ndarray, pred_masks: np.ndarray) -> np.ndarray:
        """Per-pixel scores [len(class_names), h, w] of one image's (class logits [Q, C + 1], mask
        logits [Q, h, w]), the metric rule: background a constant 0.5, class c + 1 the
        `combine_queries` score of the model's class c."""
        classes = pred_logits.shape[-1] - 1
        scores = [np.asarray(combine_queries(pred_logits[None], pred_masks[None], c, self.cfg.loss.score_threshold))[0]
                  for c in range(classes)]
        return np.stack([np.full_like(scores[0], 0.5), *scores])

    def postprocess(self, outputs, context: Letterbox) -> np.ndarray:
        """The class of the highest `class_scores`, bilinearly resized to the image's size: a pixel is
        a class where its score exceeds 0.5 (the background's)."""
        pred_logits, pred_masks = outputs
        return class_map(self.class_scores(pred_logits[0], pred_masks[0]), context)
