"""Training parity with PyTorch (tools/parity.py): segjax's real train step against the PyTorch
original with the same initial weights, batches and optimizer config, float32, 20 steps.

Each case passes when the parameters and BatchNorm statistics stay within 1e-4 of PyTorch's (param
rel) and the training updates themselves agree (update rel, per case); PyTorch twins trained with one
option changed ("controls") must land above that update tolerance, so each option the case names is
shown to be resolved: had segjax dropped or changed it, the case would fail. Learning rates are small:
float32 rounding, amplified by Adam's per-element normalisation and by random-init BatchNorm stacks,
moves PyTorch float32 itself ~1e-4 away from float64 within 20 steps at the experiments' rates.
"""
import numpy as np
import pytest
from helpers import load_tool

from segjax import tasks

parity = load_tool("parity")

TOLERANCE = 1e-4


def _check(experiment: str, overrides: list[str], update_tolerance: float, controls: dict[str, list[str]]):
    summary = parity.run(experiment, 20, overrides, TOLERANCE, update_tolerance, list(controls.values()))
    assert summary["final_param_rel"] <= TOLERANCE, summary["rows"][-1]
    assert summary["max_update_rel"] <= update_tolerance, max(summary["rows"], key=lambda r: r["update_rel"])
    assert summary["max_loss_diff"] <= 1e-4 * max(r["loss_torch"] for r in summary["rows"])
    for name, moved in zip(controls, summary.get("control_max_update_rel", [])):
        assert moved > update_tolerance, f"the comparison does not resolve {name}: {moved:.3g}"
    if "max_ema_rel" in summary:
        assert summary["max_ema_rel"] <= TOLERANCE
    return summary


def test_batch_norm_running_statistics_match_torch(ref):
    """segjax's BatchNorm (layers.batch_norm): PyTorch's momentum 0.1, eps 1e-5 and unbiased running
    variance, over 3 training steps of 2×3×3 values per channel (n / (n − 1) = 18 / 17)."""
    import jax.numpy as jnp
    from flax import nnx

    from segjax.models.layers import batch_norm

    torch = ref.torch
    norm = batch_norm(4, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    theirs = torch.nn.BatchNorm2d(4).train()
    rng = np.random.default_rng(0)
    for _ in range(3):
        x = rng.normal(2.0, 3.0, (2, 3, 3, 4)).astype(np.float32)
        out = norm(jnp.asarray(x))
        expected = theirs(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).detach().numpy().transpose(0, 2, 3, 1)
        np.testing.assert_allclose(np.asarray(out), expected, atol=1e-5)
    np.testing.assert_allclose(np.asarray(norm.mean[...]), theirs.running_mean.numpy(), rtol=1e-6)
    np.testing.assert_allclose(np.asarray(norm.var[...]), theirs.running_var.numpy(), rtol=1e-6)
    norm.eval()
    np.testing.assert_allclose(np.asarray(norm(jnp.asarray(x))), theirs.eval()(torch.from_numpy(
        x.transpose(0, 3, 1, 2).copy())).detach().numpy().transpose(0, 2, 3, 1), atol=1e-5)


# (a) voc_resnet: SGD with momentum and weight decay (added to the gradient, as torch.optim.SGD).
VOC = ["optim.lr=3e-5", "optim.weight_decay=0.01", "optim.momentum=0.9"]


def test_voc_resnet_sgd_momentum_weight_decay_step_schedule(ref):
    _check("voc_resnet", [*VOC, "optim.scheduler=step", "optim.step_epochs=1", "optim.gamma=0.5", "train.epochs=2"],
           1e-2, {"weight decay": ["optim.weight_decay=0"], "momentum": ["optim.momentum=0"],
                  "step schedule": ["optim.scheduler=none"]})


def test_voc_resnet_poly_with_warmup(ref):
    _check("voc_resnet", [*VOC, "optim.scheduler=poly", "optim.power=0.9", "optim.warmup_steps=5",
                          "optim.warmup_ratio=0.1"],
           1e-2, {"warm-up": ["optim.warmup_steps=0"], "poly": ["optim.scheduler=none", "optim.warmup_steps=5"],
                  "weight decay": ["optim.weight_decay=0"]})


# (b) coco_semantic U-Net (smp): Adam, weight decay as L2 in the gradient (torch.optim.Adam).
UNET = ["optim.lr=1e-5", "optim.weight_decay=0.05"]


# segjax's U-Net gradients differ from smp's by ~5e-3 (relative to each tensor's largest) already at
# step 0, where PyTorch float32 is within 6e-5 of float64 (the loss agrees to 1e-7). The error enters at
# the last decoder block's first BatchNorm (64×64×2 values per channel): its bias gradient, a sum that
# cancels, is 4e-3 off while its scale's is 3e-6; likely XLA:CPU's float32 reduction order against
# torch's cascade sums, not a semantic difference. Left to decide (e.g. BatchNorm sums accumulated
# pairwise).
@pytest.mark.xfail(strict=True, reason="U-Net gradients 5e-3 from smp's at step 0 (BatchNorm bias sums, see comment)")
def test_coco_semantic_unet_adam(ref):
    _check("coco_semantic", [*UNET], 0.1, {"L2 weight decay": ["optim.optimizer=adamw"]})


@pytest.mark.xfail(strict=True, reason="U-Net gradients 5e-3 from smp's at step 0 (BatchNorm bias sums, see above)")
def test_coco_semantic_unet_class_weights_label_smoothing(ref):
    classes = tasks.resolve(parity.build_config("coco_semantic", [])).data.class_names  # the data's class list
    weights = ",".join(str(0.5 + 0.25 * (i % 5)) for i in range(len(classes)))
    _check("coco_semantic", [*UNET, f"loss.class_weights={weights}", "loss.label_smoothing=0.1"], 0.1,
           {"class weights": ["loss.class_weights="], "label smoothing": ["loss.label_smoothing=0"]})


# (c) roi_human's head: AdamW (decoupled decay), cosine, gradient clipping and accumulation.
def test_roi_human_head_adamw_cosine_clip_accumulation(ref):
    _check("roi_human", ["optim.lr=1e-5", "optim.min_lr=1e-6", "optim.weight_decay=0.5", "optim.gradient_clip=0.5",
                         "optim.gradient_accumulation=2", "data.class_weights=0.5,1,2"],
           1e-2, {"clipping": ["optim.gradient_clip=0"], "accumulation": ["optim.gradient_accumulation=1"],
                 "cosine": ["optim.scheduler=none"], "decoupled decay": ["optim.weight_decay=0"],
                 "class weights": ["data.class_weights=1,1,1"]})


# (d) Mask2Former (transformers, its loss with segjax's sampled points): AdamW and cosine, then the
# recipe's poly, parameter groups (the mask2former preset: backbone ×0.1, no decay on norms and
# embeddings) and EMA.
M2F = ["optim.optimizer=adamw", "optim.lr=2e-6", "optim.weight_decay=5"]


def test_mask2former_adamw_cosine(ref):
    _check("roadways_mask2former", [*M2F, "optim.scheduler=cosine"], 0.05,
           {"decoupled decay": ["optim.weight_decay=0"], "cosine": ["optim.scheduler=none"]})


def test_mask2former_recipe_param_groups_poly_ema(ref):
    _check("roadways_mask2former", [*M2F, "optim.scheduler=poly", "optim.param_groups=mask2former",
                                    "optim.ema_decay=0.9"], 0.05,
           {"parameter groups": ["optim.param_groups="], "poly": ["optim.scheduler=none"]})
