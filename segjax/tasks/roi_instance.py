"""Per-person instance masks from an RoIAlign head (the `roi_human` experiment).

Each ROI is one person's box; its 56×56 target marks 0 = background, 1 = this person,
2 = other people inside the box. Features come from the built-in stride-8 backbone (trained end
to end) or from a frozen ONNX extractor whose outputs are cached on disk.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from scipy.special import softmax

from segjax import losses, metrics
from segjax.config import ConfigError, flag
from segjax.data import coco, demo, prepare, transforms
from segjax.data.errors import DataError
from segjax.data.feature_cache import OnnxFeatureExtractor
from segjax.models.roi_head import SIZES, RoiHumanModel, roi_human_model
from segjax.tasks.base import TaskBase, Transform, bilinear_axis, blend, letterbox, resample, sized

log = logging.getLogger("segjax")

CLASS_NAMES = ("background", "this_person", "other_people")
OVERLAY_COLOURS = {1: (255, 0, 0), 2: (0, 0, 255)}  # this person red, other people blue
PALETTE = np.zeros((256, 3), np.uint8)
PALETTE[list(OVERLAY_COLOURS)] = list(OVERLAY_COLOURS.values())


@dataclass(frozen=True)
class RoiDataConfig:
    train_ann: str = flag("")  # COCO instances JSON; empty everywhere = the demo dataset
    val_ann: str = flag("")
    train_img_dir: str = flag("")
    val_img_dir: str = flag("")
    image_size: int = 640  # letterboxed square input (the extractor's 640×640)
    max_rois: int = 8  # ROI bucket per image: fixed shapes, no recompiles; larger images are chunked
    mask_size: int = 56  # the head's output size
    jitter: float = 0.1  # training box jitter, fraction of the box size
    flip: bool = True  # random horizontal flip in training (built-in backbone only)
    data_stats: str = flag("")  # JSON with class weights (tools/prepare_coco_person.py --stats); else computed
    # Cross-entropy weights of CLASS_NAMES; empty = from data_stats, else computed from the training
    # ROIs when training starts (and saved with the run, so evaluation needs no training data).
    class_weights: tuple[float, ...] = ()
    extractor_onnx: str = ""  # frozen ONNX feature extractor N×3×S×S -> N×C×S/8×S/8; empty = built-in
    feature_cache_dir: str = ""  # where extractor features are cached; default beside the run
    demo_root: str = ""  # where the demo dataset is written; default ~/.cache/segjax/demo


@dataclass(frozen=True)
class RoiModelConfig:
    """roi_human_model arguments; None takes the value of the `size` variant (models.roi_head.SIZES)."""

    size: Literal["full", "tiny"] = "full"
    feature_channels: int | None = None  # C of the stride-8 features (backbone output or extractor)
    backbone_widths: tuple[int, ...] | None = None
    backbone_blocks: tuple[int, ...] | None = None
    head_width: int | None = None
    head_fine_width: int | None = None
    sampling_ratio: int = -1  # RoIAlign points per bin; <= 0 adaptive


@dataclass(frozen=True)
class RoiLossConfig:
    ce_weight: float = flag(1.0)
    dice_weight: float = flag(1.0)


class _WithFeatures:
    """Replaces the image by cached extractor features (picklable for grain workers)."""

    def __init__(self, extractor: OnnxFeatureExtractor, feature_shape: tuple[int, int, int], keep_image: bool):
        self.extractor = extractor
        self.feature_shape = feature_shape
        self.keep_image = keep_image

    def __call__(self, record: dict) -> dict:
        record = dict(record)
        image = record["image"] if self.keep_image else record.pop("image")
        if record["image_ok"]:
            record["features"] = self.extractor.features(f"image_{int(record['image_id'])}", image)
        else:
            record["features"] = np.zeros(self.feature_shape, np.float16)
        return record


class Task(TaskBase):
    class_names = CLASS_NAMES
    data_keys = ("train_ann", "val_ann", "train_img_dir", "val_img_dir")
    loss_terms = ("loss", "ce", "dice")
    count_name = "rois"
    export_variants = ("default", "end_to_end")

    def __init__(self, cfg):
        super().__init__(cfg)
        self._indexes: dict[str, list] = {}
        self._extractor = None

    @staticmethod
    def check(cfg) -> None:
        data, model = cfg.data, sized(cfg.model, SIZES)
        if data.image_size < 8 or data.image_size % 8:
            raise ConfigError(f"data.image_size must be a positive multiple of 8 (stride-8 features), "
                              f"got {data.image_size}")
        if data.mask_size != 56:
            raise ConfigError(f"data.mask_size must be 56, the ROI head's output size; got {data.mask_size}")
        if data.max_rois < 1:
            raise ConfigError(f"data.max_rois must be >= 1, got {data.max_rois}")
        if not 0 <= data.jitter < 0.5:
            raise ConfigError(f"data.jitter must be within [0, 0.5), got {data.jitter}")
        if len(model["backbone_widths"]) != 3 or len(model["backbone_blocks"]) != 3:
            raise ConfigError(f"model.backbone_widths and model.backbone_blocks need 3 stages each (stride 8), got "
                              f"{model['backbone_widths']} and {model['backbone_blocks']}")
        for key in ("feature_channels", "head_width", "head_fine_width"):
            if model[key] < 1:
                raise ConfigError(f"model.{key} must be >= 1, got {model[key]}")
        if data.class_weights and len(data.class_weights) != len(CLASS_NAMES):
            raise ConfigError(f"data.class_weights needs {len(CLASS_NAMES)} values, got {data.class_weights}")
        missing = [k for k in Task.data_keys if not getattr(data, k)]
        if Task.has_data(data) and missing:
            raise ConfigError(f"real data needs all of --train_ann --val_ann --train_img_dir --val_img_dir; "
                              f"missing --{' --'.join(missing)}")

    @classmethod
    def resolve(cls, cfg):
        """Also the class weights (saved with the run): from data.data_stats, else from the training ROIs."""
        cfg = super().resolve(cfg)
        data = cfg.data
        if data.class_weights:
            return cfg
        if data.data_stats:
            stats = prepare.read_stats(data.data_stats)
            log.info("class weights from %s: %s", data.data_stats, stats["class_weights"])
        else:
            images, skipped = coco.load_person_index(data.train_ann, data.train_img_dir)
            skipped.log(log, f"train annotations {data.train_ann}")
            stats = prepare.compute_roi_class_stats(images, mask_size=data.mask_size)
            log.info("class weights computed from %d training ROIs: %s", stats["num_rois"], stats["class_weights"])
        weights = tuple(float(w) for w in stats["class_weights"])
        return dataclasses.replace(cfg, data=dataclasses.replace(data, class_weights=weights))

    @classmethod
    def resolve_data(cls, data: RoiDataConfig) -> RoiDataConfig:
        if cls.has_data(data):
            return data
        root = Path(data.demo_root) if data.demo_root else demo.default_demo_root() / "coco_person"
        paths = demo.write_coco_person_demo(root)
        log.info("no data paths given: using the demo COCO person dataset at %s", root)
        return dataclasses.replace(data, **{k: str(v) for k, v in paths.items()})

    # --- model ---
    @property
    def feature_channels(self) -> int:
        return sized(self.cfg.model, SIZES)["feature_channels"]

    def build_model(self, rngs: nnx.Rngs) -> RoiHumanModel:
        return roi_human_model(**sized(self.cfg.model, SIZES), num_classes=len(CLASS_NAMES),
                               backbone=not self.cfg.data.extractor_onnx, dtype=self.compute_dtype,
                               param_dtype=jnp.float32, rngs=rngs)

    # --- data (opened on first use) ---
    def _index(self, split: str) -> list:
        if split not in self._indexes:
            data = self.cfg.data
            ann, img_dir = getattr(data, f"{split}_ann"), getattr(data, f"{split}_img_dir")
            images, skipped = coco.load_person_index(ann, img_dir)
            skipped.log(log, f"{split} annotations {ann}")
            if not images:
                raise DataError(f"{ann}: no usable person images")
            self._indexes[split] = images
        return self._indexes[split]

    def _features(self, keep_image: bool) -> _WithFeatures | None:
        data = self.cfg.data
        if not data.extractor_onnx:
            return None
        if self._extractor is None:
            cache = (data.feature_cache_dir
                     or str(Path(data.extractor_onnx).with_suffix("")) + f"_features_{data.image_size}")
            self._extractor = OnnxFeatureExtractor(data.extractor_onnx, cache)
            if self._extractor.out_channels not in (None, self.feature_channels):
                raise ConfigError(f"extractor gives {self._extractor.out_channels} channels but "
                                  f"model.feature_channels is {self.feature_channels}")
            if self._extractor.in_size not in (None, (data.image_size, data.image_size)):
                raise ConfigError(f"extractor expects {self._extractor.in_size} input; set data.image_size to match")
        side = -(-data.image_size // 8)
        return _WithFeatures(self._extractor, (side, side, self.feature_channels), keep_image=keep_image)

    def _data(self, split: str) -> tuple[coco.PersonRoiSource, Transform]:
        data, train = self.cfg.data, split == "train"
        example = functools.partial(transforms.make_roi_example, image_size=data.image_size, max_rois=data.max_rois,
                                    mask_size=data.mask_size, jitter=data.jitter,
                                    flip=data.flip and not data.extractor_onnx)
        return (coco.PersonRoiSource(self._index(split), data.max_rois),
                Transform(example, then=self._features(keep_image=not train)))

    def train_data(self):
        return self._data("train")

    def val_data(self):
        return self._data("val")

    # --- loss and metrics (inside jit) ---
    def loss_and_sums(self, model: RoiHumanModel, batch: dict, key: jax.Array):
        del key  # the loss draws nothing
        if "features" in batch:
            inputs = batch["features"].astype(self.compute_dtype)
        else:
            inputs = batch["image"].astype(self.compute_dtype) / 255.0  # uint8 travels, device normalises
        rois = batch["rois"]
        num_images, max_rois = rois.shape[:2]
        image_ok = batch["image_ok"] & batch["valid"]
        roi_valid = (batch["roi_valid"] & image_ok[:, None]).reshape(-1)
        # [N, R, 4] boxes per image: RoIAlign needs no one-hot over the images.
        logits = model(inputs, rois).astype(jnp.float32)
        targets = batch["targets"].reshape(-1, *batch["targets"].shape[2:]).astype(jnp.int32)

        if not self.cfg.data.class_weights:
            raise ConfigError("data.class_weights is empty: resolve the config (segjax.tasks.resolve) first")
        loss_cfg = self.cfg.loss
        ce, _ = losses.weighted_cross_entropy(logits, targets, roi_valid[:, None, None],
                                              jnp.asarray(self.cfg.data.class_weights, jnp.float32))
        dice = losses.soft_dice_loss(jax.nn.softmax(logits, axis=-1)[..., 1], targets == 1, roi_valid)
        loss = loss_cfg.ce_weight * ce + loss_cfg.dice_weight * dice
        pred = jnp.argmax(logits, axis=-1)
        confusion = metrics.confusion_matrix(targets, pred, len(CLASS_NAMES), roi_valid[:, None, None])
        sums = self.item_sums(batch, roi_valid.sum(), confusion, loss=loss, ce=ce, dice=dice)
        outputs = {"pred": pred.reshape(num_images, max_rois, *pred.shape[1:]).astype(jnp.uint8)}
        return loss, (sums, outputs)

    # --- visualisation (host) ---
    def panels(self, batch: dict, outputs: dict, index: int) -> list[np.ndarray]:
        """A panel per person: its predicted mask pasted into its box."""
        return [overlay_roi_prediction(batch["image"][index], batch["rois"][index, r], outputs["pred"][index, r])
                for r in np.flatnonzero(batch["roi_valid"][index])]

    # --- export (segjax.export.onnx) ---
    def export_signature(self, variant: str = "default") -> tuple[list[tuple[str, tuple]], list[str]]:
        """The PyTorch original's ONNX interface: "default" is the head alone on stride-8 features
        (`features [N, C, S/8, S/8]`, as the frozen extractor gives them), "end_to_end" the head on
        the built-in backbone (`images [N, 3, S, S]`); both take `rois [K, 5]` and give
        `masks [K, 3, 56, 56]`. S is data.image_size."""
        self.check_variant(variant)
        size = self.cfg.data.image_size
        if variant == "default":
            side = -(-size // 8)
            first = ("features", ("N", self.feature_channels, side, side))
        else:
            if self.cfg.data.extractor_onnx:
                raise ValueError("variant 'end_to_end' needs the built-in backbone, but this model reads features "
                                 f"from the ONNX extractor {self.cfg.data.extractor_onnx}")
            first = ("images", ("N", 3, size, size))
        return [first, ("rois", ("K", 5))], ["masks"]

    def export_forward(self, model: RoiHumanModel, inputs: jax.Array, rois: jax.Array, *,
                       variant: str = "default") -> tuple[jax.Array]:
        """NCHW features (or images in [0, 1] for "end_to_end") and rois -> (masks NCHW,)."""
        x = jnp.moveaxis(inputs, 1, -1)
        masks = model.head(x, rois) if variant == "default" else model(x, rois)
        return (jnp.moveaxis(masks, -1, 1),)

    # --- prediction (segjax.predict): the end-to-end model on the letterboxed image ---
    predict_variant = "end_to_end"
    predict_options = ("boxes",)

    def palette(self) -> np.ndarray:
        return PALETTE.copy()

    def predict_inputs(self, image: np.ndarray, *, size: tuple[int, int], boxes: np.ndarray) -> tuple[dict, Any]:
        """`images` and `rois` [K, 5] of the person `boxes` [N, 4] (x1, y1, x2, y2 in image pixels);
        K is N rounded up to a power of two (dummy boxes after them) so that few ROI counts compile."""
        images, box = letterbox(image, size)
        boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
        rois = np.zeros((1 << max(len(boxes) - 1, 0).bit_length(), 5), np.float32)
        rois[:, 3:] = 1.0
        rois[:len(boxes), 1:] = boxes * box.scale
        return {"images": images, "rois": rois}, (box, boxes)

    def postprocess(self, outputs, context) -> np.ndarray:
        """Each box's class probabilities bilinearly pasted into it, combined over boxes by the
        maximum per class (background 1 outside every box), then the most likely class."""
        box, boxes = context
        probs = softmax(outputs[0][:len(boxes)], axis=1)
        canvas = np.zeros((len(CLASS_NAMES), box.height, box.width), np.float32)
        canvas[0] = 1.0
        covered = np.zeros((box.height, box.width), bool)
        for (x1, y1, x2, y2), prob in zip(boxes, probs):
            left, top = max(int(np.floor(x1)), 0), max(int(np.floor(y1)), 0)
            right, bottom = min(int(np.ceil(x2)), box.width), min(int(np.ceil(y2)), box.height)
            if right <= left or bottom <= top:
                continue
            size = prob.shape[-1]
            pasted = resample(prob, bilinear_axis(bottom - top, size, (top - y1) / (y2 - y1) * size,
                                                  (bottom - y1) / (y2 - y1) * size),
                              bilinear_axis(right - left, size, (left - x1) / (x2 - x1) * size,
                                            (right - x1) / (x2 - x1) * size))
            region = canvas[:, top:bottom, left:right]
            first = ~covered[top:bottom, left:right]
            region[:, first] = pasted[:, first]  # the first box here replaces the outside's background
            region[...] = np.maximum(region, pasted)
            covered[top:bottom, left:right] = True
        return canvas.argmax(0).astype(np.uint8)


def overlay_roi_prediction(image: np.ndarray, box: np.ndarray, pred: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """Pastes a mask-size class map into its box (nearest) and blends class colours at `alpha`."""
    out = image.astype(np.float32).copy()
    height, width = image.shape[:2]
    x1, y1, x2, y2 = box
    xs = np.arange(max(int(np.floor(x1)), 0), min(int(np.ceil(x2)), width))
    ys = np.arange(max(int(np.floor(y1)), 0), min(int(np.ceil(y2)), height))
    if len(xs) and len(ys):
        size = pred.shape[0]
        col = np.clip(((xs + 0.5 - x1) / max(x2 - x1, 1e-6) * size).astype(int), 0, size - 1)
        row = np.clip(((ys + 0.5 - y1) / max(y2 - y1, 1e-6) * size).astype(int), 0, size - 1)
        region = pred[row[:, None], col[None, :]]
        patch = out[ys[0]:ys[-1] + 1, xs[0]:xs[-1] + 1]
        patch[...] = blend(patch, region, PALETTE, np.isin(region, list(OVERLAY_COLOURS)), alpha)
        # Box outline in white so the panel says which person it is about.
        out[ys[0]:ys[-1] + 1, [xs[0], xs[-1]]] = 255
        out[[ys[0], ys[-1]], xs[0]:xs[-1] + 1] = 255
    return out.astype(np.uint8)
