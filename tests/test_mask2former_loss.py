"""Mask2Former's point sampling, matching and set loss against transformers' `Mask2FormerLoss`
(the same sample points injected on both sides), plus the cases transformers does not survive."""
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from segjax.losses import Mask2FormerLoss, semantic_targets
from segjax.ops.point_sample import point_sample

B, Q, K, T = 2, 6, 4, 3  # images, queries, classes (+ "no object"), padded targets
PRED, TARGET = (8, 10), (24, 30)  # mask logits at a quarter of the targets' size, as Mask2Former
SETS = 3  # final + 2 auxiliary
CRITERION = Mask2FormerLoss(num_points=20)  # 60 oversampled, 15 most uncertain + 5 fresh


@pytest.fixture(scope="module")
def torch():
    # torchvision's compiled ops do not load against the CPU torch (STACK_NOTES); transformers
    # imports it eagerly, and its pure-Python parts work with the registration module stubbed.
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torch
    return torch


def _problem(seed=0):
    """Prediction sets and padded targets: image 0 has 3 targets, image 1 has 2 (one padding slot)."""
    rng = np.random.default_rng(seed)
    sets = [(rng.normal(size=(B, Q, K + 1)).astype(np.float32), 3 * rng.normal(size=(B, Q, *PRED)).astype(np.float32))
            for _ in range(SETS)]
    yy, xx = np.mgrid[:TARGET[0], :TARGET[1]]
    masks = np.zeros((B, T, *TARGET), np.uint8)
    for b in range(B):
        for t in range(T):
            cy, cx, r = rng.uniform(5, 20), rng.uniform(5, 25), rng.uniform(4, 9)
            masks[b, t] = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
    classes = np.array([[3, 0, 2], [1, 3, -1]], np.int32)
    valid = classes >= 0
    masks[1, 2] = 0
    return sets, masks, classes, valid


def test_point_sample_is_grid_sample(torch):
    rng = np.random.default_rng(0)
    maps = rng.normal(size=(2, 3, 7, 9)).astype(np.float32)
    points = rng.uniform(-0.2, 1.2, size=(2, 3, 40, 2)).astype(np.float32)  # outside the map too
    grid = torch.tensor(2 * points - 1).reshape(6, 40, 1, 2)
    expected = torch.nn.functional.grid_sample(torch.tensor(maps).reshape(6, 1, 7, 9), grid, mode="bilinear",
                                               padding_mode="zeros", align_corners=False).reshape(2, 3, 40)
    np.testing.assert_allclose(point_sample(jnp.asarray(maps), jnp.asarray(points)), expected.numpy(), atol=2e-6)
    # Shared points broadcast over a leading axis; integer maps are interpolated in float32.
    shared = point_sample(jnp.asarray(maps), jnp.asarray(points[:, :1]))
    repeated = point_sample(jnp.asarray(maps), jnp.asarray(points[:, :1].repeat(3, 1)))
    np.testing.assert_allclose(shared, repeated)
    binary = (maps > 0).astype(np.uint8)
    np.testing.assert_allclose(point_sample(jnp.asarray(binary), jnp.asarray(points)),
                               point_sample(jnp.asarray(binary, jnp.float32), jnp.asarray(points)), atol=1e-7)


@pytest.fixture(scope="module")
def compared(torch):
    """Both losses with the same points: ours drawn from a key, handed to transformers' torch.rand."""
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import (
        Mask2FormerLoss as HFLoss,
    )

    sets, masks, classes, valid = _problem()
    pairs = min(Q, T)
    points = [CRITERION.draw_points(k, B, pairs) for k in jax.random.split(jax.random.key(0), SETS)]
    args = ([(jnp.asarray(c), jnp.asarray(m)) for c, m in sets], jnp.asarray(masks), jnp.asarray(classes),
            jnp.asarray(valid))
    keyed = jax.jit(CRITERION.__call__)(*args, jax.random.key(0))  # draws `points` from the same key
    per_set = [jax.jit(CRITERION.loss_at_points)([args[0][s]], *args[1:], [points[s]]) for s in range(SETS)]
    matches = [jax.jit(CRITERION.match)(*args[0][s], *args[1:], points[s][0]) for s in range(SETS)]

    # transformers draws, per set: torch.rand(1, N, 2) per image (matching), then (boxes, 3N, 2)
    # and (boxes, N - uncertain, 2) over the matched pairs in its order (image, query ascending).
    def pair_order(s):
        rows, _, ok = (np.asarray(a) for a in matches[s])
        return [(b, k) for b in range(B) for k in sorted(np.flatnonzero(ok[b]), key=lambda k: rows[b, k])]

    queue = []
    for s, (match_points, oversampled, fresh) in enumerate(points):
        order = pair_order(s)
        queue += [np.asarray(match_points[b])[None] for b in range(B)]
        queue += [np.stack([np.asarray(oversampled)[b, k] for b, k in order]),
                  np.stack([np.asarray(fresh)[b, k] for b, k in order])]
    real_rand = torch.rand

    def rand(*shape, **kwargs):
        expected = queue.pop(0)
        assert tuple(shape) == expected.shape, (shape, expected.shape)
        return torch.tensor(expected)

    config = Mask2FormerConfig(num_labels=K, train_num_points=CRITERION.num_points)
    weights = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}
    criterion = HFLoss(config, weights)
    hf_matches = []
    real_match = criterion.matcher.forward
    criterion.matcher.forward = lambda *a: hf_matches.append(real_match(*a)) or hf_matches[-1]
    torch.rand = rand
    try:
        n = valid.sum(1)
        hf = criterion(torch.tensor(sets[0][1]), torch.tensor(sets[0][0]),
                       [torch.tensor(masks[b, :n[b]], dtype=torch.float32) for b in range(B)],
                       [torch.tensor(classes[b, :n[b]], dtype=torch.int64) for b in range(B)],
                       [{"masks_queries_logits": torch.tensor(m), "class_queries_logits": torch.tensor(c)}
                        for c, m in sets[1:]])
    finally:
        torch.rand = real_rand
    assert not queue
    return {"keyed": keyed, "per_set": per_set, "matches": matches, "hf_matches": hf_matches,
            "hf": {k: float(v) for k, v in hf.items()}, "weights": weights}


def test_matching_agrees_with_transformers(compared):
    for s, (rows, cols, ok) in enumerate(compared["matches"]):
        hf = compared["hf_matches"][s]  # final set first, then the auxiliary ones in order
        for b in range(B):
            ours = {(int(r), int(c)) for r, c, f in zip(rows[b], cols[b], ok[b]) if f}
            assert ours == {(int(r), int(c)) for r, c in zip(*hf[b])}, (s, b)


def test_loss_agrees_with_transformers(compared):
    hf, names = compared["hf"], {"loss_class": "loss_cross_entropy", "loss_mask": "loss_mask", "loss_dice": "loss_dice"}
    for s, (_, parts) in enumerate(compared["per_set"]):
        suffix = "" if s == 0 else f"_{s - 1}"
        for ours, theirs in names.items():
            np.testing.assert_allclose(float(parts[ours]), hf[theirs + suffix], rtol=1e-5, err_msg=f"{ours} set {s}")
    # The sum over sets, with the points drawn from the key, is transformers' weighted total.
    loss, parts = compared["keyed"]
    total = sum(value * compared["weights"][key.rsplit("_", 1)[0] if key[-1].isdigit() else key]
                for key, value in hf.items())
    np.testing.assert_allclose(float(loss), total, rtol=1e-5)
    assert float(parts["num_masks"]) == 5.0


def test_empty_targets_train_the_class_loss_only():
    sets, masks, classes, valid = _problem(1)
    valid[1] = False  # image 1 has no target at all
    args = ([(jnp.asarray(c), jnp.asarray(m)) for c, m in sets], jnp.asarray(masks), jnp.asarray(classes))
    loss_fn = jax.jit(lambda s, v, w: CRITERION(s, args[1], args[2], v, jax.random.key(1), image_weight=w))
    everyone = jnp.ones(B)
    loss, parts = loss_fn(args[0], jnp.zeros_like(valid), everyone)  # no target in the batch
    assert np.isfinite(float(loss)) and float(parts["loss_mask"]) == float(parts["loss_dice"]) == 0.0
    assert float(parts["num_masks"]) == 1.0
    # Every query of every set learns "no object": the class loss is its weighted cross-entropy.
    expected = 0.0
    for c, _ in sets:
        log_p = jax.nn.log_softmax(jnp.asarray(c))[..., K]
        expected += -float(log_p.mean())  # one class weight (0.1) throughout: the mean is unweighted
    np.testing.assert_allclose(float(parts["loss_class"]), expected, rtol=1e-5)
    np.testing.assert_allclose(float(loss), 2.0 * expected, rtol=1e-5)
    # No mask gradient reaches the image without targets; an image of weight 0 drops out entirely.
    grads = jax.grad(lambda s: loss_fn(s, jnp.asarray(valid), everyone)[0])(args[0])
    assert all(float(jnp.abs(g[1][1]).sum()) == 0.0 and float(jnp.abs(g[1][0]).sum()) > 0 for g in grads)
    dropped = jax.grad(lambda s: loss_fn(s, jnp.asarray(valid), jnp.array([1.0, 0.0]))[0])(args[0])
    assert all(float(jnp.abs(g[0][1]).sum()) == 0.0 for g in dropped)


def test_non_finite_logits_do_not_break_the_matching():
    sets, masks, classes, valid = _problem(2)
    logits, mask_logits = sets[0]
    mask_logits[0, 1] = np.nan  # a diverged query
    logits[0, 2] = np.inf
    points = CRITERION.draw_points(jax.random.key(2), B, T)
    rows, cols, ok = jax.jit(CRITERION.match)(jnp.asarray(logits), jnp.asarray(mask_logits), jnp.asarray(masks),
                                              jnp.asarray(classes), jnp.asarray(valid), points[0])
    # Every valid target is still matched, one-to-one, to a query with finite costs.
    for b in range(B):
        matched = {int(c): int(r) for r, c, f in zip(rows[b], cols[b], ok[b]) if f}
        assert sorted(matched) == list(np.flatnonzero(valid[b]))
        assert len(set(matched.values())) == len(matched)
    assert not {1, 2} & {int(r) for r, f in zip(rows[0], ok[0]) if f}
    loss, _ = jax.jit(CRITERION.__call__)([(jnp.asarray(logits), jnp.asarray(mask_logits))], jnp.asarray(masks),
                                          jnp.asarray(classes), jnp.asarray(valid), jax.random.key(3))
    assert loss.shape == ()  # non-finite (the trainer skips such a step) but computed without error


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="importance_sample_ratio"):
        Mask2FormerLoss(importance_sample_ratio=1.5)
    with pytest.raises(ValueError, match="choose one of"):
        Mask2FormerLoss(match_method="greedy")


def test_semantic_targets_are_the_image_processors_masks(torch):
    from transformers.models.mask2former.image_processing_mask2former import (
        convert_segmentation_map_to_binary_masks_fast,
    )

    labels = np.random.default_rng(0).choice([0, 2, 3, 255], size=(2, 6, 7)).astype(np.uint8)
    labels[1][labels[1] == 3] = 0  # class 3 absent from image 1
    masks, classes, valid = jax.jit(semantic_targets, static_argnums=1)(jnp.asarray(labels), K)
    assert masks.shape == (2, K, 6, 7) and masks.dtype == jnp.uint8
    for b in range(2):
        hf_masks, hf_classes = convert_segmentation_map_to_binary_masks_fast(torch.tensor(labels[b]), ignore_index=255)
        present = np.asarray(valid[b])
        np.testing.assert_array_equal(np.asarray(classes[b])[present], hf_classes.numpy())
        np.testing.assert_array_equal(np.asarray(masks[b])[present], hf_masks.numpy())
        assert not np.asarray(masks[b])[~present].any()
