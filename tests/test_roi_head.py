"""ROI mask head, stride-8 backbone and shared layers: shapes, gradients, modes, precision, size."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from segjax.models.layers import IMAGENET_MEAN, IMAGENET_STD, ConvNormAct, ResidualBlock, imagenet_normalize
from segjax.models.roi_head import SIZES, roi_human_model

TINY, FULL, NUM_CLASSES = SIZES["tiny"], SIZES["full"], 3


# One jitted forward and one jitted gradient for every test, so equal shapes and modes compile once.
@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, inputs, rois):
    model = nnx.merge(graphdef, state)
    return model(inputs, rois), nnx.state(model)


def _run(model, inputs, rois):
    """Forward through the shared jit; writes updated BatchNorm statistics back into `model`."""
    graphdef, state = nnx.split(model)
    logits, state = _forward(graphdef, state, inputs, rois)
    nnx.update(model, state)
    return logits


def _tiny_model(dtype=jnp.float32, **kwargs):
    return roi_human_model(**TINY, dtype=dtype, rngs=nnx.Rngs(0), **kwargs)


def _images(n, h, w, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, h, w, 3)), jnp.float32)


def _rois(k, n, h, w, seed=0):
    """K random boxes [batch, x1, y1, x2, y2] inside an h×w image, spread over n images."""
    rng = np.random.default_rng(seed)
    xs = np.sort(rng.uniform(0, w, size=(k, 2)), axis=1)
    ys = np.sort(rng.uniform(0, h, size=(k, 2)), axis=1)
    batch = np.arange(k) % n
    rois = np.stack([batch, xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)
    return jnp.asarray(rois, jnp.float32)


@pytest.fixture(scope="module")
def tiny_model():
    """Never mutated: tests that change mode or statistics work on `nnx.clone(tiny_model)`."""
    return _tiny_model()


@pytest.mark.parametrize("n,h,w,k", [(2, 64, 48, 3), (1, 61, 45, 1)])
def test_forward_shape(tiny_model, n, h, w, k):
    logits = _run(nnx.clone(tiny_model), _images(n, h, w), _rois(k, n, h, w))
    assert logits.shape == (k, 56, 56, NUM_CLASSES)
    assert logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


@pytest.mark.parametrize("h,w", [(64, 48), (61, 45), (57, 33), (9, 17), (8, 8)])
def test_backbone_output_is_ceil_of_stride_eight(tiny_model, h, w):
    graphdef, state = nnx.split(tiny_model.backbone)
    out = jax.eval_shape(lambda s, x: nnx.merge(graphdef, s)(x), state, _images(2, h, w))
    assert out.shape == (2, math.ceil(h / 8), math.ceil(w / 8), TINY["feature_channels"])


def test_batchnorm_train_uses_batch_statistics_eval_running_ones(tiny_model):
    n, h, w, k = 2, 64, 48, 3
    images = _images(n, h, w)
    other = images.at[1].set(_images(1, h, w, seed=1)[0])  # changes image 1 only
    rois = _rois(k, 1, h, w)  # every box on image 0

    def stats(model):
        return [np.asarray(v) for v in jax.tree.leaves(nnx.state(model, nnx.BatchStat))]

    train = nnx.clone(tiny_model)
    before = stats(train)
    train_a, train_b = _run(train, images, rois), _run(train, other, rois)
    assert any(not np.allclose(a, b) for a, b in zip(before, stats(train)))
    # Batch statistics couple the images: image 1 changes the boxes on image 0.
    assert not np.allclose(train_a, train_b, atol=1e-4)

    evaluated = nnx.clone(tiny_model)
    evaluated.eval()
    before = stats(evaluated)
    eval_a, eval_b = _run(evaluated, images, rois), _run(evaluated, other, rois)
    assert all(np.array_equal(a, b) for a, b in zip(before, stats(evaluated)))
    np.testing.assert_allclose(eval_a, eval_b, rtol=1e-6, atol=1e-6)

    evaluated.train()
    np.testing.assert_allclose(_run(evaluated, images, rois), train_a, rtol=1e-5, atol=1e-5)


def test_bfloat16_compute_keeps_float32_state(tiny_model):
    n, h, w, k = 2, 64, 48, 3
    images, rois = _images(n, h, w), _rois(k, n, h, w)
    model = _tiny_model(jnp.bfloat16)
    # Same seeds, so the same float32 parameters as the float32 model.
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                    jax.tree.leaves(nnx.state(tiny_model, nnx.Param))):
        assert a.dtype == jnp.float32
        np.testing.assert_array_equal(a, b)

    logits = _run(model, images, rois)
    assert logits.dtype == jnp.bfloat16
    # Updated running statistics stay float32 too.
    assert {v.dtype for v in jax.tree.leaves(nnx.state(model))} == {jnp.dtype(jnp.float32)}

    reference = np.asarray(_run(nnx.clone(tiny_model), images, rois))
    error = np.abs(np.asarray(logits, np.float32) - reference).max()
    assert error < 0.05 * np.abs(reference).max(), error


def test_head_on_precomputed_features_reads_its_box_only():
    n, hf, wf, c, k = 2, 10, 7, TINY["feature_channels"], 2
    model = _tiny_model(backbone=False)
    features = jax.random.normal(jax.random.key(0), (n, hf, wf, c))
    # Box 0 on image 0 spans image x in [0, 16]: feature columns -0.5..1.5 at stride 8, so
    # bilinear samples touch columns 0-2. Box 1 covers image 1 entirely.
    rois = jnp.array([[0, 0, 8, 16, 60], [1, 0, 0, 8 * wf, 8 * hf]], jnp.float32)
    changed = features.at[0, :, 4:].add(1.0).at[1].add(1.0)

    out, out_changed = _run(model, features, rois), _run(model, changed, rois)
    assert out.shape == (k, 56, 56, NUM_CLASSES)
    np.testing.assert_array_equal(out[0], out_changed[0])
    assert not np.allclose(out[1], out_changed[1], atol=1e-3)

    # Adaptive sampling takes one point per bin on this small map; a fixed ratio of 2 takes four.
    fixed = _tiny_model(backbone=False, sampling_ratio=2)
    assert not np.allclose(_run(fixed, features, rois), out, atol=1e-3)


def _hand_count_head(in_channels, width, fine_width, num_classes):
    """RoiMaskHead's parameters counted from its documented layer list."""
    def conv(k, cin, cout):  # k×k conv or transposed conv, with bias
        return k * k * cin * cout + cout

    def layer_norm(ch):  # scale and bias
        return 2 * ch

    reduce = conv(1, in_channels, width) + layer_norm(width)
    residual_blocks = 2 * 2 * (conv(3, width, width) + layer_norm(width))
    up_to_56 = conv(2, width, width) + conv(3, width, width) + layer_norm(width)
    up_to_112 = (conv(2, width, fine_width) + conv(3, fine_width, fine_width)
                 + layer_norm(fine_width))
    down_to_56 = conv(3, fine_width, width)
    fuse = conv(3, 2 * width, width) + layer_norm(width)
    classifier = conv(1, width, num_classes)
    return reduce + residual_blocks + up_to_56 + up_to_112 + down_to_56 + fuse + classifier


def test_full_size_head_parameter_count_and_shape():
    head = nnx.eval_shape(lambda: roi_human_model(**FULL, backbone=False, rngs=nnx.Rngs(0)).head)
    graphdef, params = nnx.split(head)
    leaves = jax.tree.leaves(params)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)  # nothing allocated
    count = sum(math.prod(x.shape) for x in leaves)
    assert count == _hand_count_head(FULL["feature_channels"], FULL["head_width"], FULL["head_fine_width"],
                                     NUM_CLASSES) == 5_233_667

    features = jax.ShapeDtypeStruct((2, 80, 80, FULL["feature_channels"]), jnp.float32)
    rois = jax.ShapeDtypeStruct((7, 5), jnp.float32)
    out = jax.eval_shape(lambda s, f, r: nnx.merge(graphdef, s)(f, r), params, features, rois)
    assert out.shape == (7, 56, 56, NUM_CLASSES)


@pytest.mark.parametrize("norm,reduce_axes,groups", [
    ("layer", (3,), 1),        # each pixel over its channels
    ("batch", (0, 1, 2), 1),   # each channel over batch and space (training mode)
    ("group", (1, 2, 3), 2),   # each image over space and the channels of a group
])
def test_conv_norm_act_normalises_over_the_right_axes(norm, reduce_axes, groups):
    layer = ConvNormAct(3, 8, 3, norm=norm, act=None, num_groups=2, rngs=nnx.Rngs(0))
    x = 5.0 + 3.0 * jax.random.normal(jax.random.key(0), (4, 6, 5, 3))
    y = np.asarray(layer(x)).reshape(4, 6, 5, groups, 8 // groups)
    axes = tuple(a if a < 3 else 4 for a in reduce_axes)  # channels-within-group is axis 4 now
    np.testing.assert_allclose(y.mean(axis=axes), 0, atol=1e-4)
    np.testing.assert_allclose(y.std(axis=axes), 1, atol=1e-2)


def test_conv_norm_act_stride_activation_and_bad_norm():
    layer = ConvNormAct(3, 4, 3, 2, norm=None, rngs=nnx.Rngs(0))
    y = layer(jax.random.normal(jax.random.key(0), (1, 9, 7, 3)))
    assert y.shape == (1, 5, 4, 4)  # ceil(size / stride)
    assert float(y.min()) == 0.0  # ReLU by default
    paths = {path for path, _ in nnx.to_flat_state(nnx.state(layer))}
    assert paths == {("conv", "kernel"), ("conv", "bias")}  # no norm parameters
    with pytest.raises(ValueError, match="unknown norm"):
        ConvNormAct(3, 4, norm="instance", rngs=nnx.Rngs(0))


def test_residual_block_adds_its_input():
    block = ResidualBlock(4, norm="layer", rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(0), (1, 5, 5, 4))
    assert not np.allclose(block(x), nnx.relu(x))
    # With the second branch silenced, only the shortcut is left.
    block.conv2.norm.scale[...] = jnp.zeros(4)
    np.testing.assert_allclose(block(x), nnx.relu(x), atol=1e-6)


def test_backbone_applies_imagenet_normalisation(tiny_model):
    mean, std = jnp.array(IMAGENET_MEAN), jnp.array(IMAGENET_STD)
    images = jnp.stack([jnp.broadcast_to(mean, (2, 3, 3)), jnp.broadcast_to(mean + std, (2, 3, 3))])
    out = imagenet_normalize(images)
    np.testing.assert_allclose(out[0], 0, atol=1e-6)
    np.testing.assert_allclose(out[1], 1, atol=1e-5)

    # At initialisation (zero biases, running mean 0 / variance 1) the eval-mode backbone maps
    # an all-zero normalised image to exactly zero, so the mean colour must give zero features.
    backbone = nnx.clone(tiny_model.backbone)
    backbone.eval()
    features = backbone(jnp.broadcast_to(mean, (1, 16, 16, 3)))
    np.testing.assert_allclose(features, 0, atol=1e-6)
    assert np.abs(np.asarray(backbone(jnp.full((1, 16, 16, 3), 0.5)))).max() > 1e-3


def test_upconv2x_is_a_pytorch_style_transposed_convolution():
    from segjax.models.layers import UpConv2x

    up = UpConv2x(3, 4, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 5, 6, 3))
    y = up(x)
    kernel, bias = np.asarray(up.kernel[...]), np.asarray(up.bias[...])
    assert y.shape == (2, 10, 12, 4)
    # PyTorch's definition, written out: input pixel (i, j) fills block (2i+a, 2j+b) with x @ W[a, b].
    xn = np.asarray(x)
    for a in range(2):
        for b in range(2):
            np.testing.assert_allclose(np.asarray(y[:, a::2, b::2]), xn @ kernel[a, b] + bias, atol=1e-5)
    # flax's ConvTranspose computes the same with the kernel flipped spatially.
    reference = nnx.ConvTranspose(3, 4, (2, 2), (2, 2), padding="VALID", rngs=nnx.Rngs(0))
    reference.kernel[...] = jnp.asarray(kernel[::-1, ::-1])
    reference.bias[...] = jnp.asarray(bias)
    np.testing.assert_allclose(np.asarray(reference(x)), np.asarray(y), atol=1e-5)
