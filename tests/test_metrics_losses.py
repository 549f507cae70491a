"""Confusion-matrix metrics, the shared losses and the optimizer built from an OptimConfig,
each against a hand or independent numpy computation."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from segjax.config import OptimConfig
from segjax.engine.optim import make_optimizer
from segjax.losses import soft_dice_loss, weighted_cross_entropy
from segjax.metrics import confusion_matrix, summarize_confusion

IGNORE = 255


# --- metrics -------------------------------------------------------------------------------------
TARGET = np.array([[0, 0, 1, 1],
                   [2, IGNORE, 1, 0]])
PRED = np.array([[0, 1, 1, 1],
                 [2, 0, 0, 2]])
VALID = np.array([[True, True, True, True],
                  [True, True, True, False]])


def test_confusion_matrix_counts_target_rows_prediction_columns():
    # Counted (target, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (1,0); the 255 pixel and the invalid
    # (0,2) pixel are not.
    expected = np.array([[1, 1, 0],
                         [1, 2, 0],
                         [0, 0, 1]])
    cm = confusion_matrix(jnp.asarray(TARGET), jnp.asarray(PRED), 3, jnp.asarray(VALID), ignore_index=IGNORE)
    assert cm.dtype == jnp.int32
    np.testing.assert_array_equal(cm, expected)
    jitted = jax.jit(functools.partial(confusion_matrix, num_classes=3, ignore_index=IGNORE))
    np.testing.assert_array_equal(jitted(TARGET, PRED, valid=VALID), expected)
    # Without the mask the (0,2) pixel counts.
    expected[0, 2] += 1
    np.testing.assert_array_equal(confusion_matrix(TARGET, PRED, 3, ignore_index=IGNORE), expected)


def test_confusion_matrix_ignore_index_inside_the_class_range():
    # ignore_index=0 drops the three pixels whose target is 0, whatever they predicted.
    cm = confusion_matrix(jnp.asarray(TARGET), jnp.asarray(PRED), 3, ignore_index=0)
    np.testing.assert_array_equal(cm, [[0, 0, 0],
                                       [1, 2, 0],
                                       [0, 0, 1]])


def test_confusion_matrix_drops_targets_outside_the_classes():
    target = jnp.array([0, 1, 7, -1, IGNORE], jnp.int32)
    pred = jnp.array([0, 1, 1, 1, 1], jnp.int32)
    np.testing.assert_array_equal(confusion_matrix(target, pred, 2), [[1, 0], [0, 1]])


def test_confusion_matrix_per_item_mask_broadcasts():
    # As the tasks pass it: targets [K, H, W], one valid flag per item as [K, 1, 1].
    target = jnp.stack([jnp.asarray(TARGET), jnp.zeros((2, 4), jnp.int32)])
    pred = jnp.stack([jnp.asarray(PRED), jnp.ones((2, 4), jnp.int32)])
    valid = jnp.array([True, False])[:, None, None]
    cm = confusion_matrix(target, pred, 3, valid, ignore_index=IGNORE)
    np.testing.assert_array_equal(cm, [[1, 1, 1],
                                       [1, 2, 0],
                                       [0, 0, 1]])


def test_summarize_confusion_by_hand():
    cm = np.array([[5, 1, 0, 2],
                   [2, 3, 0, 0],
                   [0, 0, 0, 0],   # "b": in neither target nor prediction
                   [0, 0, 0, 0]])  # "c": predicted twice, never in the target
    out = summarize_confusion(cm, ["bg", "a", "b", "c"])
    # IoU = TP / (target + pred - TP): bg 5/(8+7-5), a 3/(5+4-3), c 0/(0+2-0); b undefined.
    assert out["iou_bg"] == pytest.approx(0.5)
    assert out["iou_a"] == pytest.approx(0.5)
    assert out["iou_c"] == 0.0
    assert np.isnan(out["iou_b"])
    assert out["miou"] == pytest.approx(1 / 3)
    # Dice = 2 TP / (target + pred): bg 10/15, a 6/9, c 0.
    assert out["mdice"] == pytest.approx(4 / 9)
    assert out["pixel_accuracy"] == pytest.approx(8 / 13)  # trace / all 13 pixels
    assert out["absent_classes"] == ["b"]


def test_summarize_confusion_of_nothing():
    out = summarize_confusion(np.zeros((2, 2), np.int64), ["x", "y"])
    assert np.isnan(out["miou"]) and np.isnan(out["mdice"])
    assert out["pixel_accuracy"] == 0.0
    assert out["absent_classes"] == ["x", "y"]


# --- losses --------------------------------------------------------------------------------------
def torch_style_cross_entropy(logits, target, class_weights, ignore_index):
    """F.cross_entropy(weight=class_weights, ignore_index=..., reduction="mean") in numpy:
    sum over kept pixels of w[t] * nll / sum of w[t]; and its gradient w.r.t. the logits."""
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    kept = target != ignore_index
    t = np.where(kept, target, 0)
    w = np.where(kept, class_weights[t], 0.0)
    nll = -np.take_along_axis(log_probs, t[..., None], -1)[..., 0]
    loss = (w * nll).sum() / w.sum()
    one_hot = np.eye(logits.shape[-1])[t]
    grad = (np.exp(log_probs) - one_hot) * (w / w.sum())[..., None]
    return loss, w.sum(), grad


def random_case(seed=0, shape=(3, 5, 6), num_classes=4):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, (*shape, num_classes)).astype(np.float32)
    target = rng.integers(0, num_classes, shape)
    target[rng.random(shape) < 0.2] = IGNORE
    return logits, target


def test_weighted_cross_entropy_matches_pytorch_semantics():
    logits, target = random_case()
    class_weights = np.array([0.2, 1.0, 3.0, 0.5], np.float32)
    expected_loss, expected_total, expected_grad = torch_style_cross_entropy(logits, target, class_weights, IGNORE)

    def loss_fn(x):
        return weighted_cross_entropy(x, jnp.asarray(target), jnp.asarray(target != IGNORE), jnp.asarray(class_weights))

    (loss, total), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(logits))
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(total, expected_total, rtol=1e-6)
    assert np.isfinite(grad).all()
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-4, atol=1e-7)
    assert not np.asarray(grad)[target == IGNORE].any()


def test_weighted_cross_entropy_item_mask_and_no_class_weights():
    logits, target = random_case(seed=1)
    item_valid = np.array([True, False, True])
    ignored = np.where(item_valid[:, None, None], target, IGNORE)
    expected_loss, expected_total, _ = torch_style_cross_entropy(logits, ignored, np.ones(4), IGNORE)
    # A mask of shape [K, 1, 1] as the tasks pass it; ignore pixels masked separately.
    mask = jnp.asarray(item_valid)[:, None, None] & jnp.asarray(target != IGNORE)
    loss, total = weighted_cross_entropy(jnp.asarray(logits, jnp.bfloat16), jnp.asarray(target), mask)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, expected_loss, rtol=2e-2)
    assert total == expected_total


def test_weighted_cross_entropy_with_every_weight_zero():
    logits, target = random_case(seed=2)

    def loss_fn(x):
        return weighted_cross_entropy(x, jnp.asarray(target), jnp.zeros(target.shape, bool),
                                      jnp.ones(4, jnp.float32))

    (loss, total), grad = jax.value_and_grad(loss_fn, has_aux=True)(jnp.asarray(logits))
    assert (float(loss), float(total)) == (0.0, 0.0)
    assert np.isfinite(grad).all() and not np.asarray(grad).any()


DICE_PROBS = np.array([[[1.0, 0.5], [0.0, 0.5]],
                       [[0.3, 0.3], [0.3, 0.3]],
                       [[0.0, 0.0], [0.0, 0.0]]], np.float32)
DICE_TARGET = np.array([[[1, 1], [0, 0]],
                        [[1, 1], [1, 1]],
                        [[0, 0], [0, 1]]], bool)


@pytest.mark.parametrize("weight, eps, expected", [
    # Per item 1 - (2 inter + eps) / (|P| + |T| + eps):
    # item 0: inter 1.5, |P| 2, |T| 2; item 1: inter 1.2, |P| 1.2, |T| 4; item 2: inter 0, |P| 0, |T| 1.
    ([1, 1, 1], 1.0, ((1 - 4 / 5) + (1 - 3.4 / 6.2) + (1 - 1 / 2)) / 3),
    ([1, 0, 1], 1.0, ((1 - 4 / 5) + (1 - 1 / 2)) / 2),
    ([2, 0, 1], 1.0, (2 * (1 - 4 / 5) + (1 - 1 / 2)) / 3),
    ([1, 0, 0], 0.0, 1 - 3 / 4),
])
def test_soft_dice_loss_by_hand(weight, eps, expected):
    loss = soft_dice_loss(jnp.asarray(DICE_PROBS), jnp.asarray(DICE_TARGET), jnp.asarray(weight), eps=eps)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(loss, expected, rtol=1e-6)


def test_soft_dice_loss_with_every_weight_zero():
    grad_fn = jax.value_and_grad(lambda p: soft_dice_loss(p, jnp.asarray(DICE_TARGET), jnp.zeros(3, bool)))
    loss, grad = grad_fn(jnp.asarray(DICE_PROBS))
    assert float(loss) == 0.0
    assert np.isfinite(grad).all() and not np.asarray(grad).any()


# --- optimizer -----------------------------------------------------------------------------------
def plain_sgd(**changes) -> OptimConfig:
    return dataclasses.replace(OptimConfig(optimizer="sgd", lr=0.1, momentum=0.0, weight_decay=0.0,
                                           scheduler="none"), **changes)


def lrs(schedule, n):
    return np.array([float(schedule(i)) for i in range(n)])


def test_cosine_schedule_reaches_min_lr_at_the_end():
    _, schedule = make_optimizer(plain_sgd(scheduler="cosine", min_lr=0.01), steps_per_epoch=5, epochs=4)
    values = lrs(schedule, 21)
    assert values[0] == pytest.approx(0.1)
    assert values[10] == pytest.approx(0.055)  # halfway: the mean of lr and min_lr
    assert values[20] == pytest.approx(0.01)
    assert (np.diff(values) < 0).all()


def test_step_schedule_decays_every_step_epochs():
    _, schedule = make_optimizer(plain_sgd(scheduler="step", step_epochs=2, gamma=0.5), steps_per_epoch=5, epochs=6)
    epoch = np.arange(30) // 5
    np.testing.assert_allclose(lrs(schedule, 30), 0.1 * 0.5 ** (epoch // 2), rtol=1e-6)


def test_exponential_schedule_decays_per_epoch_in_updates():
    # 10 micro-batches per epoch accumulated 2 at a time: 5 updates per epoch.
    _, schedule = make_optimizer(plain_sgd(scheduler="exponential", gamma=0.9, gradient_accumulation=2),
                                 steps_per_epoch=10, epochs=4)
    epoch = np.arange(20) // 5
    np.testing.assert_allclose(lrs(schedule, 20), 0.1 * 0.9 ** epoch, rtol=1e-6)


def test_no_schedule_is_constant():
    _, schedule = make_optimizer(plain_sgd(scheduler="none"), steps_per_epoch=5, epochs=4)
    np.testing.assert_allclose(lrs(schedule, 40), 0.1, rtol=1e-7)


def test_updates_follow_the_schedule():
    tx, _ = make_optimizer(plain_sgd(scheduler="exponential", gamma=0.5), steps_per_epoch=2, epochs=3)
    params = {"w": jnp.zeros(2)}
    state = tx.init(params)
    grads = {"w": jnp.array([1.0, -2.0])}
    steps = []
    for _ in range(5):
        updates, state = tx.update(grads, state, params)
        steps.append(np.asarray(updates["w"]))
    expected = [-0.1 * 0.5 ** (i // 2) * np.array([1.0, -2.0]) for i in range(5)]
    np.testing.assert_allclose(steps, expected, rtol=1e-6)


def test_optimizer_kinds():
    params = {"w": jnp.ones(1)}
    grads = {"w": jnp.ones(1)}

    def first_two(**changes):
        tx, _ = make_optimizer(plain_sgd(**changes), steps_per_epoch=1, epochs=1)
        state = tx.init(params)
        first, state = tx.update(grads, state, params)
        second, _ = tx.update(grads, state, params)
        return float(first["w"][0]), float(second["w"][0])

    # SGD as torch.optim.SGD: g + wd * p into a momentum buffer v = m v + g.
    assert first_two(momentum=0.9, weight_decay=0.1) == pytest.approx((-0.11, -0.11 * 1.9))
    # AdamW decays decoupled from the normalised step; Adam adds wd * p to the gradient first.
    assert first_two(optimizer="adamw", weight_decay=0.1)[0] == pytest.approx(-0.1 - 0.1 * 0.1, rel=1e-5)
    assert first_two(optimizer="adam", weight_decay=0.1)[0] == pytest.approx(-0.1, rel=1e-5)


def test_gradient_clip_bounds_the_global_norm():
    tx, _ = make_optimizer(plain_sgd(lr=1.0, gradient_clip=0.5), steps_per_epoch=1, epochs=1)
    params = {"a": jnp.zeros(3), "b": jnp.zeros(())}
    big = {"a": jnp.array([30.0, 0.0, -40.0]), "b": jnp.array(0.0)}  # norm 50
    updates, state = tx.update(big, tx.init(params), params)
    assert float(optax.global_norm(updates)) == pytest.approx(0.5)
    np.testing.assert_allclose(updates["a"], [-0.3, 0.0, 0.4], rtol=1e-6)
    small = {"a": jnp.array([0.1, 0.0, 0.0]), "b": jnp.array(-0.2)}  # norm < 0.5: unchanged
    updates, _ = tx.update(small, state, params)
    np.testing.assert_allclose(updates["a"], [-0.1, 0.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(updates["b"], 0.2, rtol=1e-6)


def test_gradient_accumulation_updates_every_k_steps():
    tx, _ = make_optimizer(plain_sgd(gradient_accumulation=3), steps_per_epoch=6, epochs=1)
    model = nnx.Linear(2, 1, rngs=nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    rng = np.random.default_rng(0)
    batches = [(rng.normal(size=(4, 2)).astype(np.float32), rng.normal(size=(4, 1)).astype(np.float32))
               for _ in range(6)]

    def loss_fn(m, x, y):
        return jnp.mean((m(x) - y) ** 2)

    kernel = np.asarray(model.kernel[...])
    pending = []
    for i, (x, y) in enumerate(batches):
        grads = nnx.grad(loss_fn)(model, x, y)
        pending.append(np.asarray(grads["kernel"][...]))
        optimizer.update(model, grads)
        if (i + 1) % 3:
            np.testing.assert_array_equal(model.kernel[...], kernel)
        else:
            # One SGD step with the mean of the accumulated gradients.
            np.testing.assert_allclose(model.kernel[...], kernel - 0.1 * np.mean(pending, axis=0), rtol=1e-5)
            kernel = np.asarray(model.kernel[...])
            pending = []
