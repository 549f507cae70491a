"""Training parity with PyTorch: the same steps in segjax and in the PyTorch original, side by side.

python tools/parity.py --experiment E [--steps N] [--set KEY=VALUE ...] [--tolerance T]
    [--update_tolerance U] [--control "KEY=VALUE [KEY=VALUE ...]" ...] [--json out.json]

Builds the experiment's model in segjax (its task and `segjax.engine.setup.build_state`, so the real
optimizer, schedule, clipping, accumulation, parameter groups and EMA of segjax's config) and its PyTorch
original (torchvision / smp / transformers, or a port of tools/torch_ports.py), copies segjax's
initial weights into it through the bridge (segjax.bridge, `load_state_dict`: every tensor filled),
and trains both on the same N seeded batches (block label maps, images coloured by class; no
augmentation, dropout and drop-path off) with segjax's real jitted train step on one side and
torch.optim / torch.optim.lr_scheduler built from the same config on the other. Prints per step both
losses and the largest relative differences over every parameter and BatchNorm running statistic
(and the EMA weights with optim.ema_decay > 0), in PyTorch's names (`differences`):
  param rel   max|segjax − torch| / the tensor's scale (at least 1 for tensors that start at zero)
  update rel  max|segjax − torch| / the tensor's movement since step 0: how far the training
              updates themselves agree (a missing weight-decay term shows here, not in param rel)
  control k   the update rel of a PyTorch twin trained with --control's overrides: what the option
              changes, to compare with the update rel (an option the comparison resolves lands far above)
Exit 1 when the last step's param rel exceeds --tolerance (default 1e-4) or an update rel exceeds
--update_tolerance (when given), 2 on bad input.

Experiments: voc_resnet (EncoderDecoder port on torchvision's ResNet), coco_semantic (smp U-Net),
roi_human (the ROI head on stride-8 features: RoiMaskHead port), roadways_mask2former (transformers'
Mask2Former and its loss, segjax's sampled points injected into torch.rand). Each starts from
`PARITY_DEFAULTS` (tiny inputs, every part trained); --set overrides any config key. The schedule
spans the run: train.epochs epochs of steps / train.epochs steps.
"""

import argparse
import dataclasses
import json
import re
import sys
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Tiny runs each experiment's original can take (torchvision's ResNets and smp's encoder have fixed
# widths, so the semantic models keep theirs on small inputs). The user's --set come after these.
PARITY_DEFAULTS = {
    "voc_resnet": ["model.name=resnet18", "data.crop_size=64", "train.batch_size=2", "train.epochs=1"],
    "coco_semantic": ["model.name=unet", "data.crop_size=64", "train.batch_size=2", "train.epochs=1"],
    # The head alone on extractor features (the placeholder extractor is never opened).
    "roi_human": ["model.size=tiny", "data.image_size=64", "data.max_rois=2", "data.extractor_onnx=parity",
                  "data.class_weights=1,1,1", "train.batch_size=2", "train.epochs=1"],
    "roadways_mask2former": ["model.size=tiny", "data.classes=idd_level1", "data.crop=64,64",
                             "model.train_parts=backbone,pixel_decoder,transformer", "loss.num_points=64",
                             "train.init_from=", "train.batch_size=2", "train.epochs=1"],
}


def torch_reference() -> types.SimpleNamespace:
    """torch, torchvision (pure-Python models; its compiled ops are stubbed, see STACK_NOTES), smp,
    transformers and the ports."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import segmentation_models_pytorch
    import torch
    import torchvision

    sys.path.insert(0, str(Path(__file__).parent))
    import torch_ports
    return types.SimpleNamespace(torch=torch, torchvision=torchvision, smp=segmentation_models_pytorch,
                                 ports=torch_ports)


# --- the PyTorch side of each experiment ---------------------------------------------------------------

@dataclasses.dataclass
class Original:
    """A PyTorch original holding segjax's weights: `net`, segjax's weights in its names
    (`export(model)`), the segjax parameter path of each of its keys (`path_of`), its loss on a numpy
    batch (`loss(batch, step)`)."""

    net: object
    export: Callable
    path_of: Callable[[str], str | None]
    loss: Callable
    weights: Callable | None = None  # its weights in `export`'s names (default: its state dict's floats)


def _scheme_paths(scheme) -> Callable[[str], str | None]:
    """segjax parameter path ("encoder/layer1/0/conv1/kernel") of a PyTorch key, by the bridge's scheme."""

    def path_of(key: str) -> str | None:
        found = scheme.target_of(key)
        return found[0].replace(".", "/") if found else None

    return path_of


def _load(ref, net, state: dict, allowed_missing: str = r".*num_batches_tracked") -> None:
    """segjax's weights into `net`: every key used, every tensor filled but counters (and
    `allowed_missing`, buffers segjax does not keep)."""
    result = net.load_state_dict({k: ref.torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=False)
    missing = [k for k in result.missing_keys if not re.fullmatch(allowed_missing, k)]
    if missing or result.unexpected_keys:
        raise ValueError(f"segjax's weights do not fill the PyTorch model: missing {missing}, "
                         f"unexpected {result.unexpected_keys}")


def _images(ref, batch: dict):
    """The batch's uint8 NHWC images as the float NCHW [0, 1] input both models see."""
    return ref.torch.from_numpy(batch["image"].transpose(0, 3, 1, 2).astype(np.float32) / 255.0)


def _pixel_loss(ref, logits, batch: dict, task):
    """segjax's semantic loss (semantic_maps.Task.loss_and_sums) as torch computes it: cross-entropy
    over the non-ignored pixels, class weights and label smoothing as torch.nn.functional.cross_entropy."""
    loss_cfg, data = task.cfg.loss, task.cfg.data
    if getattr(loss_cfg, "dice_weight", 0) or getattr(loss_cfg, "ohem_thresh", 0) > 0:
        raise ValueError("parity covers the cross-entropy terms only: set loss.dice_weight=0 and loss.ohem_thresh=0")
    weights = getattr(loss_cfg, "class_weights", ())
    weights = ref.torch.tensor(weights, dtype=ref.torch.float32) if weights else None
    target = ref.torch.from_numpy(batch["mask"].astype(np.int64))
    ce = ref.torch.nn.functional.cross_entropy(logits, target, weight=weights, ignore_index=data.ignore_index,
                                               label_smoothing=getattr(loss_cfg, "label_smoothing", 0.0))
    return loss_cfg.ce_weight * ce


def _decoder_scheme():
    """segjax.models.encoder_decoder <-> torch_ports.EncoderDecoder: torchvision's ResNet encoder and
    the decoder (UpConv2x kernels [2, 2, in, out] are ConvTranspose2d's [in, out, 2, 2])."""
    from segjax.bridge import schemes as s

    rules = (*s.prefixed(s.RESNET, "encoder."),
             s.Rule("up{I}.up.weight", "up{I}.up.kernel", (2, 3, 0, 1)), s.Rule("up{I}.up.bias", "up{I}.up.bias"),
             *s.batch_norm("up{I}.bn", "up{I}.bn"), *s.conv_norm("fuse.0", "fuse.1", "fuse"),
             *s.conv("classifier", "classifier", bias=True))
    return s.Scheme(rules, ignored=(s.NUM_BATCHES_TRACKED,))


def semantic_original(ref, task, model) -> Original:
    from segjax.bridge import SCHEMES, to_torch_state_dict

    name = task.cfg.model.name
    classes = len(task.class_names)
    if name.startswith("resnet"):
        net, scheme = ref.ports.EncoderDecoder(getattr(ref.torchvision.models, name)(), classes), _decoder_scheme()
    elif name == "unet":
        net = ref.ports.Normalized(ref.smp.Unet("resnet34", encoder_weights=None, classes=classes))
        scheme = SCHEMES["smp_unet"]
    else:
        raise ValueError(f"parity has no PyTorch original for model.name={name!r}; choose resnet18/34/50 or unet")
    inner = net.net if name == "unet" else net

    def export(m):
        return to_torch_state_dict(m, scheme)

    _load(ref, inner, export(model))
    return Original(net, lambda m: {("net." if name == "unet" else "") + k: v for k, v in export(m).items()},
                    lambda key: _scheme_paths(scheme)(key.removeprefix("net.")),
                    lambda batch, step: _pixel_loss(ref, net(_images(ref, batch)), batch, task))


def block_labels(rng: np.random.Generator, n: int, size: tuple[int, int], classes: int, ignore: int) -> np.ndarray:
    """Label maps of 4×4 blocks, every class present where there is room, some pixels ignored."""
    h, w = size
    blocks = np.stack([rng.permutation(np.arange(16) % classes).reshape(4, 4) for _ in range(n)])
    labels = blocks.repeat(-(-h // 4), 1).repeat(-(-w // 4), 2)[:, :h, :w].astype(np.uint8)
    labels[rng.uniform(size=labels.shape) < 0.02] = ignore
    return labels


def block_images(rng: np.random.Generator, labels: np.ndarray, classes: int) -> np.ndarray:
    """uint8 images whose colour says the class (a colour per class, plus noise): a learnable task,
    whose gradients do not cancel to rounding noise as random labels' do."""
    colours = np.random.default_rng(classes).integers(0, 256, (256, 3))
    noise = rng.normal(0, 24, (*labels.shape, 3))
    return np.clip(colours[labels] + noise, 0, 255).astype(np.uint8)


def semantic_batches(task, count: int, rng: np.random.Generator) -> list[dict]:
    """Block label maps at the training crop and images whose colours follow them."""
    cfg, n = task.cfg, task.cfg.train.batch_size
    size, classes = cfg.data.crop_size, len(task.class_names)
    out = []
    for _ in range(count):
        mask = block_labels(rng, n, (size, size), classes, cfg.data.ignore_index)
        out.append({"image": block_images(rng, mask, classes), "mask": mask,
                    "valid": np.ones(n, bool), "image_ok": np.ones(n, bool)})
    return out


def _roi_scheme():
    """segjax.models.roi_head.RoiMaskHead <-> torch_ports.RoiMaskHead."""
    from segjax.bridge import schemes as s

    def conv_ln(source, target):
        return (*s.conv(source + ".0", target + ".conv", bias=True), *s.layer_norm(source + ".1", target + ".norm"))

    rules = (*conv_ln("reduce", "reduce"), *conv_ln("blocks.{B}.conv{C}", "blocks.{B}.conv{C}"),
             *(r for up in ("up_coarse", "up_fine") for r in (
                 s.Rule(f"{up}.weight", f"{up}.kernel", (2, 3, 0, 1)), s.Rule(f"{up}.bias", f"{up}.bias"))),
             *conv_ln("refine_coarse", "refine_coarse"), *conv_ln("refine_fine", "refine_fine"),
             *conv_ln("fuse", "fuse"), *s.conv("down", "down", bias=True),
             *s.conv("classifier", "classifier", bias=True))
    return s.Scheme(rules)


def roi_original(ref, task, model) -> Original:
    from segjax.bridge import to_torch_state_dict
    from segjax.models.roi_head import SIZES
    from segjax.tasks.base import sized

    if model.backbone is not None:
        raise ValueError("parity trains the ROI head on features: set data.extractor_onnx (any name; not opened)")
    sizes = sized(task.cfg.model, SIZES)
    net = ref.ports.RoiMaskHead(sizes["feature_channels"], sizes["head_width"], sizes["head_fine_width"],
                                len(task.class_names))
    scheme = _roi_scheme()

    def export(m):
        return to_torch_state_dict(m.head, scheme)

    _load(ref, net, export(model))
    torch, F = ref.torch, ref.torch.nn.functional
    weights = torch.tensor(task.cfg.data.class_weights, dtype=torch.float32)

    def loss(batch, step):
        features = torch.from_numpy(batch["features"].transpose(0, 3, 1, 2).copy())
        logits = net(features, torch.from_numpy(batch["rois"]))
        valid = torch.from_numpy((batch["roi_valid"] & (batch["valid"] & batch["image_ok"])[:, None]).reshape(-1))
        targets = torch.from_numpy(batch["targets"].reshape(-1, *batch["targets"].shape[2:]).astype(np.int64))
        ce = F.cross_entropy(logits, torch.where(valid[:, None, None], targets, -100), weight=weights)
        # soft Dice of "this person" per ROI, smoothing 1, over the valid ROIs (segjax.losses.soft_dice_loss)
        probs, person = logits.softmax(1)[:, 1], (targets == 1).float()
        dice = 1 - (2 * (probs * person).sum((1, 2)) + 1) / (probs.sum((1, 2)) + person.sum((1, 2)) + 1)
        dice = (dice * valid).sum() / valid.sum().clamp(min=1)
        return task.cfg.loss.ce_weight * ce + task.cfg.loss.dice_weight * dice

    return Original(net, export, lambda key: "head/" + _scheme_paths(scheme)(key), loss)


def roi_batches(task, count: int, rng: np.random.Generator) -> list[dict]:
    """Random stride-8 features and boxes, the last ROI of each image padding; random 3-class targets."""
    data, n = task.cfg.data, task.cfg.train.batch_size
    side, rois = -(-data.image_size // 8), data.max_rois
    out = []
    for _ in range(count):
        x1y1 = rng.uniform(0, data.image_size * 0.6, (n, rois, 2))
        boxes = np.concatenate([x1y1, np.minimum(x1y1 + rng.uniform(8, data.image_size * 0.4, (n, rois, 2)),
                                                 data.image_size)], -1).astype(np.float32)
        roi_valid = np.ones((n, rois), bool)
        roi_valid[:, -1] = rois == 1
        out.append({"features": rng.standard_normal((n, side, side, task.feature_channels), dtype=np.float32),
                    "rois": boxes, "roi_valid": roi_valid,
                    "targets": rng.integers(0, 3, (n, rois, data.mask_size, data.mask_size)).astype(np.uint8),
                    "valid": np.ones(n, bool), "image_ok": np.ones(n, bool)})
    return out


def mask2former_original(ref, task, model) -> Original:
    """transformers' Mask2FormerForUniversalSegmentation with segjax's weights (hf_state_dict) and its own
    loss, the sampled points of segjax's step injected into torch.rand in transformers' order."""
    import jax
    import jax.numpy as jnp
    import transformers
    from flax import nnx

    from segjax import losses
    from segjax.bridge.hf_mask2former import (
        SCHEMES,
        _split_fused,
        hf_config,
        hf_state_dict,
        import_hf_state_dict,
        save_hf_mask2former,
    )
    from segjax.tasks.query_masks import point_criterion

    cfg, torch = task.cfg, ref.torch
    loss_cfg = cfg.loss
    config = hf_config(model.num_classes, model.arguments)
    config["backbone_config"]["drop_path_rate"] = 0.0  # segjax's Swin default; transformers' is 0.1
    config.update(no_object_weight=loss_cfg.no_object_weight, class_weight=loss_cfg.class_weight,
                  mask_weight=loss_cfg.mask_weight, dice_weight=loss_cfg.dice_weight,
                  train_num_points=loss_cfg.num_points, oversample_ratio=loss_cfg.oversample_ratio,
                  importance_sample_ratio=loss_cfg.importance_sample_ratio)
    with tempfile.TemporaryDirectory() as tmp:  # transformers renames the on-disk keys as it loads them
        save_hf_mask2former(model, tmp, config=config)
        net = transformers.Mask2FormerForUniversalSegmentation.from_pretrained(tmp)
    scheme = SCHEMES["swin" if hasattr(model.backbone, "stages") else "resnet"]
    template = nnx.clone(model)

    def export(m):
        return hf_state_dict(m, loss_cfg.no_object_weight)

    def weights():
        """transformers' weights in its on-disk names, through segjax's import (either naming)."""
        import_hf_state_dict(template, {k: v.detach().numpy() for k, v in net.state_dict().items()})
        return export(template)

    criterion = point_criterion(loss_cfg)
    num_classes = len(task.class_names)

    @jax.jit
    def segjax_points(model_state, batch, key):
        """The points segjax's step draws from `key` and its matches of each prediction set."""
        m = nnx.merge(model_def[0], model_state)
        out = m(batch["image"].astype(jnp.float32) / 255.0)
        sets = [(o["class_queries_logits"], o["masks_queries_logits"]) for o in (out, *out["auxiliary_logits"])]
        masks, classes, valid = losses.semantic_targets(batch["mask"], num_classes)
        valid = valid & (batch["valid"] & batch["image_ok"])[:, None]
        pairs = min(sets[0][0].shape[1], masks.shape[1])
        points = [criterion.draw_points(k, masks.shape[0], pairs) for k in jax.random.split(key, len(sets))]
        matches = [criterion.match(*s, masks, classes, valid, p[0]) for s, p in zip(sets, points)]
        return points, matches

    model_def = []  # set by `bind`: the graph of the segjax model whose state is probed

    def loss(batch, step, probe):
        points, matches = jax.device_get(segjax_points(probe.model_state, probe.batch, probe.key))
        queue = []
        for (match_points, oversampled, fresh), (rows, _, ok) in zip(points, matches):
            # transformers: per image torch.rand(1, N, 2) to match, then the matched pairs of the
            # batch (image by image, queries ascending) oversampled and fresh.
            order = [(b, k) for b in range(len(rows)) for k in sorted(np.flatnonzero(ok[b]), key=lambda k: rows[b][k])]
            queue += [match_points[b][None] for b in range(len(rows))]
            queue += [np.stack([oversampled[b, k] for b, k in order]), np.stack([fresh[b, k] for b, k in order])]
        mask_labels, class_labels = [], []
        for label in batch["mask"]:
            present = [c for c in range(num_classes) if (label == c).any()]
            mask_labels.append(torch.from_numpy(np.stack([(label == c) for c in present]).astype(np.float32)))
            class_labels.append(torch.tensor(present, dtype=torch.int64))
        real_rand = torch.rand

        def rand(*shape, **kwargs):
            expected = queue.pop(0)
            if tuple(shape) != expected.shape:
                raise RuntimeError(f"transformers drew points {tuple(shape)}, segjax {expected.shape}: the "
                                   "matchings differ")
            return torch.from_numpy(np.array(expected))

        torch.rand = rand
        try:
            out = net(pixel_values=ref.ports.normalize(_images(ref, batch)), mask_labels=mask_labels,
                      class_labels=class_labels)
        finally:
            torch.rand = real_rand
        if queue:
            raise RuntimeError(f"transformers drew {len(queue)} point sets fewer than segjax")
        return out.loss

    def path_of(key: str) -> str | None:
        return _scheme_paths(scheme)(next(iter(_split_fused({key: np.zeros(3)}))))

    original = Original(net, export, path_of, loss, weights)
    original.bind = model_def.append
    return original


def mask2former_batches(task, count: int, rng: np.random.Generator) -> list[dict]:
    """Block label maps at the training crop (every class present) and images whose colours follow them."""
    n, crop = task.cfg.train.batch_size, tuple(task.cfg.data.crop)
    classes = len(task.class_names)
    out = []
    for _ in range(count):
        mask = block_labels(rng, n, crop, classes, 255)
        out.append({"image": block_images(rng, mask, classes), "mask": mask,
                    "valid": np.ones(n, bool), "image_ok": np.ones(n, bool)})
    return out


ORIGINALS = {
    "semantic_maps": (semantic_original, semantic_batches),
    "roi_instance": (roi_original, roi_batches),
    "query_semantic": (mask2former_original, mask2former_batches),
}


# --- segjax's optimizer config as torch.optim ----------------------------------------------------------

def torch_param_groups(optim, named: list[tuple[str, object]], path_of: Callable) -> list[dict]:
    """Each parameter in the torch.optim group of the first optim.param_groups item whose regex is found in
    its segjax path (segjax's own parsing, presets expanded), lr and weight decay multiplied; unmatched
    parameters: the base rates."""
    from segjax.engine import optim as optim_lib

    rules = optim_lib.parse_groups(optim.param_groups)
    groups: dict[int, dict] = {}
    for name, param in named:
        path = path_of(name)
        rule = optim_lib.group_of(path, rules) if path else None
        lr_mult, decay_mult = (rule.lr_mult, rule.decay_mult) if rule else (1.0, 1.0)
        group = groups.setdefault(rules.index(rule) if rule else -1, {
            "params": [], "names": [], "lr": optim.lr * lr_mult, "weight_decay": optim.weight_decay * decay_mult})
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def torch_optimizer(torch, optim, groups: list[dict]):
    if optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum, weight_decay=optim.weight_decay)
    if optim.optimizer == "adam":  # L2 in the gradient
        return torch.optim.Adam(groups, lr=optim.lr, weight_decay=optim.weight_decay)
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay)  # decoupled


def torch_scheduler(torch, optimizer, optim, updates_per_epoch: int, total: int):
    """segjax.engine.steps.make_optimizer's schedule as torch.optim.lr_scheduler, stepped per update:
    optional linear warm-up (LinearLR from warmup_ratio over warmup_steps), then cosine
    (CosineAnnealingLR to min_lr), poly (PolynomialLR; with min_lr mmseg's PolyLR
    (lr − min_lr)·(1 − t/T)^power + min_lr), step (StepLR every step_epochs epochs) or exponential
    (ExponentialLR stepped per epoch: StepLR every epoch) over the updates after the warm-up."""
    lrs = torch.optim.lr_scheduler
    warmup = getattr(optim, "warmup_steps", 0)
    rest = max(total - warmup, 1)
    if optim.scheduler == "cosine":
        main = lrs.CosineAnnealingLR(optimizer, T_max=rest, eta_min=optim.min_lr)
    elif optim.scheduler == "poly" and optim.min_lr == 0:
        main = lrs.PolynomialLR(optimizer, total_iters=rest, power=optim.power)
    elif optim.scheduler == "poly":
        floor = optim.min_lr
        main = lrs.LambdaLR(optimizer, [
            lambda t, base=g["lr"]: ((base - floor) * max(1 - t / rest, 0.0) ** optim.power + floor) / base
            for g in optimizer.param_groups])
    elif optim.scheduler == "step":
        main = lrs.StepLR(optimizer, step_size=optim.step_epochs * updates_per_epoch, gamma=optim.gamma)
    elif optim.scheduler == "exponential":
        main = lrs.StepLR(optimizer, step_size=updates_per_epoch, gamma=optim.gamma)
    else:
        main = lrs.ConstantLR(optimizer, factor=1.0, total_iters=0)
    if not warmup:
        return main
    ramp = lrs.LinearLR(optimizer, start_factor=optim.warmup_ratio, end_factor=1.0, total_iters=warmup)
    return lrs.SequentialLR(optimizer, [ramp, main], milestones=[warmup])


# --- comparison --------------------------------------------------------------------------------------

def differences(ours: dict, theirs: dict, start: dict) -> tuple[float, str, float, str]:
    """(param rel, its tensor, update rel, its tensor) over `theirs`' tensors, PyTorch's at the step
    and `start` at step 0. param rel: the largest difference over the tensor's scale
    max(max|torch|, max|start|), at least 1 for a tensor that starts at zero (biases, running means:
    they add to activations of order 1). update rel: the largest difference over the tensor's
    largest movement since step 0, at least 1e-3 × its scale (a bias that BatchNorm cancels moves by
    rounding only)."""
    param, update = (0.0, ""), (0.0, "")
    for key, value in theirs.items():
        if not value.size:
            continue
        diff = float(np.abs(ours[key] - value).max())
        initial = float(np.abs(start[key]).max())
        scale = max(float(np.abs(value).max()), initial if initial else 1.0)
        moved = max(float(np.abs(value - start[key]).max()), 1e-3 * scale)
        param = max(param, (diff / scale, key))
        update = max(update, (diff / moved, key))
    return (*param, *update)


# --- the run -----------------------------------------------------------------------------------------

def build_config(experiment: str, overrides: list[str]):
    from segjax import cli
    from segjax import config as config_lib

    cfg = config_lib.load_experiment(experiment)
    pairs = config_lib.parse_set(PARITY_DEFAULTS.get(cfg.experiment, []) + list(overrides))
    return cli.checked(config_lib.apply(cfg, pairs))


class TorchRun:
    """The PyTorch side: the original with segjax's initial weights (`model`), torch.optim built from
    the task's config, stepped as segjax's step (micro-batches averaged over gradient_accumulation)."""

    def __init__(self, ref, task, model, trained_paths: set[str], steps_per_epoch: int, bind=None):
        torch, optim = ref.torch, task.cfg.optim
        self.torch, self.optim = torch, optim
        self.original = ORIGINALS[task.cfg.task][0](ref, task, model)
        if bind is not None:
            self.original.bind(bind)
        self.net = self.original.net.train()
        self.named = []
        for name, param in self.net.named_parameters():
            param.requires_grad_(self.original.path_of(name) in trained_paths)
            if param.requires_grad:
                self.named.append((name, param))
        self.groups = torch_param_groups(optim, self.named, self.original.path_of)
        self.optimizer = torch_optimizer(torch, optim, self.groups)
        self.accumulation = optim.gradient_accumulation
        updates_per_epoch = max(steps_per_epoch // self.accumulation, 1)
        self.scheduler = torch_scheduler(torch, self.optimizer, optim, updates_per_epoch,
                                         updates_per_epoch * task.cfg.train.epochs)
        self.ema_decay = getattr(optim, "ema_decay", 0.0)
        self.ema = {name: p.detach().clone() for name, p in self.named} if self.ema_decay else None
        self.start = self.weights()

    def step(self, i: int, batch: dict, *probe) -> float:
        loss = self.original.loss(batch, i, *probe)
        (loss / self.accumulation).backward()
        if (i + 1) % self.accumulation == 0:
            if self.optim.gradient_clip > 0:
                self.torch.nn.utils.clip_grad_norm_([p for _, p in self.named], self.optim.gradient_clip)
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.ema is not None:
                with self.torch.no_grad():
                    for name, p in self.named:
                        self.ema[name].lerp_(p.detach(), 1 - self.ema_decay)
        return loss.item()

    def ema_weights(self) -> dict[str, np.ndarray]:
        """`weights()` with the averaged parameters in place of the trained ones."""
        with self.torch.no_grad():
            trained = {name: p.detach().clone() for name, p in self.named}
            for name, p in self.named:
                p.copy_(self.ema[name])
            out = self.weights()
            for name, p in self.named:
                p.copy_(trained[name])
        return out

    def weights(self) -> dict[str, np.ndarray]:
        """Parameters and floating buffers (BatchNorm running statistics) by name."""
        if self.original.weights is not None:
            return {k: np.asarray(v, np.float32) for k, v in self.original.weights().items()}
        return {k: v.detach().numpy().copy() for k, v in self.net.state_dict().items() if v.is_floating_point()}


def run(experiment: str, steps: int = 20, overrides: list[str] = (), tolerance: float = 1e-4,
        update_tolerance: float = 0.0, controls: list[list[str]] = (), seed: int = 0,
        log: Callable[[str], None] = print) -> dict:
    """Trains segjax and the PyTorch original `steps` micro-batches each (and a PyTorch twin per
    control: the config with those overrides on the PyTorch side only); returns per-step rows and
    the maxima. ok: the last param rel within `tolerance` (and every update rel within
    `update_tolerance` when given, the EMA weights' within `tolerance`)."""
    import jax
    from flax import nnx

    from segjax import tasks
    from segjax.engine import mesh as mesh_lib
    from segjax.engine import optim as optim_lib
    from segjax.engine import setup
    from segjax.engine import steps as steps_lib

    cfg = tasks.resolve(build_config(experiment, overrides))
    if cfg.task not in ORIGINALS:
        raise ValueError(f"parity has no PyTorch original for task {cfg.task!r} (experiment {experiment})")
    if cfg.train.precision != "fp32":
        raise ValueError("parity runs in float32: set train.precision=fp32")
    optim = cfg.optim
    epochs, accumulation = cfg.train.epochs, optim.gradient_accumulation
    if steps % (epochs * accumulation):
        raise ValueError(f"--steps {steps} must be a multiple of train.epochs × optim.gradient_accumulation "
                         f"({epochs} × {accumulation})")
    steps_per_epoch = steps // epochs
    ref = torch_reference()
    ref.torch.manual_seed(seed)
    ref.torch.use_deterministic_algorithms(True)

    # segjax: the trainer's own state, optimizer and jitted step.
    task = tasks.build(cfg)
    mesh = mesh_lib.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.model)
    state = setup.build_state(task, mesh, steps_per_epoch, epochs)
    train_step = steps_lib.make_train_step(state.model_def, state.opt_def, task.loss_and_sums, state.shardings,
                                           cfg.train.seed, wrt=task.trainable)
    model_state, opt_state = state.model_state, state.opt_state
    batches = ORIGINALS[cfg.task][1](task, steps, np.random.default_rng(seed))

    def segjax_model():
        return nnx.merge(state.model_def, model_state)

    # PyTorch: the original with segjax's initial weights, the same optimizer from the same config.
    trained = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(nnx.state(segjax_model(), task.trainable))}
    probed = cfg.task == "query_semantic"  # the loss samples points: segjax's are handed to transformers
    bind = state.model_def if probed else None
    runs = [TorchRun(ref, task, segjax_model(), trained, steps_per_epoch, bind)]
    for control in controls:
        control_task = tasks.build(tasks.resolve(build_config(experiment, [*overrides, *control])))
        runs.append(TorchRun(ref, control_task, segjax_model(), trained, steps_per_epoch, bind))
    main = runs[0]
    log(f"parity {cfg.experiment} ({cfg.task}, {getattr(cfg.model, 'name', getattr(cfg.model, 'size', ''))}): "
        f"{steps} steps, {optim.optimizer} lr {optim.lr} wd {optim.weight_decay} {optim.scheduler}, clip "
        f"{optim.gradient_clip}, accumulation {accumulation}, {len(main.groups)} parameter group(s), EMA "
        f"{main.ema_decay}; {sum(p.numel() for _, p in main.named):,} trained parameters"
        + "".join(f"; control {j + 1}: PyTorch with {' '.join(c)}" for j, c in enumerate(controls)))
    log(f"{'step':>4} {'loss segjax':>12} {'loss torch':>12} {'param rel':>10} {'update rel':>10}"
        + "".join(f" {'control ' + str(j + 1):>10}" for j in range(len(controls))) + "  worst tensor")
    rows = []
    for i, batch in enumerate(batches):
        global_batch = mesh_lib.to_global_batch(batch, mesh)
        probe = (types.SimpleNamespace(model_state=model_state, batch=global_batch,
                                       key=jax.random.fold_in(jax.random.key(cfg.train.seed), i)),) if probed else ()
        losses = [r.step(i, batch, *probe) for r in runs]  # before segjax's step: it donates what the probe reads
        model_state, opt_state, sums = train_step(model_state, opt_state, global_batch)
        sums = jax.device_get(sums)
        if int(sums["nonfinite_steps"]):
            raise RuntimeError(f"segjax's step {i + 1} had a non-finite loss and was skipped")
        exported = {k: np.asarray(v) for k, v in main.original.export(segjax_model()).items()}
        row = {"step": i + 1, "loss_segjax": float(sums["loss"]) / max(float(sums["count"]), 1.0),
               "loss_torch": losses[0]}
        for j, r in enumerate(runs):
            theirs = r.weights()
            missing = sorted(set(theirs) - set(exported))
            if missing:
                raise RuntimeError(f"segjax exports no value for {missing[:5]}")
            rel = differences(exported, theirs, r.start)
            if j == 0:
                row.update(param_rel=rel[0], worst=rel[1], update_rel=rel[2], worst_update=rel[3])
            else:
                row.setdefault("control_update_rel", []).append(rel[2])
        if main.ema is not None:  # both sides' averaged weights, in the names the parameters are compared in
            averaged = main.original.export(nnx.merge(state.model_def, optim_lib.ema_weights(model_state, opt_state)))
            row["ema_rel"] = differences({k: np.asarray(v) for k, v in averaged.items()}, main.ema_weights(),
                                         main.start)[0]
        rows.append(row)
        log(f"{i + 1:>4} {row['loss_segjax']:>12.6f} {row['loss_torch']:>12.6f} {row['param_rel']:>10.2e} "
            f"{row['update_rel']:>10.2e}" + "".join(f" {v:>10.2e}" for v in row.get("control_update_rel", []))
            + f"  {row['worst']}" + (f"  EMA rel {row['ema_rel']:.2e}" if "ema_rel" in row else ""))
    summary = {"experiment": cfg.experiment, "steps": steps, "tolerance": tolerance,
               "update_tolerance": update_tolerance,
               "max_loss_diff": max(abs(r["loss_segjax"] - r["loss_torch"]) for r in rows),
               "max_param_rel": max(r["param_rel"] for r in rows), "final_param_rel": rows[-1]["param_rel"],
               "max_update_rel": max(r["update_rel"] for r in rows), "rows": rows}
    if controls:
        summary["control_max_update_rel"] = [max(r["control_update_rel"][j] for r in rows)
                                             for j in range(len(controls))]
    if main.ema is not None:
        summary["max_ema_rel"] = max(r["ema_rel"] for r in rows)
    summary["ok"] = (summary["final_param_rel"] <= tolerance and summary.get("max_ema_rel", 0.0) <= tolerance
                     and (not update_tolerance or summary["max_update_rel"] <= update_tolerance))
    log(f"max |loss diff| {summary['max_loss_diff']:.3g}, max param rel {summary['max_param_rel']:.3g}, max update "
        f"rel {summary['max_update_rel']:.3g}" + (f", max EMA rel {summary['max_ema_rel']:.3g}" if "max_ema_rel"
                                                   in summary else "")
        + "".join(f", control {j + 1} max update rel {v:.3g}"
                  for j, v in enumerate(summary.get("control_max_update_rel", [])))
        + f": {'OK' if summary['ok'] else 'ABOVE'} tolerance {tolerance:g}"
        + (f" / update {update_tolerance:g}" if update_tolerance else ""))
    return summary


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help=f"one of {', '.join(PARITY_DEFAULTS)}")
    parser.add_argument("--steps", type=int, default=20, help="micro-batches (train steps) per side")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest relative parameter difference")
    parser.add_argument("--update_tolerance", type=float, default=0.0,
                        help="largest update rel (0: not checked)")
    parser.add_argument("--control", action="append", default=[], metavar='"KEY=VALUE [KEY=VALUE]"',
                        help="also train a PyTorch twin with these overrides (its update rel shows what the "
                             "option changes); repeatable")
    parser.add_argument("--seed", type=int, default=0, help="of the batches")
    parser.add_argument("--json", help="write the per-step rows and maxima here")
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    import jax

    from segjax.config import ConfigError

    args = parse_args(sys.argv[1:] if argv is None else argv)
    jax.config.update("jax_default_matmul_precision", "highest")
    try:
        summary = run(args.experiment, args.steps, args.set, args.tolerance, args.update_tolerance,
                      [c.split(" ") for c in args.control], args.seed)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=2))
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
