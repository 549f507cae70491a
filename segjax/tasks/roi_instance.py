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

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from segjax import losses, metrics
from segjax.config import ConfigError
from segjax.data import coco, demo, prepare, transforms
from segjax.data.feature_cache import OnnxFeatureExtractor
from segjax.models.roi_head import RoiHumanModel, RoiMaskHead, StrideEightBackbone

log = logging.getLogger("segjax")

CLASS_NAMES = ("background", "this_person", "other_people")
OVERLAY_COLOURS = {1: (255, 0, 0), 2: (0, 0, 255)}  # this person red, other people blue


@dataclass(frozen=True)
class RoiDataConfig:
    train_ann: str = ""  # COCO instances JSON; empty everywhere = the demo dataset
    val_ann: str = ""
    train_img_dir: str = ""
    val_img_dir: str = ""
    image_size: int = 640  # letterboxed square input (the extractor's 640×640)
    max_rois: int = 8  # ROI bucket per image: fixed shapes, no recompiles; larger images are chunked
    mask_size: int = 56  # the head's output size
    jitter: float = 0.1  # training box jitter, fraction of the box size
    flip: bool = True  # random horizontal flip in training (built-in backbone only)
    data_stats: str = ""  # JSON with class weights (tools/prepare_coco_person.py --stats); else computed
    extractor_onnx: str = ""  # frozen ONNX feature extractor N×3×S×S -> N×C×S/8×S/8; empty = built-in
    feature_cache_dir: str = ""  # where extractor features are cached; default beside the run
    demo_root: str = ""  # where the demo dataset is written; default ~/.cache/segjax/demo


@dataclass(frozen=True)
class RoiModelConfig:
    feature_channels: int = 1024  # C of the stride-8 features (backbone output or extractor)
    backbone_widths: tuple[int, ...] = (64, 128, 256)
    backbone_blocks: tuple[int, ...] = (1, 2, 2)
    head_width: int = 256
    head_fine_width: int = 128
    sampling_ratio: int = -1  # RoIAlign points per bin; <= 0 adaptive


@dataclass(frozen=True)
class RoiLossConfig:
    ce_weight: float = 1.0
    dice_weight: float = 1.0


def has_data(data: RoiDataConfig) -> bool:
    return bool(data.train_ann or data.val_ann or data.train_img_dir or data.val_img_dir)


def validate(cfg) -> None:
    data, model = cfg.data, cfg.model
    if data.image_size < 8 or data.image_size % 8:
        raise ConfigError(f"data.image_size must be a positive multiple of 8 (stride-8 features), got {data.image_size}")
    if data.mask_size != 56:
        raise ConfigError(f"data.mask_size must be 56, the ROI head's output size; got {data.mask_size}")
    if data.max_rois < 1:
        raise ConfigError(f"data.max_rois must be >= 1, got {data.max_rois}")
    if not 0 <= data.jitter < 0.5:
        raise ConfigError(f"data.jitter must be within [0, 0.5), got {data.jitter}")
    if len(model.backbone_widths) != 3 or len(model.backbone_blocks) != 3:
        raise ConfigError(f"model.backbone_widths and model.backbone_blocks need 3 stages each (stride 8), got "
                          f"{model.backbone_widths} and {model.backbone_blocks}")
    for key in ("feature_channels", "head_width", "head_fine_width"):
        if getattr(model, key) < 1:
            raise ConfigError(f"model.{key} must be >= 1, got {getattr(model, key)}")


def _resolve_data(data: RoiDataConfig) -> RoiDataConfig:
    if not has_data(data):
        root = Path(data.demo_root) if data.demo_root else demo.default_demo_root() / "coco_person"
        paths = demo.write_coco_person_demo(root)
        log.info("no data paths given: using the demo COCO person dataset at %s", root)
        return dataclasses.replace(data, **{k: str(v) for k, v in paths.items()})
    missing = [k for k in ("train_ann", "val_ann", "train_img_dir", "val_img_dir") if not getattr(data, k)]
    if missing:
        raise ValueError(f"real data needs all of --train_ann --val_ann --train_img_dir --val_img_dir; missing {missing}")
    return data


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


def _train_transform(entry, rng, *, example_fn, features):
    record = example_fn(entry, rng=rng)
    return record if features is None else features(record)


def _val_transform(entry, *, example_fn, features):
    record = example_fn(entry, rng=None)
    return record if features is None else features(record)


class Task:
    class_names = CLASS_NAMES
    best_metric = "miou"
    best_mode = "max"

    def __init__(self, cfg):
        self.cfg = cfg = dataclasses.replace(cfg, data=_resolve_data(cfg.data))
        data = cfg.data
        self.compute_dtype = jnp.bfloat16 if cfg.train.precision == "bf16" else jnp.float32
        self.train_images, skipped = coco.load_person_index(data.train_ann, data.train_img_dir)
        skipped.log(log, f"train annotations {data.train_ann}")
        self.val_images, skipped = coco.load_person_index(data.val_ann, data.val_img_dir)
        skipped.log(log, f"val annotations {data.val_ann}")
        if not self.train_images or not self.val_images:
            raise ValueError(f"no usable person images (train {len(self.train_images)}, val {len(self.val_images)})")
        self.class_weights = self._class_weights()
        self.extractor = None
        if data.extractor_onnx:
            cache = data.feature_cache_dir or str(Path(data.extractor_onnx).with_suffix("")) + f"_features_{data.image_size}"
            self.extractor = OnnxFeatureExtractor(data.extractor_onnx, cache)
            if self.extractor.out_channels not in (None, cfg.model.feature_channels):
                raise ValueError(f"extractor gives {self.extractor.out_channels} channels but "
                                 f"model.feature_channels is {cfg.model.feature_channels}")
            if self.extractor.in_size not in (None, (data.image_size, data.image_size)):
                raise ValueError(f"extractor expects {self.extractor.in_size} input; set data.image_size to match")

    def _class_weights(self) -> np.ndarray:
        data = self.cfg.data
        if data.data_stats:
            stats = prepare.read_stats(data.data_stats)
            log.info("class weights from %s: %s", data.data_stats, stats["class_weights"])
        else:
            stats = prepare.compute_roi_class_stats(self.train_images, mask_size=data.mask_size)
            log.info("class weights computed from %d training ROIs: %s", stats["num_rois"], stats["class_weights"])
        return np.asarray(stats["class_weights"], np.float32)

    # --- model ---
    def torch_weights(self) -> None:
        """No PyTorch original: the head and built-in backbone are trained here."""
        return None

    def build_model(self, rngs: nnx.Rngs) -> RoiHumanModel:
        m = self.cfg.model
        precision = dict(dtype=self.compute_dtype, param_dtype=jnp.float32, rngs=rngs)
        head = RoiMaskHead(m.feature_channels, width=m.head_width, fine_width=m.head_fine_width,
                           num_classes=len(CLASS_NAMES), sampling_ratio=m.sampling_ratio, **precision)
        backbone = None
        if self.extractor is None:
            backbone = StrideEightBackbone(widths=m.backbone_widths, blocks=m.backbone_blocks,
                                           out_channels=m.feature_channels, **precision)
        return RoiHumanModel(head, backbone)

    # --- data ---
    def _transforms(self, train: bool):
        data = self.cfg.data
        example_fn = functools.partial(transforms.make_roi_example, image_size=data.image_size, max_rois=data.max_rois,
                                       mask_size=data.mask_size, jitter=data.jitter,
                                       flip=data.flip and self.extractor is None)
        features = None
        if self.extractor is not None:
            side = -(-data.image_size // 8)
            features = _WithFeatures(self.extractor, (side, side, self.cfg.model.feature_channels), keep_image=not train)
        fn = _train_transform if train else _val_transform
        return functools.partial(fn, example_fn=example_fn, features=features)

    def train_data(self):
        return coco.PersonRoiSource(self.train_images, self.cfg.data.max_rois), self._transforms(train=True)

    def val_data(self):
        return coco.PersonRoiSource(self.val_images, self.cfg.data.max_rois), self._transforms(train=False)

    # --- loss and metrics (inside jit) ---
    def loss_and_sums(self, model: RoiHumanModel, batch: dict):
        if self.extractor is None:
            inputs = batch["image"].astype(self.compute_dtype) / 255.0  # uint8 travels, device normalises
        else:
            inputs = batch["features"].astype(self.compute_dtype)
        rois = batch["rois"]
        num_images, max_rois = rois.shape[:2]
        image_ok = batch["image_ok"] & batch["valid"]
        roi_valid = (batch["roi_valid"] & image_ok[:, None]).reshape(-1)
        batch_index = jnp.broadcast_to(jnp.arange(num_images, dtype=rois.dtype)[:, None, None], (num_images, max_rois, 1))
        rois = jnp.concatenate([batch_index, rois], axis=-1).reshape(-1, 5)
        logits = model(inputs, rois).astype(jnp.float32)
        targets = batch["targets"].reshape(-1, *batch["targets"].shape[2:]).astype(jnp.int32)

        loss_cfg = self.cfg.loss
        ce, _ = losses.weighted_cross_entropy(logits, targets, roi_valid[:, None, None], jnp.asarray(self.class_weights))
        dice = losses.soft_dice_loss(jax.nn.softmax(logits, axis=-1)[..., 1], targets == 1, roi_valid)
        loss = loss_cfg.ce_weight * ce + loss_cfg.dice_weight * dice
        pred = jnp.argmax(logits, axis=-1)
        count = roi_valid.sum()
        sums = {
            "count": count,
            "loss": loss * count,
            "ce": ce * count,
            "dice": dice * count,
            "confusion": metrics.confusion_matrix(targets, pred, len(CLASS_NAMES), roi_valid[:, None, None]),
            "records": batch["valid"].sum(),
            "bad_records": (batch["valid"] & ~batch["image_ok"]).sum(),
        }
        outputs = {"pred": pred.reshape(num_images, max_rois, *pred.shape[1:]).astype(jnp.uint8)}
        return loss, (sums, outputs)

    def summarize(self, sums: dict) -> dict:
        count = max(float(sums["count"]), 1.0)
        out = {name: float(sums[name]) / count for name in ("loss", "ce", "dice")}
        out.update(metrics.summarize_confusion(sums["confusion"], list(CLASS_NAMES)))
        out["rois"] = int(sums["count"])
        return out

    # --- visualisation (host) ---
    def visualize(self, batch: dict, outputs: dict, out_dir: Path, tag: str, limit: int) -> list[Path]:
        """One PNG per image: a panel per person, its predicted mask pasted into its box."""
        if "image" not in batch:
            return []
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for i in np.flatnonzero(batch["valid"] & batch["image_ok"])[:limit]:
            panels = [overlay_roi_prediction(batch["image"][i], batch["rois"][i, r], outputs["pred"][i, r])
                      for r in np.flatnonzero(batch["roi_valid"][i])]
            if panels:
                path = out_dir / f"{tag}_image{int(batch['image_id'][i])}.png"
                Image.fromarray(np.concatenate(panels, axis=1)).save(path)
                written.append(path)
        return written

    # --- export (segjax.export.onnx) ---
    def export_signature(self, variant: str = "default") -> tuple[list[tuple[str, tuple]], list[str]]:
        """The PyTorch original's ONNX interface: "default" is the head alone on stride-8 features
        (`features [N, C, S/8, S/8]`, as the frozen extractor gives them), "end_to_end" the head on
        the built-in backbone (`images [N, 3, S, S]`); both take `rois [K, 5]` and give
        `masks [K, 3, 56, 56]`. S is data.image_size."""
        size = self.cfg.data.image_size
        if variant == "default":
            side = -(-size // 8)
            first = ("features", ("N", self.cfg.model.feature_channels, side, side))
        elif variant == "end_to_end":
            if self.extractor is not None:
                raise ValueError("variant 'end_to_end' needs the built-in backbone, but this model reads features "
                                 f"from the ONNX extractor {self.cfg.data.extractor_onnx}")
            first = ("images", ("N", 3, size, size))
        else:
            raise ValueError(f"unknown export variant {variant!r}; choose one of ['default', 'end_to_end']")
        return [first, ("rois", ("K", 5))], ["masks"]

    def export_forward(self, model: RoiHumanModel, inputs: jax.Array, rois: jax.Array, *,
                       variant: str = "default") -> tuple[jax.Array]:
        """NCHW features (or images in [0, 1] for "end_to_end") and rois -> (masks NCHW,)."""
        x = jnp.moveaxis(inputs, 1, -1)
        masks = model.head(x, rois) if variant == "default" else model(x, rois)
        return (jnp.moveaxis(masks, -1, 1),)


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
        for cls, colour in OVERLAY_COLOURS.items():
            patch[region == cls] = (1 - alpha) * patch[region == cls] + alpha * np.asarray(colour, np.float32)
        # Box outline in white so the panel says which person it is about.
        out[ys[0]:ys[-1] + 1, [xs[0], xs[-1]]] = 255
        out[[ys[0], ys[-1]], xs[0]:xs[-1] + 1] = 255
    return out.astype(np.uint8)
