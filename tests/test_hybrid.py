"""Query-based mask model (DarkNet-53 + FPN + transformer decoder), Hungarian matching and the
set-prediction loss: shapes, parameter counts, gradients, matching against scipy, overfitting."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import param_count
from scipy.optimize import linear_sum_assignment

from segjax.losses import set_prediction_loss
from segjax.models.darknet import DarkNet53
from segjax.models.hybrid import SIZES, HybridQueryModel
from segjax.models.transformer import sine_positions
from segjax.ops.matching import hungarian_match

OVERFIT_STEPS = 100
OVERFIT_SIZE = (48, 80)  # non-square, and not a multiple of 32


def _abstract_call(module: nnx.Module, *args, **static):
    """Output shapes of `module(*args, **static)` without computing anything."""
    graphdef, state = nnx.split(module)
    return jax.eval_shape(lambda s, *a: nnx.merge(graphdef, s)(*a, **static), state, *args)


# ---------------------------------------------------------------- full-size shapes and counts

def test_full_size_counts_and_shapes():
    """Every part at full size, abstractly: timm's DarkNet-53 count, strides 8/16/32."""
    assert param_count(nnx.eval_shape(lambda: DarkNet53(rngs=nnx.Rngs(0)))) == 40_584_928
    model = nnx.eval_shape(lambda: HybridQueryModel(1, **SIZES["full"], rngs=nnx.Rngs(0)))
    assert param_count(model.backbone) == 40_584_928  # timm darknet53 with num_classes=0
    assert param_count(model.fpn) == 3_212_800
    assert param_count(model.decoder) == 17_576_066
    images = jax.ShapeDtypeStruct((2, 640, 640, 3), jnp.float32)
    features = _abstract_call(model.backbone, images)
    assert [f.shape for f in features] == [
        (2, 80, 80, 256), (2, 40, 40, 512), (2, 20, 20, 1024)]
    pyramid = _abstract_call(model.fpn, features)
    assert [p.shape for p in pyramid] == [(2, 80, 80, 256), (2, 40, 40, 256), (2, 20, 20, 256)]
    out = _abstract_call(model.decoder, pyramid[0], size=(640, 640))
    assert out["pred_logits"].shape == (2, 100, 2)
    assert out["pred_masks"].shape == (2, 100, 640, 640)


@pytest.mark.parametrize("size", [(70, 100), (33, 65)])
def test_tiny_output_shapes_for_odd_sizes(size):
    model = nnx.eval_shape(lambda: HybridQueryModel(3, **SIZES["tiny"], rngs=nnx.Rngs(0)))
    out = _abstract_call(model, jax.ShapeDtypeStruct((2, *size, 3), jnp.float32))
    assert out["pred_logits"].shape == (2, SIZES["tiny"]["num_queries"], 4)
    assert out["pred_masks"].shape == (2, SIZES["tiny"]["num_queries"], *size)
    features = _abstract_call(model.backbone, jax.ShapeDtypeStruct((1, *size, 3), jnp.float32))
    h, w = size
    for feature, stride in zip(features, (8, 16, 32)):
        assert feature.shape[1:3] == (-(-h // stride), -(-w // stride))


def test_sine_positions_distinguish_tokens():
    pos = sine_positions(5, 7, 32)
    assert pos.shape == (35, 32)
    assert np.all(np.abs(pos) <= 1.0)
    # Every token gets its own code; the first half depends on the row only.
    assert len({tuple(np.round(p, 6)) for p in pos}) == 35
    np.testing.assert_allclose(pos.reshape(5, 7, 32)[:, 0, :16], pos.reshape(5, 7, 32)[:, 3, :16])


# ---------------------------------------------------------------- matching

def _scipy_pairs(cost, valid):
    cols = np.flatnonzero(valid)
    rows, sub = linear_sum_assignment(cost[:, cols])
    return {(int(r), int(cols[c])) for r, c in zip(rows, sub)}


def _our_pairs(rows, cols, flags):
    return {(int(r), int(c)) for r, c, f in zip(rows, cols, flags) if f}


@pytest.mark.parametrize("method", ["optax", "scipy"])
@pytest.mark.parametrize("shape", [(6, 6), (9, 4), (4, 9)])
def test_hungarian_matches_scipy(shape, method):
    rng = np.random.default_rng(sum(shape))
    q, t = shape
    cost = rng.normal(size=(5, q, t)).astype(np.float32)
    valid = rng.uniform(size=(5, t)) < 0.7
    valid[0] = True  # all valid
    valid[1] = False  # none valid
    valid[2, :] = False
    valid[2, 1] = True  # a single valid target
    match = functools.partial(hungarian_match, method=method)

    # Batched through leading axes, and through an explicit vmap, both under jit.
    batched = jax.jit(match)(jnp.asarray(cost), jnp.asarray(valid))
    vmapped = jax.jit(jax.vmap(match))(jnp.asarray(cost), jnp.asarray(valid))
    for rows, cols, flags in (batched, vmapped):
        assert rows.shape == cols.shape == flags.shape == (5, min(q, t))
        for b in range(5):
            ours = _our_pairs(rows[b], cols[b], flags[b])
            assert ours == _scipy_pairs(cost[b], valid[b])
            assert len(set(np.asarray(rows[b]))) == min(q, t)  # one-to-one
            assert len(set(np.asarray(cols[b]))) == min(q, t)


def test_hungarian_unbatched_without_mask_and_non_finite_costs():
    cost = np.array([[0.0, np.nan, 2.0, 1.0], [np.inf, 1.0, 0.5, 0.3], [3.0, 0.1, 0.2, 4.0]],
                    np.float32)
    rows, cols, flags = jax.jit(hungarian_match)(jnp.asarray(cost))
    assert bool(flags.all())
    # Non-finite costs are the least attractive; among the rest the optimum is scipy's.
    finite = np.where(np.isfinite(cost), cost, 100.0)
    assert _our_pairs(rows, cols, flags) == _scipy_pairs(finite, np.ones(4, bool))
    with pytest.raises(ValueError, match="choose one of"):
        hungarian_match(jnp.asarray(cost), method="greedy")


# ---------------------------------------------------------------- set-prediction loss

def _blob_masks(rng, n, h, w):
    yy, xx = np.mgrid[:h, :w]
    masks = []
    for _ in range(n):
        cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
        ry, rx = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w
        masks.append(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0)
    return np.stack(masks).astype(np.float32)


def _targets():
    """Two images, T=2 padded targets, 3 classes: image 0 has two targets, image 1 one."""
    rng = np.random.default_rng(0)
    masks = _blob_masks(rng, 4, 16, 20).reshape(2, 2, 16, 20)
    classes = np.array([[2, 0], [1, -1]], np.int32)
    valid = np.array([[True, True], [True, False]])
    masks[1, 1] = 0.0
    return jnp.asarray(masks), jnp.asarray(classes), jnp.asarray(valid)


_loss = jax.jit(set_prediction_loss, static_argnames=("cost_size",))


def test_set_loss_is_zero_for_a_perfect_prediction():
    masks, classes, valid = _targets()
    num_queries, num_classes = 5, 3
    # Targets sit at queries (3, 1) of image 0 and query 4 of image 1; the rest are "no object".
    slots = np.array([[3, 1], [4, 0]])
    logits = np.full((2, num_queries, num_classes + 1), -20.0, np.float32)
    logits[..., num_classes] = 20.0
    pred_masks = np.full((2, num_queries, 16, 20), -20.0, np.float32)
    for b in range(2):
        for k in range(2):
            if valid[b, k]:
                q = slots[b, k]
                logits[b, q] = -20.0
                logits[b, q, classes[b, k]] = 20.0
                pred_masks[b, q] = np.where(masks[b, k] > 0, 20.0, -20.0)
    for cost_size in (None, (8, 10)):
        loss, parts = _loss(jnp.asarray(logits), jnp.asarray(pred_masks), masks, classes, valid,
                            cost_size=cost_size)
        assert float(loss) < 1e-4, parts
        assert float(parts["num_targets"]) == 3.0
    # Swapping the class of one matched query makes it a mistake the loss sees.
    logits[0, 3, [classes[0, 0], 0]] = logits[0, 3, [0, classes[0, 0]]]
    loss, parts = _loss(jnp.asarray(logits), jnp.asarray(pred_masks), masks, classes, valid)
    assert float(parts["loss_class"]) > 1.0


def test_set_loss_decreases_when_the_matched_mask_improves():
    masks, classes, valid = _targets()
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 5, 4)).astype(np.float32)
    logits[0, 3, 2] = logits[0, 1, 0] = logits[1, 4, 1] = 8.0  # these queries win the matching
    pred_masks = rng.normal(size=(2, 5, 16, 20)).astype(np.float32)
    before, parts_before = _loss(jnp.asarray(logits), jnp.asarray(pred_masks), masks, classes,
                                 valid)
    better = pred_masks.copy()
    better[0, 3] = 0.5 * better[0, 3] + 0.5 * np.where(masks[0, 0] > 0, 4.0, -4.0)
    after, parts_after = _loss(jnp.asarray(logits), jnp.asarray(better), masks, classes, valid)
    assert float(after) < float(before)
    assert float(parts_after["loss_mask"]) < float(parts_before["loss_mask"])
    assert float(parts_after["loss_dice"]) < float(parts_before["loss_dice"])
    np.testing.assert_allclose(parts_after["loss_class"], parts_before["loss_class"], rtol=1e-6)

    # Only matched queries get a mask gradient; padding targets are never matched.
    grad = jax.jit(jax.grad(lambda m: set_prediction_loss(
        jnp.asarray(logits), m, masks, classes, valid)[0]))(jnp.asarray(pred_masks))
    touched = np.abs(np.asarray(grad)).sum(axis=(2, 3)) > 0
    expected = np.zeros((2, 5), bool)
    expected[0, [3, 1]] = expected[1, 4] = True
    np.testing.assert_array_equal(touched, expected)


# ---------------------------------------------------------------- tiny model: train and overfit

TX = optax.adam(3e-3)


@functools.partial(jax.jit, static_argnums=0)
def _train_step(graphdef, state, opt_state, images, masks, classes, valid):
    model = nnx.merge(graphdef, state)

    def loss_fn(model):
        out = model(images)
        loss, parts = set_prediction_loss(
            out["pred_logits"], out["pred_masks"], masks, classes, valid)
        return loss, (out, parts)

    (loss, (out, parts)), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
    params = nnx.state(model, nnx.Param)
    updates, opt_state = TX.update(grads, opt_state, params)
    nnx.update(model, optax.apply_updates(params, updates))
    return nnx.state(model), opt_state, loss, parts, out, grads


@pytest.fixture(scope="module")
def overfit():
    """One image and one person mask (class 0 of num_classes=1), OVERFIT_STEPS Adam steps."""
    h, w = OVERFIT_SIZE
    rng = np.random.default_rng(0)
    mask = _blob_masks(rng, 1, h, w)[0]
    image = rng.uniform(0.0, 0.3, size=(h, w, 3)).astype(np.float32)
    image[mask > 0] += np.array([0.6, 0.4, 0.2], np.float32)  # the person is visible
    images = jnp.asarray(image[None])
    masks, classes, valid = jnp.asarray(mask[None, None]), jnp.zeros((1, 1), jnp.int32), \
        jnp.ones((1, 1), bool)

    model = HybridQueryModel(1, **SIZES["tiny"], rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    opt_state = TX.init(nnx.state(model, nnx.Param))
    state, opt_state, loss, _, out, grads = _train_step(
        graphdef, state, opt_state, images, masks, classes, valid)
    losses = [float(loss)]
    for _ in range(OVERFIT_STEPS - 1):
        state, opt_state, loss, *_ = _train_step(
            graphdef, state, opt_state, images, masks, classes, valid)
        losses.append(float(loss))
    return dict(losses=losses, out=out, grads=grads)


def test_tiny_forward_backward(overfit):
    out = overfit["out"]
    assert out["pred_logits"].shape == (1, SIZES["tiny"]["num_queries"], 2)
    assert out["pred_masks"].shape == (1, SIZES["tiny"]["num_queries"], *OVERFIT_SIZE)
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())
    grads = overfit["grads"]
    parts = {
        "backbone stem": grads["backbone"]["stem"],
        "backbone last stage": grads["backbone"]["stages"][4],
        "fpn lateral5": grads["fpn"]["lateral5"],
        "fpn fuse3": grads["fpn"]["fuse3"],
        "patchify": grads["decoder"]["patchify"],
        "decoder layers": grads["decoder"]["layers"],
        "query_feat": grads["decoder"]["query_feat"],
        "query_embed": grads["decoder"]["query_embed"],
        "class head": grads["decoder"]["class_embed"],
        "mask embedding": grads["decoder"]["mask_embed"],
        "pixel features": grads["decoder"]["mask_features"],
    }
    for name, tree in parts.items():
        leaves = [np.asarray(g) for g in jax.tree.leaves(tree)]  # numpy: no eager compiles
        assert all(np.isfinite(g).all() for g in leaves), name
        assert sum(np.abs(g).sum() for g in leaves) > 0.0, name


def test_tiny_model_overfits_one_image(overfit):
    losses = overfit["losses"]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.1 * losses[0], losses[::10]
