"""Every semantic-segmentation model through one parametrised base, plus the resize ops.

Per architecture (tiny widths): train-mode forward/backward, odd input size in eval mode,
BatchNorm/Dropout behaviour in each mode; full-size parameter counts against the PyTorch
originals via `nnx.eval_shape` (nothing allocated).
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segjax.models.resnet import RESNETS
from segjax.models.semantic_models import SEMANTIC_MODELS
from segjax.ops.resize import adaptive_avg_pool, resize_bilinear, resize_nearest

NUM_CLASSES = 5
WITH_DROPOUT = {"deeplabv3", "fastscnn"}


# One jitted train step and one jitted forward for every test: each model compiles each once.
@functools.partial(jax.jit, static_argnums=0)
def _train_step(graphdef, state, images, weights):
    def loss(model):
        logits = model(images)
        return jnp.sum(logits.astype(jnp.float32) * weights), logits

    model = nnx.merge(graphdef, state)
    (_, logits), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return logits, grads, nnx.state(model)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, images):
    model = nnx.merge(graphdef, state)
    return model(images), nnx.state(model)


def _images(n, h, w, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, h, w, 3)), jnp.float32)


def _batch_stats(state):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.filter_state(state, nnx.BatchStat))]


@pytest.fixture(scope="module", params=sorted(SEMANTIC_MODELS))
def tiny(request):
    """(name, graphdef, state) of the tiny model in train mode, and its eval-mode graphdef."""
    model = SEMANTIC_MODELS[request.param](NUM_CLASSES, size="tiny", rngs=nnx.Rngs(0))
    train_graphdef, state = nnx.split(model)
    model.eval()
    eval_graphdef, _ = nnx.split(model)  # the mode is graph data: split again after switching
    return request.param, train_graphdef, eval_graphdef, state


def test_train_forward_backward(tiny):
    name, graphdef, _, state = tiny
    images = _images(2, 64, 64)
    weights = jax.random.normal(jax.random.key(0), (2, 64, 64, NUM_CLASSES))
    logits, grads, new_state = _train_step(graphdef, state, images, weights)
    assert logits.shape == (2, 64, 64, NUM_CLASSES)
    assert np.isfinite(np.asarray(logits)).all()

    flat = {"/".join(map(str, path)): np.asarray(g) for path, g in nnx.to_flat_state(grads)}
    assert len(flat) == len(jax.tree.leaves(nnx.filter_state(state, nnx.Param)))
    for path, g in flat.items():
        assert np.isfinite(g).all(), path
        assert np.abs(g).max() > 0, f"{name}: no gradient reaches {path}"

    # Train mode updates every BatchNorm's running statistics.
    for before, after in zip(_batch_stats(state), _batch_stats(new_state)):
        assert not np.array_equal(before, after)

    # BatchNorm uses batch statistics: image 1 changes image 0's logits.
    other = images.at[1].set(_images(1, 64, 64, seed=1)[0])
    coupled, _, _ = _train_step(graphdef, state, other, weights)
    assert not np.allclose(coupled[0], logits[0], atol=1e-4)

    # The same state gives the same output; the next state differs from it only in running
    # statistics (unused in train mode) and the dropout RNG, which draws a fresh mask.
    redo, _, _ = _train_step(graphdef, state, images, weights)
    np.testing.assert_array_equal(redo, logits)
    repeat, _, _ = _train_step(graphdef, new_state, images, weights)
    assert (name in WITH_DROPOUT) == (not np.allclose(repeat, logits, atol=1e-6))


def test_eval_odd_size(tiny):
    name, _, graphdef, state = tiny
    images = _images(2, 97, 131)
    logits, new_state = _forward(graphdef, state, images)
    assert logits.shape == (2, 97, 131, NUM_CLASSES)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()
    # Eval mode: running statistics are read, not updated, dropout is off, and images do not
    # influence each other.
    for before, after in zip(_batch_stats(state), _batch_stats(new_state)):
        np.testing.assert_array_equal(before, after)
    other = images.at[1].set(_images(1, 97, 131, seed=1)[0])
    alone, _ = _forward(graphdef, new_state, other)
    np.testing.assert_allclose(alone[0], logits[0], rtol=1e-5, atol=1e-5)


def _upblock(cin, cout):
    return 4 * cin * cout + cout + 2 * cout  # UpConv2x kernel + bias, BatchNorm


def _encoder_decoder_count(encoder, num_classes, decoder=(256, 128, 64, 32, 32)):
    """encoder_decoder.py's documented layers, counted by hand on top of the encoder."""
    c1, c4 = (64, 512) if encoder != "resnet50" else (256, 2048)
    d4, d3, d2, d1, d0 = decoder
    return (ENCODER_COUNTS[encoder] + _upblock(c4, d4) + _upblock(d4, d3) + _upblock(d3, d2)
            + 9 * (d2 + c1) * d2 + 2 * d2 + _upblock(d2, d1) + _upblock(d1, d0)
            + d0 * num_classes + num_classes)


# torchvision resnet18/34/50 without fc.
ENCODER_COUNTS = {"resnet18": 11_176_512, "resnet34": 21_284_672, "resnet50": 23_508_032}
FULL_COUNTS = {
    "unet": 24_439_269,  # smp 0.6 Unet("resnet34", classes=21)
    "deeplabv3": 39_638_869,  # torchvision deeplabv3_resnet50(num_classes=21, aux_loss=False)
    "fastscnn": 1_138_053,  # fast_scnn.py's documented layers (1,137,795 with 19 classes)
    **{name: _encoder_decoder_count(name, 21) for name in ENCODER_COUNTS},
}


def _param_count(model):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


@pytest.mark.parametrize("name", sorted(SEMANTIC_MODELS))
def test_full_size_parameter_count(name):
    model = nnx.eval_shape(lambda: SEMANTIC_MODELS[name](21, rngs=nnx.Rngs(0)))
    assert _param_count(model) == FULL_COUNTS[name]


def test_semantic_models_table_rejects_unknown_size():
    with pytest.raises(ValueError, match="tiny"):
        SEMANTIC_MODELS["unet"](21, size="small", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_resnet_encoder_counts_and_strides(name):
    encoder = nnx.eval_shape(lambda: RESNETS[name](rngs=nnx.Rngs(0)))
    assert _param_count(encoder) == ENCODER_COUNTS[name]
    graphdef, state = nnx.split(encoder)
    features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, _images(1, 97, 131))
    assert [f.shape for f in features] == [
        (1, math.ceil(97 / s), math.ceil(131 / s), c)
        for s, c in zip((2, 4, 8, 16, 32), encoder.out_channels)]


def test_resnet_dilation_keeps_stride_eight():
    encoder = nnx.eval_shape(lambda: RESNETS["resnet50"](
        replace_stride_with_dilation=(False, True, True), rngs=nnx.Rngs(0)))
    assert _param_count(encoder) == ENCODER_COUNTS["resnet50"]  # dilation adds no weights
    assert encoder.layer4[0].conv2.kernel_dilation == 2  # the first block keeps layer3's
    assert encoder.layer4[1].conv2.kernel_dilation == 4
    graphdef, state = nnx.split(encoder)
    features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, _images(1, 97, 131))
    assert [f.shape[1:3] for f in features] == [(49, 66), (25, 33), (13, 17), (13, 17), (13, 17)]


# ---- resize ops -------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(26, 34), (13, 17), (5, 7), (97, 131), (1, 1), (3, 40)])
def test_resize_bilinear_matches_jax_image_resize(size):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 13, 17, 3)), jnp.float32)
    expected = jax.image.resize(x, (2, *size, 3), "bilinear", antialias=False)
    np.testing.assert_allclose(resize_bilinear(x, size), expected, rtol=1e-5, atol=1e-5)


def test_resize_bilinear_from_one_pixel_broadcasts_and_keeps_dtype():
    x = jnp.arange(6, dtype=jnp.bfloat16).reshape(2, 1, 1, 3)
    y = resize_bilinear(x, (4, 5))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_array_equal(y, jnp.broadcast_to(x, (2, 4, 5, 3)))


@pytest.mark.parametrize("in_len,out_len,expected", [
    (3, 5, [0, 0, 1, 1, 2]),  # PyTorch F.interpolate(mode="nearest") source rows
    (5, 3, [0, 1, 3]),
    (4, 7, [0, 0, 1, 1, 2, 2, 3]),
    (3, 6, [0, 0, 1, 1, 2, 2]),
])
def test_resize_nearest_uses_pytorch_rule(in_len, out_len, expected):
    x = jnp.arange(in_len, dtype=jnp.float32).reshape(1, in_len, 1, 1)
    np.testing.assert_array_equal(resize_nearest(x, (out_len, 1))[0, :, 0, 0], expected)
    np.testing.assert_array_equal(
        resize_nearest(jnp.swapaxes(x, 1, 2), (1, out_len))[0, 0, :, 0], expected)


def _adaptive_avg_pool_reference(x, out_h, out_w):
    """PyTorch's bin rule written plainly: bin i covers [floor(i*H/h), ceil((i+1)*H/h))."""
    n, h, w, c = x.shape
    out = np.zeros((n, out_h, out_w, c))
    for i in range(out_h):
        r0, r1 = math.floor(i * h / out_h), math.ceil((i + 1) * h / out_h)
        for j in range(out_w):
            c0, c1 = math.floor(j * w / out_w), math.ceil((j + 1) * w / out_w)
            out[:, i, j] = x[:, r0:r1, c0:c1].mean(axis=(1, 2))
    return out


@pytest.mark.parametrize("in_size,out_size", [
    ((13, 17), (1, 1)), ((13, 17), (2, 2)), ((13, 17), (3, 3)), ((13, 17), (6, 6)),
    ((2, 4), (6, 6)), ((7, 5), (3, 2)), ((12, 12), (6, 4))])
def test_adaptive_avg_pool_matches_reference(in_size, out_size):
    x = np.random.default_rng(0).normal(size=(2, *in_size, 3))
    y = adaptive_avg_pool(jnp.asarray(x, jnp.float32), out_size)
    np.testing.assert_allclose(y, _adaptive_avg_pool_reference(x, *out_size), rtol=1e-5, atol=1e-6)
