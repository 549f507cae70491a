"""Pixel-loss options of the semantic task (loss.label_smoothing, loss.class_weights[_from_data],
loss.ohem_thresh / loss.ohem_min_kept) against PyTorch and a port of mmsegmentation's OHEM sampler."""
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from helpers import run
from PIL import Image

from segjax import config as config_lib
from segjax import tasks
from segjax.config import ConfigError
from segjax.data.demo import write_voc_demo
from segjax.engine.setup import checkpoint_config
from segjax.evaluate import evaluate_checkpoint
from segjax.losses import ohem_pixel_weight, weighted_cross_entropy
from segjax.tasks.semantic_maps import median_frequency_weights
from segjax.train import resolve_config

IGNORE = 255
K = 5
TINY = ["--set", "model.size=tiny", "--set", "data.crop_size=48", "--set", "data.eval_size=64", "--backbone",
        "resnet18", "--batch_size", "4", "--num_workers", "0", "--set", "train.num_visualizations=0"]


def _example(seed: int, shape=(2, 6, 7), scale: float = 2.0):
    """Random logits [B, H, W, K], targets with ~20 % ignored pixels and class weights."""
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((*shape, K))).astype(np.float32)
    target = rng.integers(0, K, shape)
    target[rng.random(shape) < 0.2] = IGNORE
    return logits, target, rng.uniform(0.2, 3.0, K).astype(np.float32)


def _torch_ce(logits, target, weight=None, label_smoothing=0.0, pixel_weight=None):
    """(loss, d loss / d logits) of torch's cross_entropy on NHWC logits; with `pixel_weight`
    the per-pixel losses weighted by it and divided by sum(pixel_weight · weight[target])."""
    x = torch.tensor(logits).permute(0, 3, 1, 2).requires_grad_()
    t = torch.tensor(target, dtype=torch.long)
    w = None if weight is None else torch.tensor(weight)
    if pixel_weight is None:
        loss = F.cross_entropy(x, t, weight=w, ignore_index=IGNORE, label_smoothing=label_smoothing)
    else:
        per_pixel = F.cross_entropy(x, t, weight=w, ignore_index=IGNORE, reduction="none")
        target_w = pixel_weight * (1.0 if w is None else w[t.clamp(max=K - 1)])
        loss = (per_pixel * pixel_weight).sum() / target_w.sum()
    loss.backward()
    return loss.item(), x.grad.permute(0, 2, 3, 1).numpy()


def _jax_ce(logits, target, weight=None, label_smoothing=0.0, pixels=None):
    pixels = jnp.asarray(target != IGNORE) if pixels is None else pixels
    cw = None if weight is None else jnp.asarray(weight)

    def loss(x):
        return weighted_cross_entropy(x, jnp.asarray(target), pixels, cw, label_smoothing)[0]

    value, grad = jax.value_and_grad(loss)(jnp.asarray(logits))
    return float(value), np.asarray(grad)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 0.35])
@pytest.mark.parametrize("weighted", [False, True])
def test_smoothing_and_class_weights_match_torch(label_smoothing, weighted):
    logits, target, weight = _example(0)
    weight = weight if weighted else None
    expected, expected_grad = _torch_ce(logits, target, weight, label_smoothing)
    value, grad = _jax_ce(logits, target, weight, label_smoothing)
    assert value == pytest.approx(expected, rel=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_smoothing_formula_with_weights():
    """torch's smoothing term is weighted by every class's own weight and the mean divides by
    the target weights' sum; written out by hand, independently of torch and of segjax."""
    logits, target, weight = _example(1, shape=(1, 3, 4))
    eps = 0.2
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    num = den = 0.0
    for idx in zip(*np.nonzero(target != IGNORE)):
        t = target[idx]
        num += (1 - eps) * weight[t] * -logp[idx][t] + eps / K * (weight * -logp[idx]).sum()
        den += weight[t]
    assert _jax_ce(logits, target, weight, eps)[0] == pytest.approx(num / den, rel=1e-5)
    assert _torch_ce(logits, target, weight, eps)[0] == pytest.approx(num / den, rel=1e-5)


def mmseg_ohem_sample(seg_logit, seg_label, thresh, min_kept, ignore_index=IGNORE):
    """mmseg/structures/sampler/ohem_pixel_sampler.py `OHEMPixelSampler.sample` with `thresh`
    given, ported line by line: seg_logit [N, C, H, W], seg_label [N, 1, H, W] -> weight [N, H, W]."""
    with torch.no_grad():
        seg_label = seg_label.squeeze(1).long()
        batch_kept = min_kept * seg_label.size(0)
        valid_mask = seg_label != ignore_index
        seg_weight = seg_logit.new_zeros(size=seg_label.size())
        valid_seg_weight = seg_weight[valid_mask]
        seg_prob = F.softmax(seg_logit, dim=1)
        tmp_seg_label = seg_label.clone().unsqueeze(1)
        tmp_seg_label[tmp_seg_label == ignore_index] = 0
        seg_prob = seg_prob.gather(1, tmp_seg_label).squeeze(1)
        sort_prob, _ = seg_prob[valid_mask].sort()
        if sort_prob.numel() > 0:
            min_threshold = sort_prob[min(batch_kept, sort_prob.numel() - 1)]
        else:
            min_threshold = 0.0
        threshold = max(min_threshold, thresh)
        valid_seg_weight[seg_prob[valid_mask] < threshold] = 1.0
        seg_weight[valid_mask] = valid_seg_weight
        return seg_weight


ohem = jax.jit(ohem_pixel_weight, static_argnames="min_kept")


@pytest.mark.parametrize("thresh, min_kept, binding", [
    (0.5, 3, "thresh"),  # few kept by count: the probability threshold decides
    (0.05, 20, "min_kept"),  # the 60th smallest probability is above thresh
    (0.05, 60, "all"),  # min_kept·B beyond the valid pixels: the largest p is the threshold
])
@pytest.mark.parametrize("weighted", [False, True])
def test_ohem_matches_mmseg_sampler(thresh, min_kept, binding, weighted):
    logits, target, weight = _example(2)
    weight = weight if weighted else None
    expected = mmseg_ohem_sample(torch.tensor(logits).permute(0, 3, 1, 2), torch.tensor(target)[:, None],
                                 thresh, min_kept).numpy()
    valid = jnp.asarray(target != IGNORE)
    kept = ohem(jnp.asarray(logits), jnp.asarray(target), valid, thresh, min_kept=min_kept)
    np.testing.assert_array_equal(np.asarray(kept), expected.astype(bool))
    # The case really is the one named: which bound sets the threshold.
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    p = np.take_along_axis(probs, np.clip(target, 0, K - 1)[..., None], -1)[..., 0][target != IGNORE]
    count_bound = np.sort(p)[min(min_kept * 2, p.size - 1)]
    assert {"thresh": count_bound < thresh, "min_kept": count_bound > thresh,
            "all": min_kept * 2 >= p.size}[binding]
    assert 0 < expected.sum() < valid.sum()
    # mmseg's use: torch's cross-entropy per pixel times the sampler's weight, averaged over the
    # kept pixels (by their class weights); gradients flow through the logits, not the selection.
    value, grad = _jax_ce(logits, target, weight, pixels=kept)
    expected_value, expected_grad = _torch_ce(logits, target, weight, pixel_weight=torch.tensor(expected))
    assert value == pytest.approx(expected_value, rel=1e-5)
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)


def test_ohem_without_valid_pixels_keeps_none():
    logits, target, _ = _example(3)
    target[:] = IGNORE
    expected = mmseg_ohem_sample(torch.tensor(logits).permute(0, 3, 1, 2), torch.tensor(target)[:, None], 0.7, 5)
    kept = ohem(jnp.asarray(logits), jnp.asarray(target), jnp.asarray(target != IGNORE), 0.7, min_kept=5)
    assert not np.asarray(kept).any() and not expected.any()


# ---------------------------------------------------------------- the task: config, wiring, runs
@pytest.fixture(scope="module")
def voc(tmp_path_factory) -> Path:
    return write_voc_demo(tmp_path_factory.mktemp("voc"), num_train=8, num_val=4, size=(64, 48))


def _task(voc, *sets, resolved=True):
    argv = ["--experiment", "voc_resnet", "--data_root", str(voc), *TINY]
    for item in sets:
        argv += ["--set", item]
    cfg = resolve_config(argv)[0]
    return tasks.build(tasks.resolve(cfg) if resolved else cfg)


def test_task_loss_uses_every_option(voc):
    """loss_and_sums feeds the options to the losses: its `ce` equals torch's on the same logits."""
    _, target, _ = _example(4)
    num_classes = 21
    logits = np.random.default_rng(4).standard_normal((2, 6, 7, num_classes)).astype(np.float32)
    target = np.where(target == IGNORE, IGNORE, target * 4)  # classes 0, 4, ..., 16 of VOC's 21
    weight = np.linspace(0.5, 2.5, num_classes).astype(np.float32)
    task = _task(voc, f"loss.class_weights={','.join(map(str, weight))}", "loss.label_smoothing=0.1",
                 "loss.ohem_thresh=0.06", "loss.ohem_min_kept=4")
    batch = {"image": jnp.zeros((2, 6, 7, 3), jnp.uint8), "mask": jnp.asarray(target, jnp.uint8),
             "valid": jnp.ones(2, bool), "image_ok": jnp.ones(2, bool)}
    loss, (sums, _) = task.loss_and_sums(lambda images: jnp.asarray(logits), batch, jax.random.key(0))
    kept = mmseg_ohem_sample(torch.tensor(logits).permute(0, 3, 1, 2), torch.tensor(target)[:, None], 0.06, 4)
    assert 0 < kept.sum() < (target != IGNORE).sum()
    x, t, w = torch.tensor(logits).permute(0, 3, 1, 2), torch.tensor(target, dtype=torch.long), torch.tensor(weight)
    # With the sampler's 0/1 weight, the kept pixels are torch's targets and the others ignored.
    expected = F.cross_entropy(x, torch.where(kept > 0, t, IGNORE), weight=w, ignore_index=IGNORE,
                               label_smoothing=0.1).item()
    assert float(sums["ce"]) / float(sums["count"]) == pytest.approx(expected, rel=1e-5)
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_loss_never_reads_data_for_missing_weights(voc):
    """Weights to come from the data but not computed (the config not resolved): a clear error at
    trace time, not a data read inside the traced loss."""
    task = _task(voc, "loss.class_weights_from_data=true", resolved=False)
    batch = {"image": jnp.zeros((1, 8, 8, 3), jnp.uint8), "mask": jnp.zeros((1, 8, 8), jnp.uint8),
             "valid": jnp.ones(1, bool), "image_ok": jnp.ones(1, bool)}
    with pytest.raises(ConfigError, match="loss.class_weights_from_data"):
        task.loss_and_sums(lambda images: jnp.zeros((1, 8, 8, 21)), batch, jax.random.key(0))


@pytest.mark.parametrize("item, message", [
    ("loss.label_smoothing=-0.1", r"loss.label_smoothing must be within \[0, 1\), got -0.1"),
    ("loss.label_smoothing=1", r"loss.label_smoothing must be within \[0, 1\), got 1.0"),
    ("loss.class_weights=" + ",".join(["1"] * 20 + ["-1"]), r"loss.class_weights must be >= 0"),
    ("loss.class_weights=" + ",".join(["0"] * 21), r"loss.class_weights must be >= 0, at least one > 0"),
    ("loss.class_weights=1,2,3", r"loss.class_weights needs 21 values \(one per class\), got 3"),
    ("loss.ohem_thresh=1.5", r"loss.ohem_thresh must be within \[0, 1\] \(0 = off\), got 1.5"),
    ("loss.ohem_thresh=-0.1", r"loss.ohem_thresh must be within \[0, 1\]"),
    ("loss.ohem_min_kept=-1", r"loss.ohem_min_kept must be >= 0, got -1"),
])
def test_bad_loss_options_are_one_line_errors(voc, item, message):
    with pytest.raises(ConfigError, match=message) as err:
        _task(voc, item)
    assert "\n" not in str(err.value)


def test_class_weight_count_is_checked_against_the_prepared_class_list(tmp_path):
    from segjax.data.demo import write_coco_semantic_demo

    paths = write_coco_semantic_demo(tmp_path / "coco", num_train=2, num_val=1, size=(32, 32))
    argv = ["--experiment", "coco_semantic", "--data_root", str(Path(paths["train_masks"]).parent.parent),
            "--set", "loss.class_weights=1,2"]  # the class list (7 classes) is read from classes.json
    with pytest.raises(ConfigError, match=r"loss.class_weights needs 7 values \(one per class\), got 2"):
        tasks.build(tasks.resolve(resolve_config(argv)[0]))


def _median_frequency_by_hand(mask_dir: Path, ids: list[str], num_classes: int) -> np.ndarray:
    pixels, image_pixels = np.zeros(num_classes), np.zeros(num_classes)
    for image_id in ids:
        mask = np.asarray(Image.open(mask_dir / f"{image_id}.png"))
        labelled = mask[mask < num_classes]
        for c in range(num_classes):
            if (labelled == c).any():
                pixels[c] += (labelled == c).sum()
                image_pixels[c] += labelled.size
    freq = np.divide(pixels, image_pixels, out=np.zeros(num_classes), where=image_pixels > 0)
    median = np.median(freq[pixels > 0])
    return np.divide(median, freq, out=np.zeros(num_classes), where=pixels > 0)


def test_median_frequency_weights_skip_unreadable_masks(tmp_path):
    masks = [np.array([[0, 0, 1, 255]], np.uint8), np.array([[0, 2, 2, 2]], np.uint8)]
    paths = []
    for i, mask in enumerate(masks):
        Image.fromarray(mask).save(tmp_path / f"m{i}.png")
        paths.append(str(tmp_path / f"m{i}.png"))
    (tmp_path / "bad.png").write_bytes(b"not a png")
    # freq: class 0 3/7 (both masks, 3 + 4 labelled), class 1 1/3, class 2 3/4; median 3/7; class 3 absent.
    weights = median_frequency_weights([*paths, str(tmp_path / "bad.png")], 4)
    np.testing.assert_allclose(weights, [1.0, (3 / 7) / (1 / 3), (3 / 7) / (3 / 4), 0.0], rtol=1e-12)


def test_weights_from_data_are_saved_and_reused(voc, tmp_path):
    """Computed once from the training labels, saved with the run; --resume and evaluate use the
    saved numbers even after the training labels changed or are gone."""
    base = Path(voc)
    train_ids = (base / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    expected = _median_frequency_by_hand(base / "SegmentationClass", train_ids, 21)
    assert len(set(np.round(expected[expected > 0], 6))) > 2  # several classes, unequal weights

    data = tmp_path / "voc"
    shutil.copytree(base.parent.parent, data)  # a copy whose labels this test changes
    argv = ["--experiment", "voc_resnet", "--data_root", str(data), *TINY, "--epochs", "1",
            "--checkpoint_dir", str(tmp_path / "runs"), "--set", "loss.class_weights_from_data=true"]
    first = run(argv)
    run_dir = Path(first["run_dir"])
    saved = json.loads((run_dir / "config.json").read_text())["loss"]["class_weights"]
    np.testing.assert_allclose(saved, expected, rtol=1e-12)

    # Other labels: a recomputation would give other weights (every pixel class 1 -> only class 1 weighs).
    masks = data / "VOCdevkit" / "VOC2012" / "SegmentationClass"
    for image_id in train_ids:
        Image.fromarray(np.ones_like(np.asarray(Image.open(masks / f"{image_id}.png")))).save(
            masks / f"{image_id}.png")
    resumed = run(["--experiment", "voc_resnet", "--resume", str(run_dir), "--resume_epochs", "1"])
    assert resumed["epochs"] == 2
    cfg, _, step = checkpoint_config(run_dir, best=False)
    assert step == resumed["steps"]  # the resumed run's own checkpoint
    np.testing.assert_allclose(cfg.loss.class_weights, expected, rtol=1e-12)
    np.testing.assert_allclose(json.loads((run_dir / "config.json").read_text())["loss"]["class_weights"],
                               expected, rtol=1e-12)

    # Evaluate without any training label: the saved weights give the run's own validation loss,
    # and other weights would give another one.
    for image_id in train_ids:
        (masks / f"{image_id}.png").unlink()
    checkpoint = run_dir / "checkpoints" / str(step)
    result = evaluate_checkpoint(checkpoint, visualize=False)
    assert result["metrics"]["ce"] == pytest.approx(resumed["last_val"]["ce"], rel=1e-5)
    unweighted = evaluate_checkpoint(checkpoint, visualize=False, overrides=[
        "loss.class_weights_from_data=false", "loss.class_weights="])
    assert unweighted["metrics"]["ce"] != pytest.approx(result["metrics"]["ce"], rel=1e-3)


def test_saved_weights_round_trip_through_the_config(voc):
    weights = (0.1, 1 / 3, 2.5e-7) + (1.0,) * 18
    task = _task(voc, "loss.class_weights=" + ",".join(repr(w) for w in weights))
    rebuilt = config_lib.from_dict(json.loads(config_lib.to_json(task.cfg)))
    assert rebuilt.loss.class_weights == weights


def test_bad_option_on_the_command_line_exits_2(voc, capsys):
    from segjax.train import main

    argv = ["--experiment", "voc_resnet", "--data_root", str(voc), "--print_config", "--set", "loss.ohem_thresh=2"]
    assert main(argv) == 2
    assert capsys.readouterr().err == "error: loss.ohem_thresh must be within [0, 1] (0 = off), got 2.0\n"
