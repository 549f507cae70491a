"""Semantic segmentation: one class per pixel (the `voc_resnet` and `coco_semantic` experiments).

Data is the PASCAL VOC layout (`layout="voc"`) or image/mask folders such as those written by
`tools/prepare_coco_semantic.py` (`layout="folders"`). Pixels equal to `ignore_index` (VOC's 255
borders, letterbox padding) count neither in the loss nor in the metrics.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from segjax import losses, metrics
from segjax.config import ConfigError
from segjax.data import demo, transforms, voc
from segjax.data.prepare import load_class_names
from segjax.models.semantic_models import SEMANTIC_MODELS

log = logging.getLogger("segjax")


# PyTorch originals whose state dicts `--init_from torch:PATH` reads (see segjax.bridge): the
# voc_resnet models take an ImageNet ResNet into their encoder, the others a whole model.
TORCH_WEIGHTS = {
    "resnet18": ("torchvision_resnet", "encoder"),
    "resnet34": ("torchvision_resnet", "encoder"),
    "resnet50": ("torchvision_resnet", "encoder"),
    "unet": ("smp_unet", ""),
    "deeplabv3": ("torchvision_deeplabv3", ""),
}


@dataclass(frozen=True)
class SemanticDataConfig:
    layout: Literal["voc", "folders"] = "voc"
    # voc: a directory holding VOCdevkit/VOC2012 (or VOC2012 itself);
    # folders: a directory holding train/{images,masks} and val/{images,masks}.
    data_root: str = ""
    train_img_dir: str = ""  # folders layout, explicit directories (instead of data_root)
    train_mask_dir: str = ""
    val_img_dir: str = ""
    val_mask_dir: str = ""
    train_split: str = "train"  # voc: ImageSets/Segmentation/<split>.txt
    val_split: str = "val"
    classes_file: str = ""  # folders: classes.json from the preparation tool; default <root>/train/classes.json
    num_classes: int = 21  # must equal the number of class names
    crop_size: int = 224  # training crop
    scale_min: float = 0.9  # training random resize range
    scale_max: float = 1.1
    flip: bool = True
    eval_size: int = 512  # validation images are letterboxed to this square (padding ignored)
    ignore_index: int = 255
    overfit_one: bool = False  # sanity check: train and validate on the first training image only
    demo_root: str = ""  # where demo data is written; default ~/.cache/segjax/demo


@dataclass(frozen=True)
class SemanticModelConfig:
    name: Literal["resnet18", "resnet34", "resnet50", "unet", "deeplabv3", "fastscnn"] = "resnet34"
    size: Literal["full", "tiny"] = "full"  # tiny: the same architecture narrowed, for tests and demos


@dataclass(frozen=True)
class SemanticLossConfig:
    ce_weight: float = 1.0
    dice_weight: float = 0.0  # multi-class soft Dice, averaged over classes


def has_data(data: SemanticDataConfig) -> bool:
    return bool(data.data_root or data.train_img_dir or data.val_img_dir)


def validate(cfg) -> None:
    data = cfg.data
    if data.crop_size < 8 or data.eval_size < 8:
        raise ConfigError(f"data.crop_size and data.eval_size must be >= 8, got {data.crop_size}, {data.eval_size}")
    if not 0 < data.scale_min <= data.scale_max:
        raise ConfigError(f"need 0 < data.scale_min <= data.scale_max, got {data.scale_min}, {data.scale_max}")
    if data.num_classes < 2:
        raise ConfigError(f"data.num_classes must be >= 2, got {data.num_classes}")
    if not 0 <= data.ignore_index <= 255 or data.ignore_index < data.num_classes:
        raise ConfigError(f"data.ignore_index must be a uint8 value outside the classes, got {data.ignore_index}")


def _resolve_data(data: SemanticDataConfig) -> SemanticDataConfig:
    root = Path(data.demo_root) if data.demo_root else demo.default_demo_root()
    if data.layout == "voc":
        if not data.data_root:
            voc = demo.write_voc_demo(root / "voc")
            log.info("no data paths given: using the demo PASCAL VOC dataset at %s", voc)
            return dataclasses.replace(data, data_root=str(voc))
        return data
    if not has_data(data):
        paths = demo.write_coco_semantic_demo(root / "coco_semantic")
        log.info("no data paths given: using the demo COCO semantic dataset prepared at %s", Path(paths["train_masks"]).parent.parent)
        return dataclasses.replace(data, train_img_dir=paths["train_images"], train_mask_dir=paths["train_masks"],
                                   val_img_dir=paths["val_images"], val_mask_dir=paths["val_masks"],
                                   classes_file=paths["classes"])
    if data.data_root:
        base = Path(data.data_root)
        return dataclasses.replace(
            data, train_img_dir=data.train_img_dir or str(base / "train" / "images"),
            train_mask_dir=data.train_mask_dir or str(base / "train" / "masks"),
            val_img_dir=data.val_img_dir or str(base / "val" / "images"),
            val_mask_dir=data.val_mask_dir or str(base / "val" / "masks"),
            classes_file=data.classes_file or str(base / "train" / "classes.json"))
    return data


def _class_names(data: SemanticDataConfig) -> tuple[str, ...]:
    if data.layout == "voc":
        names = voc.VOC_CLASSES
    elif data.classes_file and Path(data.classes_file).exists():
        names = tuple(load_class_names(data.classes_file))
    else:
        names = tuple(f"class_{i}" for i in range(data.num_classes))
    if len(names) != data.num_classes:
        raise ConfigError(f"data.num_classes is {data.num_classes} but the data has {len(names)} classes "
                          f"({', '.join(names[:6])}, ...); set --set data.num_classes={len(names)}")
    return tuple(names)


def _train_transform(pair, rng, *, example_fn):
    return example_fn(pair, rng=rng)


def _eval_transform(pair, *, example_fn):
    return example_fn(pair, rng=None)


def _fixed_transform(pair, rng, *, example_fn):
    del rng  # sanity mode: the same deterministic view every step
    return example_fn(pair, rng=None)


class Task:
    best_metric = "miou"
    best_mode = "max"

    def __init__(self, cfg):
        self.cfg = cfg = dataclasses.replace(cfg, data=_resolve_data(cfg.data))
        data = cfg.data
        self.class_names = _class_names(data)
        self.compute_dtype = jnp.bfloat16 if cfg.train.precision == "bf16" else jnp.float32
        if data.layout == "voc":
            root = voc.voc_root(data.data_root)
            self.train_pairs = voc.load_voc_split(root, data.train_split)
            self.val_pairs = voc.load_voc_split(root, data.val_split)
        else:
            self.train_pairs = voc.load_folder_pairs(data.train_img_dir, data.train_mask_dir)
            self.val_pairs = voc.load_folder_pairs(data.val_img_dir, data.val_mask_dir)
        if data.overfit_one:
            # One image, repeated to fill batches: training should drive its loss towards zero.
            self.train_pairs = [self.train_pairs[0]] * cfg.train.batch_size
            self.val_pairs = self.train_pairs[:1]
        log.info("%d training and %d validation images, %d classes", len(self.train_pairs), len(self.val_pairs),
                 len(self.class_names))

    def torch_weights(self) -> tuple[str, str] | None:
        """(bridge scheme, submodule it fills) for `--init_from torch:PATH`; None if no original."""
        return TORCH_WEIGHTS.get(self.cfg.model.name)

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        m = self.cfg.model
        return SEMANTIC_MODELS[m.name](len(self.class_names), size=m.size, dtype=self.compute_dtype,
                                       param_dtype=jnp.float32, rngs=rngs)

    def _example_fn(self, train: bool):
        data = self.cfg.data
        if not train or data.overfit_one:  # sanity mode trains on the deterministic eval view
            return functools.partial(transforms.make_seg_example, eval_size=data.eval_size,
                                     ignore_index=data.ignore_index)
        return functools.partial(transforms.make_seg_example, crop_size=data.crop_size,
                                 scale=(data.scale_min, data.scale_max), flip=data.flip,
                                 ignore_index=data.ignore_index)

    def train_data(self):
        fn = self._example_fn(train=True)
        transform = _fixed_transform if self.cfg.data.overfit_one else _train_transform
        return voc.SegmentationSource(self.train_pairs), functools.partial(transform, example_fn=fn)

    def val_data(self):
        fn = self._example_fn(train=False)
        return voc.SegmentationSource(self.val_pairs), functools.partial(_eval_transform, example_fn=fn)

    def loss_and_sums(self, model: nnx.Module, batch: dict):
        data, loss_cfg = self.cfg.data, self.cfg.loss
        num_classes = len(self.class_names)
        logits = model(batch["image"].astype(self.compute_dtype) / 255.0).astype(jnp.float32)
        target = batch["mask"].astype(jnp.int32)
        image_ok = batch["valid"] & batch["image_ok"]
        pixel_ok = (target != data.ignore_index) & image_ok[:, None, None]
        ce, _ = losses.weighted_cross_entropy(logits, target, pixel_ok)
        loss = loss_cfg.ce_weight * ce
        if loss_cfg.dice_weight:
            # Every (image, class) pair is one Dice item; ignored pixels are removed from both sides.
            probs = jax.nn.softmax(logits, axis=-1) * pixel_ok[..., None]
            onehot = jax.nn.one_hot(target, num_classes) * pixel_ok[..., None]
            items = lambda x: jnp.moveaxis(x, -1, 1).reshape(-1, *x.shape[1:3])  # noqa: E731
            item_ok = jnp.repeat(image_ok, num_classes)
            loss = loss + loss_cfg.dice_weight * losses.soft_dice_loss(items(probs), items(onehot), item_ok)
        pred = jnp.argmax(logits, axis=-1)
        count = image_ok.sum()
        sums = {
            "count": count,
            "loss": loss * count,
            "ce": ce * count,
            "confusion": metrics.confusion_matrix(target, pred, num_classes, pixel_ok),
            "records": batch["valid"].sum(),
            "bad_records": (batch["valid"] & ~batch["image_ok"]).sum(),
        }
        return loss, (sums, {"pred": pred.astype(jnp.uint8)})

    def summarize(self, sums: dict) -> dict:
        count = max(float(sums["count"]), 1.0)
        out = {"loss": float(sums["loss"]) / count, "ce": float(sums["ce"]) / count}
        out.update(metrics.summarize_confusion(sums["confusion"], list(self.class_names)))
        out["dice"] = out["mdice"]
        out["images"] = int(sums["count"])
        return out

    def visualize(self, batch: dict, outputs: dict, out_dir: Path, tag: str, limit: int) -> list[Path]:
        """`prediction_<tag>_<n>.png`: image, ground truth and prediction side by side (VOC colours)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        palette = voc.voc_palette()
        written = []
        for n, i in enumerate(np.flatnonzero(batch["valid"] & batch["image_ok"])[:limit]):
            panels = [batch["image"][i], palette[batch["mask"][i]], palette[outputs["pred"][i]]]
            path = out_dir / f"prediction_{tag}_{n}.png"
            Image.fromarray(np.concatenate(panels, axis=1).astype(np.uint8)).save(path)
            written.append(path)
        return written

    # --- export (segjax.export.onnx) ---
    def export_signature(self, variant: str = "default") -> tuple[list[tuple[str, tuple]], list[str]]:
        """`images [B, 3, S, S]` -> `logits [B, classes, S, S]`, S = data.eval_size."""
        if variant != "default":
            raise ValueError(f"unknown export variant {variant!r}; choose one of ['default']")
        size = self.cfg.data.eval_size
        return [("images", ("B", 3, size, size))], ["logits"]

    def export_forward(self, model: nnx.Module, images: jax.Array) -> tuple[jax.Array]:
        """NCHW images in [0, 1] -> (logits NCHW,)."""
        return (jnp.moveaxis(model(jnp.moveaxis(images, 1, -1)), -1, 1),)
