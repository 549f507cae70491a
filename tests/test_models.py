"""Every model through one parametrised base: a table of tiny and full-size builders.

Per model (tiny widths): train-mode forward/backward (every parameter gets a gradient, BatchNorm
uses batch statistics and updates its running ones, dropout acts), an odd input size in eval
mode (running statistics read only, images independent); the full size's parameter count
against the published original via `nnx.eval_shape` (nothing allocated). Adding a model is one
row of MODELS.
"""
import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import ENCODER_COUNTS, param_count

from segjax.models import hybrid, mask2former, roi_head
from segjax.models.semantic_models import SEMANTIC_MODELS

NUM_CLASSES = 5


def _rois(n: int, h: int, w: int) -> jax.Array:
    """One box per image (image i's box reads image i only)."""
    return jnp.array([[i, 2.0, 3.0, w - 5.0, h - 4.0] for i in range(n)], jnp.float32)


@dataclasses.dataclass(frozen=True)
class Row:
    tiny: Callable[[nnx.Rngs], nnx.Module]
    full: Callable[[nnx.Rngs], nnx.Module]
    full_count: int  # parameters of the published original
    call: Callable = lambda model, images: model(images)  # noqa: E731
    dropout: bool = False  # tiny model has active dropout in training mode
    batch_norm: bool = True  # images of a training batch influence each other


def _semantic(name: str, full_count: int, dropout: bool = False) -> Row:
    return Row(lambda rngs: SEMANTIC_MODELS[name](NUM_CLASSES, size="tiny", rngs=rngs),
               lambda rngs: SEMANTIC_MODELS[name](21, rngs=rngs), full_count, dropout=dropout)


def _upblock(cin, cout):
    return 4 * cin * cout + cout + 2 * cout  # UpConv2x kernel + bias, BatchNorm


def _encoder_decoder_count(encoder, num_classes, decoder=(256, 128, 64, 32, 32)):
    """encoder_decoder.py's documented layers, counted by hand on top of the encoder."""
    c1, c4 = (64, 512) if encoder != "resnet50" else (256, 2048)
    d4, d3, d2, d1, d0 = decoder
    return (ENCODER_COUNTS[encoder] + _upblock(c4, d4) + _upblock(d4, d3) + _upblock(d3, d2)
            + 9 * (d2 + c1) * d2 + 2 * d2 + _upblock(d2, d1) + _upblock(d1, d0)
            + d0 * num_classes + num_classes)


def _trained_looking(model: mask2former.Mask2Former) -> mask2former.Mask2Former:
    """transformers initialises the deformable attention's offset and weight projections to zero,
    which leaves the level embedding (added to their input) without a gradient at step 0: give
    them small random kernels, as after any training."""
    for path, module in model.iter_modules():
        if isinstance(module, mask2former.MSDeformAttn):
            for i, linear in enumerate((module.sampling_offsets, module.attention_weights)):
                shape = linear.kernel[...].shape
                linear.kernel[...] = 0.01 * jax.random.normal(jax.random.key(len(path) + i), shape)
    return model


MODELS = {
    "unet": _semantic("unet", 24_439_269),  # smp 0.6 Unet("resnet34", classes=21)
    "deeplabv3": _semantic("deeplabv3", 39_638_869, dropout=True),  # torchvision deeplabv3_resnet50(21, aux_loss=False)
    "fastscnn": _semantic("fastscnn", 1_138_053, dropout=True),  # its documented layers (1,137,795 with 19 classes)
    **{name: _semantic(name, _encoder_decoder_count(name, 21)) for name in ENCODER_COUNTS},
    # The head on its backbone; full size: the published head alone on C=1024 extractor features.
    "roi_human": Row(lambda rngs: roi_head.roi_human_model(**roi_head.SIZES["tiny"], rngs=rngs),
                     lambda rngs: roi_head.roi_human_model(**roi_head.SIZES["full"], backbone=False, rngs=rngs),
                     5_233_667, call=lambda model, images: model(images, _rois(*images.shape[:3]))),
    # timm darknet53 (40,584,928) + FPN + query decoder.
    "hybrid": Row(lambda rngs: hybrid.HybridQueryModel(1, **hybrid.SIZES["tiny"], rngs=rngs),
                  lambda rngs: hybrid.HybridQueryModel(1, **hybrid.SIZES["full"], rngs=rngs), 61_373_794),
    # transformers' Mask2Former Swin-T, 19 classes: 47,407,502 less its unused swin.layernorm (1,536).
    "mask2former": Row(lambda rngs: _trained_looking(mask2former.Mask2Former(
                           NUM_CLASSES, **mask2former.MASK2FORMER_VARIANTS["tiny"], rngs=rngs)),
                       lambda rngs: mask2former.Mask2Former(19, **mask2former.MASK2FORMER_VARIANTS["full"], rngs=rngs),
                       47_407_502 - 1_536, batch_norm=False),
}


def _weighted_sum(outputs, key) -> jax.Array:
    """A loss that reaches every output: each output times fixed random weights."""
    leaves = jax.tree.leaves(outputs)
    keys = jax.random.split(key, len(leaves))
    return sum(jnp.sum(x.astype(jnp.float32) * jax.random.normal(k, x.shape)) for x, k in zip(leaves, keys))


def _jit_per_model(fn):
    """`fn(name, graphdef, *arrays)` jitted once per model and mode, the graphdef closed over (a
    model's graphdef may hold unhashable architecture arguments, so it cannot be a static argument)."""
    compiled = {}

    def call(name, graphdef, *arrays):
        key = (name, id(graphdef))  # the fixtures hold each graphdef for the module's lifetime
        if key not in compiled:
            compiled[key] = jax.jit(functools.partial(fn, name, graphdef))
        return compiled[key](*arrays)

    return call


# One jitted train step and one jitted forward per model: each compiles each once.
@_jit_per_model
def _train_step(name, graphdef, state, images):
    def loss(model):
        outputs = MODELS[name].call(model, images)
        return _weighted_sum(outputs, jax.random.key(0)), outputs

    model = nnx.merge(graphdef, state)
    (_, outputs), grads = nnx.value_and_grad(loss, has_aux=True)(model)
    return outputs, grads, nnx.state(model)


@_jit_per_model
def _forward(name, graphdef, state, images):
    model = nnx.merge(graphdef, state)
    return MODELS[name].call(model, images), nnx.state(model)


def _images(n, h, w, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(size=(n, h, w, 3)), jnp.float32)


def _batch_stats(state):
    return [np.asarray(v) for v in jax.tree.leaves(nnx.filter_state(state, nnx.BatchStat))]


def _first(outputs) -> np.ndarray:
    """Image 0's part of every output, flattened."""
    return np.concatenate([np.asarray(x[0], np.float32).ravel() for x in jax.tree.leaves(outputs)])


@pytest.fixture(scope="module", params=sorted(MODELS))
def tiny(request):
    """(name, train graphdef, eval graphdef, state) of the tiny model."""
    model = MODELS[request.param].tiny(nnx.Rngs(0))
    train_graphdef, state = nnx.split(model)
    model.eval()
    eval_graphdef, _ = nnx.split(model)  # the mode is graph data: split again after switching
    return request.param, train_graphdef, eval_graphdef, state


def test_train_forward_backward(tiny):
    name, graphdef, _, state = tiny
    images = _images(2, 64, 64)
    outputs, grads, new_state = _train_step(name, graphdef, state, images)
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(outputs))

    flat = {"/".join(map(str, path)): np.asarray(g) for path, g in nnx.to_flat_state(grads)}
    assert len(flat) == len(jax.tree.leaves(nnx.filter_state(state, nnx.Param)))
    for path, g in flat.items():
        assert np.isfinite(g).all(), path
        assert np.abs(g).max() > 0, f"{name}: no gradient reaches {path}"

    # Train mode updates every BatchNorm's running statistics.
    for before, after in zip(_batch_stats(state), _batch_stats(new_state)):
        assert not np.array_equal(before, after)

    # BatchNorm uses batch statistics: image 1 changes image 0's outputs (LayerNorm-only models: not).
    other = images.at[1].set(_images(1, 64, 64, seed=1)[0])
    coupled, _, _ = _train_step(name, graphdef, state, other)
    assert MODELS[name].batch_norm == (not np.allclose(_first(coupled), _first(outputs), atol=1e-6))
    # Same state, same input: deterministic; the next step differs only through dropout's rng.
    redo, _, _ = _train_step(name, graphdef, state, images)
    np.testing.assert_array_equal(_first(redo), _first(outputs))
    repeat, _, _ = _train_step(name, graphdef, new_state, images)
    assert MODELS[name].dropout == (not np.allclose(_first(repeat), _first(outputs), atol=1e-6))


def test_eval_odd_size(tiny):
    name, _, graphdef, state = tiny
    images = _images(2, 97, 131)
    outputs, new_state = _forward(name, graphdef, state, images)
    assert all(np.isfinite(np.asarray(x)).all() and x.dtype == jnp.float32 for x in jax.tree.leaves(outputs))
    # Eval mode: running statistics are read, not updated, dropout is off, and images do not
    # influence each other.
    for before, after in zip(_batch_stats(state), _batch_stats(new_state)):
        np.testing.assert_array_equal(before, after)
    other = images.at[1].set(_images(1, 97, 131, seed=1)[0])
    alone, _ = _forward(name, graphdef, new_state, other)
    np.testing.assert_allclose(_first(alone), _first(outputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_full_size_parameter_count(name):
    assert param_count(nnx.eval_shape(lambda: MODELS[name].full(nnx.Rngs(0)))) == MODELS[name].full_count
