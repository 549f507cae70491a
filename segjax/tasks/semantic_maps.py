"""Semantic segmentation: one class per pixel (the `voc_resnet` and `coco_semantic` experiments).

Data is the PASCAL VOC layout (`layout="voc"`) or image/mask folders such as those written by
`tools/prepare_coco_semantic.py` (`layout="folders"`). Pixels equal to `ignore_index` (VOC's 255
borders, letterbox padding) count neither in the loss nor in the metrics.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segjax import losses, metrics
from segjax.config import ConfigError, flag
from segjax.data import demo, transforms, voc
from segjax.data.errors import DataError
from segjax.data.files import BadImage
from segjax.data.prepare import load_class_names
from segjax.models.semantic_models import SEMANTIC_MODELS
from segjax.ops.resize import resize_bilinear
from segjax.tasks.base import Letterbox, TaskBase, Transform, class_map

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
    data_root: str = flag("")
    train_img_dir: str = flag("")  # folders layout, explicit directories (instead of data_root)
    train_mask_dir: str = flag("")
    val_img_dir: str = flag("")
    val_mask_dir: str = flag("")
    train_split: str = "train"  # voc: ImageSets/Segmentation/<split>.txt
    val_split: str = "val"
    classes_file: str = ""  # folders: classes.json from the preparation tool; default <root>/train/classes.json
    num_classes: int = 0  # 0 = the class list's length; else it must equal it
    class_names: tuple[str, ...] = ()  # empty = VOC's, the classes file's, else class_0, class_1, ...
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
    name: Literal["resnet18", "resnet34", "resnet50", "unet", "deeplabv3", "fastscnn"] = flag("resnet34", "backbone")
    size: Literal["full", "tiny"] = "full"  # tiny: the same architecture narrowed, for tests and demos


@dataclass(frozen=True)
class SemanticLossConfig:
    ce_weight: float = flag(1.0)
    dice_weight: float = flag(0.0)  # multi-class soft Dice, averaged over classes
    # The cross-entropy term is torch.nn.CrossEntropyLoss(weight=class_weights, label_smoothing=...,
    # ignore_index=data.ignore_index), optionally over mmseg's OHEM pixels only.
    label_smoothing: float = 0.0  # ε in [0, 1): the target is (1 − ε)·onehot + ε/K
    class_weights: tuple[float, ...] = ()  # one weight >= 0 per class; empty = unweighted
    # Fill an empty class_weights by median-frequency balancing of the training labels when the
    # training data are opened (`median_frequency_weights`); the run saves the numbers.
    class_weights_from_data: bool = False
    # mmseg's OHEMPixelSampler(thresh, min_kept): the cross-entropy averages (as above, by class
    # weight) over the valid pixels whose true-class probability is below max(thresh, the
    # (min_kept·batch)-th smallest); 0 = off. (mmseg's CrossEntropyLoss instead divides the kept
    # pixels' sum by the batch's pixel count, or its non-ignored count with avg_non_ignore.)
    ohem_thresh: float = 0.0
    ohem_min_kept: int = 100000  # per image


def _class_names(data: SemanticDataConfig) -> tuple[str, ...]:
    """The data's class list: the config's, VOC's, the prepared classes.json, else numbered."""
    if data.class_names:
        names = data.class_names
    elif data.layout == "voc":
        names = voc.VOC_CLASSES
    elif data.classes_file and Path(data.classes_file).exists():
        names = tuple(load_class_names(data.classes_file))
    elif data.num_classes:
        names = tuple(f"class_{i}" for i in range(data.num_classes))
    else:
        raise ConfigError(f"no class list: {data.classes_file or 'data.classes_file'} does not exist; "
                          "give data.classes_file or data.num_classes")
    if data.num_classes and len(names) != data.num_classes:
        raise ConfigError(f"data.num_classes is {data.num_classes} but the data has {len(names)} classes "
                          f"({', '.join(names[:6])}, ...); set --set data.num_classes={len(names)} or leave it 0")
    return tuple(names)


def _label_counts(path: str, num_classes: int) -> np.ndarray | None:
    """Pixels of each class in one mask (other values, ignore_index among them, not counted);
    None, logged, for an unreadable mask, which training skips too."""
    try:
        return np.bincount(voc.read_mask(path).ravel(), minlength=256)[:num_classes]
    except BadImage as err:
        log.warning("class weights: skipping %s: %s", err.path, err.reason)
        return None


def median_frequency_weights(mask_paths: Sequence[str], num_classes: int) -> np.ndarray:
    """Median-frequency balancing (Eigen & Fergus 2015, as SegNet weights its classes):
    freq_c = pixels of class c / labelled pixels of the masks in which c appears, and
    w_c = median(freq) / freq_c, the median over the classes that appear; a class that never
    appears weighs 0. Masks are read whole, before any augmentation."""
    pixels = np.zeros(num_classes, np.int64)
    image_pixels = np.zeros(num_classes, np.int64)  # labelled pixels of the masks holding each class
    with ThreadPoolExecutor() as pool:  # PNG decoding releases the GIL
        for counts in pool.map(functools.partial(_label_counts, num_classes=num_classes), mask_paths):
            if counts is not None:
                pixels += counts
                image_pixels += np.where(counts > 0, counts.sum(), 0)
    present = pixels > 0
    if not present.any():
        raise DataError(f"class weights: no labelled pixel of classes 0..{num_classes - 1} in "
                        f"{len(mask_paths)} training masks")
    freq = pixels[present] / image_pixels[present]
    weights = np.zeros(num_classes)
    weights[present] = np.median(freq) / freq
    return weights


def _check_class_weights(loss: SemanticLossConfig, num_classes: int) -> None:
    if loss.class_weights and len(loss.class_weights) != num_classes:
        raise ConfigError(f"loss.class_weights needs {num_classes} values (one per class), "
                          f"got {len(loss.class_weights)}")


class Task(TaskBase):
    data_keys = ("data_root", "train_img_dir", "val_img_dir")
    loss_terms = ("loss", "ce")

    def __init__(self, cfg):
        super().__init__(cfg)
        self.class_names = self.cfg.data.class_names
        _check_class_weights(self.cfg.loss, len(self.class_names))  # the class count is known now

    @staticmethod
    def check(cfg) -> None:
        data = cfg.data
        if data.crop_size < 8 or data.eval_size < 8:
            raise ConfigError(f"data.crop_size and data.eval_size must be >= 8, got {data.crop_size}, {data.eval_size}")
        if not 0 < data.scale_min <= data.scale_max:
            raise ConfigError(f"need 0 < data.scale_min <= data.scale_max, got {data.scale_min}, {data.scale_max}")
        if data.num_classes == 1 or data.num_classes < 0:
            raise ConfigError(f"data.num_classes must be >= 2 (or 0: from the class list), got {data.num_classes}")
        if not 0 <= data.ignore_index <= 255 or data.ignore_index < max(data.num_classes, len(data.class_names)):
            raise ConfigError(f"data.ignore_index must be a uint8 value outside the classes, got {data.ignore_index}")
        loss = cfg.loss
        if not 0 <= loss.label_smoothing < 1:
            raise ConfigError(f"loss.label_smoothing must be within [0, 1), got {loss.label_smoothing}")
        if any(w < 0 for w in loss.class_weights) or (loss.class_weights and not any(loss.class_weights)):
            raise ConfigError(f"loss.class_weights must be >= 0, at least one > 0; got {loss.class_weights}")
        if data.num_classes or data.class_names:  # else the class list is read from the data (see __init__)
            _check_class_weights(loss, data.num_classes or len(data.class_names))
        if not 0 <= loss.ohem_thresh <= 1:
            raise ConfigError(f"loss.ohem_thresh must be within [0, 1] (0 = off), got {loss.ohem_thresh}")
        if loss.ohem_min_kept < 0:
            raise ConfigError(f"loss.ohem_min_kept must be >= 0, got {loss.ohem_min_kept}")

    @classmethod
    def resolve(cls, cfg):
        """Also `loss.class_weights_from_data`: the weights computed from the training labels (saved
        with the run, so that evaluate, predict and --resume never read them again)."""
        cfg = super().resolve(cfg)
        if not cfg.loss.class_weights_from_data or cfg.loss.class_weights:
            return cfg
        task = cls(cfg)  # building reads nothing; its data methods read the training list
        pairs = task._pairs("train")
        weights = median_frequency_weights([pair.mask_path for pair in pairs], len(task.class_names))
        log.info("class weights by median frequency of %d training masks: %s", len(pairs),
                 ", ".join(f"{name} {w:.4g}" for name, w in zip(task.class_names, weights)))
        return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, class_weights=tuple(map(float, weights))))

    @classmethod
    def resolve_data(cls, data: SemanticDataConfig) -> SemanticDataConfig:
        """Paths (the demo's when none given) and the class list, recorded in the config."""
        root = Path(data.demo_root) if data.demo_root else demo.default_demo_root()
        if data.layout == "voc" and not data.data_root:
            voc_demo = demo.write_voc_demo(root / "voc")
            log.info("no data paths given: using the demo PASCAL VOC dataset at %s", voc_demo)
            data = dataclasses.replace(data, data_root=str(voc_demo))
        elif data.layout == "folders" and not cls.has_data(data):
            paths = demo.write_coco_semantic_demo(root / "coco_semantic")
            log.info("no data paths given: using the demo COCO semantic dataset prepared at %s",
                     Path(paths["train_masks"]).parent.parent)
            data = dataclasses.replace(data, train_img_dir=paths["train_images"], train_mask_dir=paths["train_masks"],
                                       val_img_dir=paths["val_images"], val_mask_dir=paths["val_masks"],
                                       classes_file=paths["classes"])
        elif data.layout == "folders" and data.data_root:
            base = Path(data.data_root)
            data = dataclasses.replace(
                data, train_img_dir=data.train_img_dir or str(base / "train" / "images"),
                train_mask_dir=data.train_mask_dir or str(base / "train" / "masks"),
                val_img_dir=data.val_img_dir or str(base / "val" / "images"),
                val_mask_dir=data.val_mask_dir or str(base / "val" / "masks"),
                classes_file=data.classes_file or str(base / "train" / "classes.json"))
        names = _class_names(data)
        return dataclasses.replace(data, class_names=names, num_classes=len(names))

    def torch_weights(self) -> tuple[str, str]:
        if self.cfg.model.name not in TORCH_WEIGHTS:
            raise self._unsupported(f"PyTorch original for model {self.cfg.model.name!r} "
                                    f"(importable: {', '.join(TORCH_WEIGHTS)})")
        return TORCH_WEIGHTS[self.cfg.model.name]

    def with_num_classes(self, num_classes: int) -> Task:
        """Numbered classes unless the class list already has `num_classes` names."""
        data = self.cfg.data
        names = data.class_names if len(data.class_names) == num_classes else tuple(
            f"class_{i}" for i in range(num_classes))
        return Task(dataclasses.replace(self.cfg, data=dataclasses.replace(data, num_classes=num_classes,
                                                                           class_names=names)))

    def build_model(self, rngs: nnx.Rngs) -> nnx.Module:
        m = self.cfg.model
        return SEMANTIC_MODELS[m.name](len(self.class_names), size=m.size, dtype=self.compute_dtype,
                                       param_dtype=jnp.float32, rngs=rngs)

    # --- data (opened on first use) ---
    def _pairs(self, split: str) -> list:
        data = self.cfg.data
        if data.overfit_one:  # one image, repeated to fill batches: training drives its loss towards zero
            split = "train"
        if data.layout == "voc":
            pairs = voc.load_voc_split(voc.voc_root(data.data_root), getattr(data, f"{split}_split"))
        else:
            pairs = voc.load_folder_pairs(getattr(data, f"{split}_img_dir"), getattr(data, f"{split}_mask_dir"))
        log.info("%s: %d images, %d classes", split, len(pairs), len(self.class_names))
        return pairs[:1] if data.overfit_one else pairs

    def train_data(self):
        data = self.cfg.data
        pairs = self._pairs("train")
        if data.overfit_one:  # sanity mode trains on the deterministic eval view
            source = voc.SegmentationSource(pairs * self.cfg.train.batch_size)
            return source, Transform(self._eval_example(), fixed=True)
        example = functools.partial(transforms.make_seg_example, crop_size=data.crop_size,
                                    scale=(data.scale_min, data.scale_max), flip=data.flip,
                                    ignore_index=data.ignore_index)
        return voc.SegmentationSource(pairs), Transform(example)

    def _eval_example(self):
        data = self.cfg.data
        return functools.partial(transforms.make_seg_example, eval_size=data.eval_size, ignore_index=data.ignore_index)

    def val_data(self):
        return voc.SegmentationSource(self._pairs("val")), Transform(self._eval_example())

    # --- the evaluation protocol (segjax.engine.inference) ---
    eval_outputs = "logits"

    def eval_size(self) -> tuple[int, int]:
        return (self.cfg.data.eval_size,) * 2

    def val_images(self):
        return voc.SegmentationSource(self._pairs("val")), transforms._read_pair

    def crop_scores(self, outputs, size: tuple[int, int]) -> jax.Array:
        """The logits, at the crops' size."""
        logits = jnp.moveaxis(outputs[0].astype(jnp.float32), 1, -1)
        return jnp.moveaxis(resize_bilinear(logits, size), -1, 1)

    def loss_and_sums(self, model: nnx.Module, batch: dict, key: jax.Array):
        del key  # the loss draws nothing
        data, loss_cfg = self.cfg.data, self.cfg.loss
        num_classes = len(self.class_names)
        logits = model(batch["image"].astype(self.compute_dtype) / 255.0).astype(jnp.float32)
        target = batch["mask"].astype(jnp.int32)
        image_ok = batch["valid"] & batch["image_ok"]
        pixel_ok = (target != data.ignore_index) & image_ok[:, None, None]
        if loss_cfg.class_weights_from_data and not loss_cfg.class_weights:
            raise ConfigError("loss.class_weights_from_data: the class weights are computed when the training data "
                              "are opened (train, --test_only); give loss.class_weights to use them here")
        class_weights = jnp.asarray(loss_cfg.class_weights, jnp.float32) if loss_cfg.class_weights else None
        ce_pixels = pixel_ok
        if loss_cfg.ohem_thresh:
            ce_pixels = losses.ohem_pixel_weight(logits, target, pixel_ok, loss_cfg.ohem_thresh,
                                                 loss_cfg.ohem_min_kept)
        ce, _ = losses.weighted_cross_entropy(logits, target, ce_pixels, class_weights, loss_cfg.label_smoothing)
        loss = loss_cfg.ce_weight * ce
        if loss_cfg.dice_weight:
            # Every (image, class) pair is one Dice item; ignored pixels are removed from both sides.
            probs = jax.nn.softmax(logits, axis=-1) * pixel_ok[..., None]
            onehot = jax.nn.one_hot(target, num_classes) * pixel_ok[..., None]
            items = lambda x: jnp.moveaxis(x, -1, 1).reshape(-1, *x.shape[1:3])  # noqa: E731
            item_ok = jnp.repeat(image_ok, num_classes)
            loss = loss + loss_cfg.dice_weight * losses.soft_dice_loss(items(probs), items(onehot), item_ok)
        pred = jnp.argmax(logits, axis=-1)
        confusion = metrics.confusion_matrix(target, pred, num_classes, pixel_ok)
        sums = self.item_sums(batch, image_ok.sum(), confusion, loss=loss, ce=ce)
        return loss, (sums, {"pred": pred.astype(jnp.uint8)})

    def summarize(self, sums: dict) -> dict:
        out = super().summarize(sums)
        out["dice"] = out["mdice"]
        return out

    def panels(self, batch: dict, outputs: dict, index: int) -> list[np.ndarray]:
        """Image, ground truth and prediction (VOC colours)."""
        palette = voc.voc_palette()
        return [batch["image"][index], palette[batch["mask"][index]], palette[outputs["pred"][index]]]

    # --- export (segjax.export.onnx) ---
    def export_signature(self, variant: str = "default") -> tuple[list[tuple[str, tuple]], list[str]]:
        """`images [B, 3, S, S]` -> `logits [B, classes, S, S]`, S = data.eval_size."""
        self.check_variant(variant)
        size = self.cfg.data.eval_size
        return [("images", ("B", 3, size, size))], ["logits"]

    def export_forward(self, model: nnx.Module, images: jax.Array, *, variant: str = "default") -> tuple[jax.Array]:
        """NCHW images in [0, 1] -> (logits NCHW,)."""
        return (jnp.moveaxis(model(jnp.moveaxis(images, 1, -1)), -1, 1),)

    # --- prediction (segjax.predict) ---
    def postprocess(self, outputs, context: Letterbox) -> np.ndarray:
        """The class of the largest logit, bilinearly resized to the image's size."""
        return class_map(outputs[0][0], context)
