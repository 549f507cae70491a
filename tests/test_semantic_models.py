"""The semantic-segmentation models' table and ResNet encoders, plus the resize ops (the shared
per-model tests are in test_models.py)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import ENCODER_COUNTS, param_count

from segjax.models.resnet import RESNETS
from segjax.models.semantic_models import SEMANTIC_MODELS
from segjax.ops.resize import adaptive_avg_pool, resize_bilinear, resize_nearest


def _images(n, h, w, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, h, w, 3)), jnp.float32)


def test_semantic_models_table_rejects_unknown_size():
    with pytest.raises(ValueError, match="tiny"):
        SEMANTIC_MODELS["unet"](21, size="small", rngs=nnx.Rngs(0))


@pytest.mark.parametrize("name", sorted(RESNETS))
def test_resnet_encoder_counts_and_strides(name):
    encoder = nnx.eval_shape(lambda: RESNETS[name](rngs=nnx.Rngs(0)))
    assert param_count(encoder) == ENCODER_COUNTS[name]
    graphdef, state = nnx.split(encoder)
    features = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, _images(1, 97, 131))
    assert [f.shape for f in features] == [
        (1, math.ceil(97 / s), math.ceil(131 / s), c)
        for s, c in zip((2, 4, 8, 16, 32), encoder.out_channels)]


def test_resnet_dilation_keeps_stride_eight():
    encoder = nnx.eval_shape(lambda: RESNETS["resnet50"](
        replace_stride_with_dilation=(False, True, True), rngs=nnx.Rngs(0)))
    assert param_count(encoder) == ENCODER_COUNTS["resnet50"]  # dilation adds no weights
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
