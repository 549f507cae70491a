"""Resizing and adaptive pooling of NHWC maps with PyTorch's index rules, as matrix contractions.

Bilinear resizing and adaptive average pooling are separable: each output row is a fixed
weighted sum of input rows, and likewise for columns, so ``y = Mh · x · Mwᵀ`` per image and
channel with small constant matrices built in numpy from the static shapes. Written as one
einsum this is exact, differentiable, and exports through jax2onnx with a dynamic batch, which
`jax.image.resize` does not (see STACK_NOTES). Nearest resizing is a gather with constant
indices instead: a one-hot contraction would cost more than the convolutions around it.
ONNX export (segjax.export.onnx) swaps `_bilinear` for one ONNX `Resize`, which onnxruntime runs
several times faster than the three-operand Einsum; JAX programs always use the einsum.
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np


def _size(size, name: str) -> tuple[int, int]:
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ValueError(f"{name} must be two positive ints, got {tuple(size)}")
    return h, w


@functools.cache
def _bilinear_matrix(in_len: int, out_len: int) -> np.ndarray:
    """[out_len, in_len] weights of PyTorch's bilinear rule with `align_corners=False`.

    Output pixel i samples the input at ``(i + 0.5) * in_len / out_len - 0.5`` (half-pixel
    centres), clamped to the first and last input pixel. No antialiasing when shrinking.
    """
    source = np.maximum((np.arange(out_len) + 0.5) * (in_len / out_len) - 0.5, 0.0)
    low = np.minimum(np.floor(source).astype(np.int64), in_len - 1)
    high = np.minimum(low + 1, in_len - 1)
    frac = source - low
    matrix = np.zeros((out_len, in_len))
    rows = np.arange(out_len)
    np.add.at(matrix, (rows, low), 1.0 - frac)
    np.add.at(matrix, (rows, high), frac)  # high == low at the last pixel: weights still sum to 1
    return matrix


@functools.cache
def _average_matrix(in_len: int, out_len: int) -> np.ndarray:
    """[out_len, in_len] weights of PyTorch's adaptive average pooling along one axis.

    Bin i averages input pixels ``floor(i * in / out) <= j < ceil((i + 1) * in / out)``; bins
    overlap when `in_len` is not a multiple of `out_len`, and repeat pixels when out > in.
    """
    matrix = np.zeros((out_len, in_len))
    for i in range(out_len):
        start = (i * in_len) // out_len
        end = -((-(i + 1) * in_len) // out_len)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


@functools.cache
def _nearest_indices(in_len: int, out_len: int) -> np.ndarray:
    """PyTorch's `mode="nearest"` source index: ``min(floor(i * (in / out)), in - 1)``.

    PyTorch computes the scale and the product in float32, so we do too; this rule is not
    `jax.image.resize(method="nearest")`, which matches torch's "nearest-exact" instead.
    """
    scale = np.float32(in_len) / np.float32(out_len)
    index = np.floor(np.arange(out_len, dtype=np.float32) * scale).astype(np.int64)
    return np.minimum(index, in_len - 1)


def _separable(x: jax.Array, rows: np.ndarray, cols: np.ndarray) -> jax.Array:
    return jnp.einsum("nhwc,Hh,Ww->nHWc", x, jnp.asarray(rows, x.dtype), jnp.asarray(cols, x.dtype))


def resize_bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Bilinear resize of [N, H, W, C] to [N, *size, C].

    Same result as PyTorch's ``F.interpolate(mode="bilinear", align_corners=False)`` and
    ``jax.image.resize(method="bilinear", antialias=False)``, shrinking included.
    """
    out_h, out_w = _size(size, "size")
    if x.shape[1:3] == (out_h, out_w):
        return x
    return _bilinear(x, (out_h, out_w))


def _bilinear(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """resize_bilinear's computation; ONNX export replaces this module attribute while it traces."""
    _, h, w, _ = x.shape
    return _separable(x, _bilinear_matrix(h, size[0]), _bilinear_matrix(w, size[1]))


def resize_nearest(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """Nearest resize of [N, H, W, C] to [N, *size, C] as PyTorch's ``F.interpolate(size=size)``
    (default `mode="nearest"`), which smp's U-Net decoder uses."""
    out_h, out_w = _size(size, "size")
    _, h, w, _ = x.shape
    if (h, w) == (out_h, out_w):
        return x
    x = jnp.take(x, _nearest_indices(h, out_h), axis=1)
    return jnp.take(x, _nearest_indices(w, out_w), axis=2)


def adaptive_avg_pool(x: jax.Array, size: tuple[int, int]) -> jax.Array:
    """PyTorch's ``adaptive_avg_pool2d`` of [N, H, W, C] to [N, *size, C] bins."""
    out_h, out_w = _size(size, "size")
    _, h, w, _ = x.shape
    return _separable(x, _average_matrix(h, out_h), _average_matrix(w, out_w))
