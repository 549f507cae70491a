"""Semantic segmentation by a mask-classification model: Mask2Former on road scenes (the
`roadways_mask2former` experiment).

Data are road-scene layouts read by `segjax.data.roads` (IDD / Cityscapes / IDD Lite, or image
and label folders with split lists), optionally restricted to a list file such as the ranked
subset of tools/select_subset.py. Batches are the original collate's: the image as uint8
(normalised on the device), `pixel_mask`, the label map, from which the per-image targets are
made on the device (`losses.semantic_targets`: one mask per class, padded to K with a validity
flag), and at validation the original size and the full-resolution label.

The loss is Mask2Former's set criterion over the final and the auxiliary predictions
(`query_masks.point_criterion`). Metric rule: transformers' semantic post-processing
(`models.mask2former.semantic_scores`: softmax over classes without "no object" × sigmoid
masks), resized per image to its original size, argmax, against the full-resolution label
(255 ignored); mIoU and pixel accuracy over the classes present, per-class IoU by name.

Fine-tuning as the original: `model.train_parts` (default: the transformer decoder with the class
head) are trained; the other parts run in inference mode (no drop-path, BatchNorm statistics
fixed) and the optimizer holds no state for them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segjax import losses, metrics
from segjax.config import ConfigError, flag
from segjax.data import demo, roads, transforms
from segjax.data.demo_roads import prepare_road_demo
from segjax.data.voc import SegmentationSource
from segjax.models import mask2former
from segjax.models.mask2former import MASK2FORMER_VARIANTS, Mask2Former
from segjax.tasks.base import TaskBase, Transform, blend, class_map
from segjax.tasks.query_masks import SetLossConfig, check_set_loss, point_criterion

log = logging.getLogger("segjax")

PARTS = ("backbone", "pixel_decoder", "transformer")  # Mask2Former's submodules; the class head is in transformer
DEMO_PRETRAINED = "pretrained_tiny"  # the demo's random "pretrained" transformers directory, beside its data


@dataclass(frozen=True)
class RoadDataConfig:
    # ROOT holding leftImg8bit/ + gtFine/ (Cityscapes-style) or images/ + labels/ (folders);
    # empty = the road demo, split and ranked by the tools' code.
    data_root: str = flag("")
    layout: Literal["auto", "cityscapes", "folders"] = "auto"
    image_suffix: str = ""  # "" = the layout's default (IDD: _leftImg8bit.png; IDD Lite: set _image.jpg)
    label_suffix: str = ""  # "" = IDD level 3 (_gtFine_labellevel3Ids.png); folders: .png
    classes: str = "idd_level3"  # idd_level3, idd_level1, cityscapes or a classes.json
    label_ids: Literal["train", "cityscapes"] = "train"  # cityscapes: _gtFine_labelIds.png mapped to train ids
    unknown_labels: Literal["error", "ignore"] = "error"  # a value neither class nor 255: stop, or ignore it
    train_split: str = "train"  # leftImg8bit/{split}/, or the folder layout's splits/{split}.txt
    val_split: str = "val"
    # A list file of image paths relative to data_root (e.g. select_subset's subset.txt), instead of the split.
    train_list: str = ""
    val_list: str = ""
    crop: tuple[int, ...] = (384, 384)  # training crop (h, w)
    base_height: int = 384  # training images are resized to this height × a random scale; 0 = their own
    scale_min: float = 0.5
    scale_max: float = 2.0
    flip: bool = True
    eval_size: tuple[int, ...] = (384, 384)  # model input (h, w) at validation and export (HF's 384×384)
    workers: int = 0  # threads reading the labels when the data are opened; 0 = one per core (up to 16)
    demo_root: str = ""  # where the demo is written; default ~/.cache/segjax/demo
    class_names: tuple[str, ...] = ()  # resolved from `classes`, saved with the run
    class_colours: tuple[int, ...] = ()  # r, g, b per class, flattened (overlays)


@dataclass(frozen=True)
class Mask2FormerModelConfig:
    size: Literal[tuple(MASK2FORMER_VARIANTS)] = "full"  # models.mask2former.MASK2FORMER_VARIANTS
    num_queries: int | None = None  # None = the size's (or the transformers config's)
    # A transformers config.json (text) the model is built from instead of `size`: set from
    # `--init_from hf:DIR`, saved with the run so that the run alone rebuilds the model.
    hf_config: str = ""
    train_parts: tuple[str, ...] = ("transformer",)  # of PARTS; the others are frozen


@dataclass(frozen=True)
class Mask2FormerLossConfig(SetLossConfig):
    num_points: int = 12544  # Mask2Former's; required (> 0) here


def _demo_root(data: RoadDataConfig) -> Path:
    return (Path(data.demo_root) if data.demo_root else demo.default_demo_root()) / "roads"


def _hf_path(init_from: str) -> str:
    return init_from.removeprefix("hf:") if init_from.startswith("hf:") else ""


def _read_hf_config(path: str) -> str:
    """config.json of a transformers directory, checked to describe a Mask2Former segjax builds."""
    from segjax.bridge.hf_mask2former import model_kwargs

    file = Path(path) / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: no config.json")
    text = file.read_text()
    try:
        config = json.loads(text)
        if config.get("model_type") != "mask2former":
            raise ValueError(f"it is a {config.get('model_type')!r} model, not 'mask2former'")
        model_kwargs(config)
    except ValueError as e:
        raise ConfigError(f"{file}: {e}") from None
    return text


def write_demo_pretrained(path: Path, num_classes: int = 19) -> Path:
    """A tiny random Mask2Former as a transformers directory: the demo's "pretrained" start. Its
    19 classes (Cityscapes') differ from the task's, so the class head is re-initialised as with a
    real checkpoint."""
    from segjax.bridge.hf_mask2former import save_hf_mask2former

    kwargs = MASK2FORMER_VARIANTS["tiny"]
    params = {"classes": num_classes, "model": json.loads(json.dumps(kwargs))}
    model = []  # built only when written

    def write():
        model.append(nnx.jit(lambda: Mask2Former(num_classes, **kwargs, rngs=nnx.Rngs(1234)))())
        save_hf_mask2former(model[0], path)

    path.mkdir(parents=True, exist_ok=True)
    demo.cached_demo(path, "mask2former_tiny", 1, params, [path / "config.json", path / "model.safetensors"], write)
    return path


class Task(TaskBase):
    data_keys = ("data_root",)
    loss_terms = ("loss", "loss_class", "loss_mask", "loss_dice")
    export_variants = tuple(mask2former.EXPORT_OUTPUTS)

    def __init__(self, cfg):
        super().__init__(cfg)
        self.class_names = self.cfg.data.class_names
        self._palette = np.zeros((256, 3), np.uint8)
        self._palette[:len(self.class_names)] = np.reshape(self.cfg.data.class_colours, (-1, 3))
        self.trainable = nnx.All(nnx.Param, nnx.Any(*(nnx.PathContains(p) for p in self.cfg.model.train_parts)))
        self._scans: dict[str, roads.LabelScan] = {}

    @staticmethod
    def check(cfg) -> None:
        data, model = cfg.data, cfg.model
        if len(data.crop) != 2 or len(data.eval_size) != 2 or min(*data.crop, *data.eval_size) < 32:
            raise ConfigError(f"data.crop and data.eval_size are (height, width), each >= 32 (the stride-32 "
                              f"level), got {data.crop}, {data.eval_size}")
        if not 0 < data.scale_min <= data.scale_max or data.base_height < 0:
            raise ConfigError(f"need 0 < data.scale_min <= data.scale_max and data.base_height >= 0, got "
                              f"{data.scale_min}, {data.scale_max}, {data.base_height}")
        if not model.train_parts or set(model.train_parts) - set(PARTS):
            raise ConfigError(f"model.train_parts must name some of {list(PARTS)}, got {list(model.train_parts)}")
        if model.num_queries is not None and model.num_queries < 1:
            raise ConfigError(f"model.num_queries must be >= 1, got {model.num_queries}")
        check_set_loss(cfg.loss)
        if cfg.loss.num_points < 1:
            raise ConfigError(f"loss.num_points must be >= 1 (Mask2Former's point-sampled loss), got "
                              f"{cfg.loss.num_points}")

    @classmethod
    def resolve(cls, cfg):
        """Also the architecture of `--init_from hf:DIR` (its config.json, saved with the run), the
        demo's tiny "pretrained" directory written first when that is the start."""
        cfg = super().resolve(cfg)
        hf_dir = _hf_path(cfg.train.init_from)
        if hf_dir and Path(hf_dir) == _demo_root(cfg.data) / DEMO_PRETRAINED:
            write_demo_pretrained(Path(hf_dir))
        if hf_dir and not cfg.model.hf_config:  # the architecture is the checkpoint's
            cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, hf_config=_read_hf_config(hf_dir)))
        return cfg

    @classmethod
    def resolve_data(cls, data: RoadDataConfig) -> RoadDataConfig:
        """The class set (names and colours, saved with the run) and, without data_root, the road
        demo through the split and subset tools' code (its ranked subset is the training list)."""
        if not data.class_names:
            classes = roads.load_class_set(data.classes)
            data = dataclasses.replace(data, class_names=classes.names,
                                       class_colours=tuple(int(v) for c in classes.colours for v in c))
        if not data.data_root:
            root = _demo_root(data)
            lists = prepare_road_demo(root)
            log.info("no data given: using the road demo at %s (training list: its ranked subset %s)",
                     root, lists["train"])
            data = dataclasses.replace(data, data_root=str(root), train_list=lists["train"], val_list=lists["val"])
        return data

    # --- model ---
    def model_kwargs(self) -> dict:
        model = self.cfg.model
        if model.hf_config:
            from segjax.bridge.hf_mask2former import model_kwargs

            kwargs = model_kwargs(json.loads(model.hf_config))[1]
        else:
            kwargs = dict(MASK2FORMER_VARIANTS[model.size])
        if model.num_queries is not None:
            kwargs["num_queries"] = model.num_queries
        return kwargs

    def build_model(self, rngs: nnx.Rngs) -> Mask2Former:
        model = Mask2Former(len(self.class_names), **self.model_kwargs(), dtype=self.compute_dtype,
                            param_dtype=jnp.float32, rngs=rngs)
        for part in PARTS:
            if part not in self.cfg.model.train_parts:
                getattr(model, part).eval()  # frozen: no drop-path, BatchNorm statistics fixed
        return model

    def load_hf_weights(self, model: Mask2Former, path: str) -> None:
        """A transformers directory's weights into `model`; a different class count keeps the
        model's fresh class head (transformers' `ignore_mismatched_sizes`), with a notice."""
        from segjax.bridge.hf_mask2former import import_hf_state_dict, model_kwargs, read_hf_dir

        config, state_dict = read_hf_dir(path)
        num_classes, _, names = model_kwargs(config)
        reinit = num_classes != len(self.class_names)
        if reinit:
            log.warning("%s has %d classes (%s, ...), this model %d: the class head is re-initialised",
                        path, num_classes, ", ".join(names[:3]), len(self.class_names))
        try:
            import_hf_state_dict(model, state_dict, reinit_class_head=reinit)
        except ValueError as e:
            raise ConfigError(f"{path}: {e}") from None
        log.info("initialised the model from the transformers directory %s", path)

    def hf_model(self, path: str) -> tuple[Task, Mask2Former]:
        """(task, model) of a transformers directory as it is: its architecture, classes and weights."""
        from segjax.bridge.hf_mask2former import model_kwargs

        text = _read_hf_config(path)
        names = tuple(model_kwargs(json.loads(text))[2])
        data = dataclasses.replace(self.cfg.data, class_names=names,
                                   class_colours=tuple(v for c in roads.spread_colours(len(names)) for v in c))
        task = Task(dataclasses.replace(self.cfg, data=data,
                                        model=dataclasses.replace(self.cfg.model, hf_config=text)))
        model = nnx.jit(lambda: task.build_model(nnx.Rngs(0)))()
        task.load_hf_weights(model, path)
        return task, model

    # --- data (read when opened) ---
    def _scan(self, split: str) -> roads.LabelScan:
        if split not in self._scans:
            data = self.cfg.data
            self._scans[split] = roads.load_road_data(
                data.data_root, layout=roads.RoadLayout(data.layout, data.image_suffix, data.label_suffix),
                split=getattr(data, f"{split}_split"), list_file=getattr(data, f"{split}_list"),
                num_classes=len(self.class_names), label_ids=data.label_ids, unknown=data.unknown_labels,
                workers=data.workers, progress=True)
        return self._scans[split]

    def _lut(self) -> np.ndarray:
        return roads.label_lut(len(self.class_names), self.cfg.data.label_ids)

    def train_data(self):
        data = self.cfg.data
        example = functools.partial(transforms.make_train_example, lut=self._lut(), crop=tuple(data.crop),
                                    base_height=data.base_height, scale=(data.scale_min, data.scale_max),
                                    flip=data.flip)
        return SegmentationSource(self._scan("train").pairs), Transform(example)

    def val_data(self):
        scan = self._scan("val")
        # Labels sit top-left in one canvas of the largest size, so full-resolution batches are static.
        example = functools.partial(transforms.make_eval_example, lut=self._lut(), size=tuple(self.cfg.data.eval_size),
                                    full_size=tuple(int(v) for v in scan.sizes.max(0)))
        return SegmentationSource(scan.pairs), Transform(example)

    # --- the evaluation protocol (segjax.engine.inference) ---
    eval_outputs = "probabilities"  # semantic scores: softmax classes x sigmoid masks, not logits

    def eval_size(self) -> tuple[int, int]:
        return tuple(self.cfg.data.eval_size)

    def val_images(self):
        return SegmentationSource(self._scan("val").pairs), functools.partial(transforms._read_pair, lut=self._lut())

    def crop_scores(self, outputs, size: tuple[int, int]) -> jax.Array:
        """transformers' semantic inference of each crop (`semantic_scores`, the mask logits
        upsampled to the crop's size first, as mmseg's Mask2FormerHead.predict), NCHW."""
        return jnp.moveaxis(mask2former.semantic_scores(jnp.asarray(outputs[0]), jnp.asarray(outputs[1]), size), -1, 1)

    # --- loss and metrics (inside jit) ---
    def loss_and_sums(self, model: Mask2Former, batch: dict, key: jax.Array):
        num_classes = len(self.class_names)
        out = model(batch["image"].astype(self.compute_dtype) / 255.0)  # uint8 travels, device normalises
        sets = [(o["class_queries_logits"], o["masks_queries_logits"]) for o in (out, *out["auxiliary_logits"])]
        image_ok = batch["valid"] & batch["image_ok"]
        target_masks, target_classes, target_valid = losses.semantic_targets(batch["mask"], num_classes)
        loss, parts = point_criterion(self.cfg.loss)(sets, target_masks, target_classes, target_valid, key,
                                                     image_weight=image_ok)
        class_logits, mask_logits = sets[0]
        pred = mask2former.semantic_segmentation(class_logits, mask_logits, batch["mask"].shape[1:])
        if "mask_full" in batch:  # validation: at each image's original size
            target, full = batch["mask_full"], full_resolution(class_logits, mask_logits, batch["orig_size"],
                                                               batch["mask_full"].shape[1:])
        else:
            target, full = batch["mask"], pred
        confusion = metrics.confusion_matrix(target, full, num_classes, image_ok[:, None, None])
        sums = self.item_sums(batch, image_ok.sum(), confusion, loss=loss, **{
            name: parts[name] for name in self.loss_terms[1:]})
        return loss, (sums, {"pred": pred.astype(jnp.uint8)})

    def summarize(self, sums: dict) -> dict:
        out = super().summarize(sums)
        if out["absent_classes"]:
            # Not in mIoU (as every class without a pixel in the data or the predictions).
            out["num_absent_classes"] = len(out["absent_classes"])
        return out

    def panels(self, batch: dict, outputs: dict, index: int) -> list[np.ndarray]:
        """Image | ground truth | prediction, in the class colours, at the model's input size."""
        image = batch["image"][index]
        return [image, blend(image, batch["mask"][index], self._palette),
                blend(image, outputs["pred"][index], self._palette)]

    def palette(self) -> np.ndarray:
        """The class set's colours."""
        return self._palette

    # --- export and prediction ---
    def export_signature(self, variant: str = "default") -> tuple[list[tuple[str, tuple]], list[str]]:
        """`images [B, 3, H, W]` (data.eval_size) -> transformers' outputs, or `segmentation`."""
        self.check_variant(variant)
        return [("images", ("B", 3, *self.cfg.data.eval_size))], list(mask2former.EXPORT_OUTPUTS[variant])

    def export_forward(self, model: Mask2Former, images: jax.Array, *, variant: str = "default") -> tuple:
        return mask2former.export_forward(model, images, variant=variant)

    def postprocess(self, outputs, context) -> np.ndarray:
        """transformers' semantic scores (as validation) of the letterboxed image, cropped to it and
        bilinearly resized to its own size, argmax (segjax.predict's letterbox and class_map)."""
        scores = mask2former.semantic_scores(jnp.asarray(outputs[0]), jnp.asarray(outputs[1]))
        return class_map(np.moveaxis(np.asarray(scores[0]), -1, 0), context)


def full_resolution(class_logits: jax.Array, mask_logits: jax.Array, sizes: jax.Array,
                    canvas: tuple[int, int]) -> jax.Array:
    """Class per pixel [B, *canvas]: each image's `semantic_scores` bilinearly resized
    (align_corners False, no antialiasing, as torch's interpolate) to its own size `sizes[i]`
    (h, w), top-left in the canvas, then argmax (as transformers' post-processing per target
    size). Beyond an image's size the canvas holds no label (ignore)."""
    scores = mask2former.semantic_scores(class_logits, mask_logits)

    def one(args):
        image_scores, size = args
        scale = jnp.maximum(size, 1).astype(jnp.float32) / jnp.asarray(image_scores.shape[:2], jnp.float32)
        resized = jax.image.scale_and_translate(image_scores, (*canvas, image_scores.shape[-1]), (0, 1), scale,
                                                jnp.zeros(2, jnp.float32), method="linear", antialias=False)
        return jnp.argmax(resized, axis=-1)

    return jax.lax.map(one, (scores, sizes))  # one image at a time: [H, W, K] scores at full-HD are large
