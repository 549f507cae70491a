"""Shared convolutional bricks for segjax models (NHWC).

Every brick takes `dtype` (the compute dtype) and `param_dtype` (the storage dtype of
parameters and norm statistics), so mixed precision is `dtype=jnp.bfloat16,
param_dtype=jnp.float32` everywhere.
"""
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax import lax

from segjax.ops.depthwise import depthwise_conv2d

# PyTorch's defaults (eps 1e-5, BatchNorm momentum 0.1 == Flax momentum 0.9), so that imported
# PyTorch weights and statistics behave as they did in PyTorch. Variances are two-pass, as in
# PyTorch: flax's fast E[x^2]-E[x]^2 cancels badly and made sharded steps differ by ~1e-4.
NORM_EPSILON = 1e-5
BATCH_NORM_MOMENTUM = 0.9

NORMS = ("batch", "layer", "group", None)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_normalize(images: jax.Array) -> jax.Array:
    """RGB images in [0, 1] (NHWC) to ImageNet-standardised float32."""
    images = images.astype(jnp.float32)
    return (images - jnp.array(IMAGENET_MEAN)) / jnp.array(IMAGENET_STD)


def conv2d(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
           feature_group_count=1, precision=None, **kwargs) -> jax.Array:
    """`lax.conv_general_dilated` for `nnx.Conv` (its `conv_general_dilated` argument), with two
    kinds of convolution that XLA:CPU runs several times slower than PyTorch written another way
    (tools/repro_conv_backward.py): a 1×1 stride-1 convolution as a matrix product (its filter
    gradient is then one GEMM, without transposing the activations), and a depthwise one
    (`feature_group_count` = channels in = channels out) as shifted multiply-adds
    (`ops.depthwise`). Same results up to float32 summation order; NHWC / HWIO only."""
    height, width, per_group, out_features = rhs.shape
    plain = tuple(lhs_dilation or (1, 1)) == (1, 1) and tuple(dimension_numbers.lhs_spec) == (0, 3, 1, 2)
    zero_padding = padding in ("SAME", "VALID") or all(tuple(p) == (0, 0) for p in padding)
    if plain and (height, width) == (1, 1) and tuple(window_strides) == (1, 1) and feature_group_count == 1 \
            and zero_padding:
        return jnp.einsum("nhwc,co->nhwo", lhs, rhs[0, 0], precision=precision)
    strides, dilation = set(window_strides), set(rhs_dilation or (1,))
    if (plain and height == width and per_group == 1 and feature_group_count == lhs.shape[-1] == out_features
            and len(strides) == 1 and len(dilation) == 1 and not isinstance(padding, str)
            and len({p for pair in padding for p in pair}) == 1):
        return depthwise_conv2d(lhs, rhs, strides.pop(), dilation.pop(), padding[0][0])
    return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                    dimension_numbers, feature_group_count, precision=precision, **kwargs)


# nnx.Conv with the faster paths above; parameters, names and initialisation as nnx.Conv.
Conv = functools.partial(nnx.Conv, conv_general_dilated=conv2d)


def max_pool2d(x: jax.Array, kernel_size: int, strides: int, padding: int = 0) -> jax.Array:
    """PyTorch's `MaxPool2d(kernel_size, strides, padding)` on NHWC.

    Padded cells are -inf, as in PyTorch. The padding is an explicit pad before a VALID pool
    because jax2onnx drops `max_pool`'s own padding (wrong output shape).
    """
    if padding:
        x = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)),
                    constant_values=-jnp.inf)
    return nnx.max_pool(x, window_shape=(kernel_size, kernel_size), strides=(strides, strides),
                        padding="VALID")


class BatchNorm(nnx.BatchNorm):
    """nnx.BatchNorm whose running variance takes the unbiased batch variance (× n / (n − 1), n the
    values per channel), as PyTorch's BatchNorm does; the batch itself is normalised with the
    biased one in both. flax's own update takes the biased variance, so running variances drifted
    from PyTorch's (by 1/7 of each update at n = 8) and evaluation saw other statistics."""

    def __call__(self, x: jax.Array, use_running_average: bool | None = None, *,
                 mask: jax.Array | None = None) -> jax.Array:
        if mask is not None:
            raise NotImplementedError("segjax's BatchNorm takes no mask")
        old_var = self.var[...]
        y = super().__call__(x, use_running_average)
        if self.use_running_average if use_running_average is None else use_running_average:
            return y
        # flax stored m·old + (1 − m)·biased; PyTorch's m·old + (1 − m)·biased·n/(n − 1) is that plus
        # (1 − m)·biased/(n − 1), read back from the stored value without computing the statistics again.
        n = x.size // x.shape[self.axis]
        new_var = self.var[...]
        self.var[...] = lax.stop_gradient(new_var + (new_var - self.momentum * old_var) / max(n - 1, 1))
        return y


def batch_norm(
    num_features: int, *, dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs,
) -> nnx.BatchNorm:
    """PyTorch's `BatchNorm2d(num_features)` on NHWC: eps 1e-5, momentum 0.1, training mode, the
    running variance unbiased."""
    return BatchNorm(
        num_features, momentum=BATCH_NORM_MOMENTUM, epsilon=NORM_EPSILON, use_fast_variance=False,
        dtype=dtype, param_dtype=param_dtype, rngs=rngs)


def make_norm(
    norm: str | None,
    num_features: int,
    *,
    num_groups: int,
    dtype: jnp.dtype,
    param_dtype: jnp.dtype,
    rngs: nnx.Rngs,
) -> nnx.Module | None:
    """Normalisation over the channel axis of NHWC: "batch", "layer", "group" or None.

    "layer" normalises each pixel over its channels (PyTorch LayerNorm on channels-last);
    "batch" starts in training mode (`model.eval()` switches it to running statistics).
    """
    if norm == "batch":
        return batch_norm(num_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if norm == "layer":
        return nnx.LayerNorm(
            num_features, epsilon=NORM_EPSILON, use_fast_variance=False, dtype=dtype, param_dtype=param_dtype,
            rngs=rngs)
    if norm == "group":
        return nnx.GroupNorm(
            num_features, num_groups=num_groups, epsilon=NORM_EPSILON, use_fast_variance=False,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if norm is None:
        return None
    raise ValueError(f"unknown norm {norm!r}; choose one of {NORMS}")


class ConvNormAct(nnx.Module):
    """k×k convolution, then an optional norm, then an optional activation.

    Padding is `dilation * (kernel_size // 2)` on every side, as in PyTorch, so a stride-s
    convolution gives ceil(H / s) rows and PyTorch weights see the same pixel alignment.
    `groups` is PyTorch's `groups` (`groups=in_features` is a depthwise convolution).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        kernel_size: int = 3,
        strides: int = 1,
        *,
        norm: str | None = "batch",
        act: Callable[[jax.Array], jax.Array] | None = nnx.relu,
        use_bias: bool = True,
        num_groups: int = 32,
        dilation: int = 1,
        groups: int = 1,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.conv = Conv(
            in_features, out_features, (kernel_size, kernel_size), strides,
            padding=dilation * (kernel_size // 2), kernel_dilation=dilation,
            feature_group_count=groups, use_bias=use_bias,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = make_norm(
            norm, out_features, num_groups=num_groups,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv(x)
        if self.norm is not None:
            x = self.norm(x)
        if self.act is not None:
            x = self.act(x)
        return x


class ResidualBlock(nnx.Module):
    """Basic residual block at constant width: relu(x + norm(conv(relu(norm(conv(x)))))).

    Both convolutions are 3×3, stride 1.
    """

    def __init__(
        self,
        channels: int,
        *,
        norm: str | None = "batch",
        use_bias: bool = True,
        num_groups: int = 32,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kwargs = dict(norm=norm, use_bias=use_bias, num_groups=num_groups,
                      dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = ConvNormAct(channels, channels, 3, **kwargs)
        self.conv2 = ConvNormAct(channels, channels, 3, act=None, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return nnx.relu(x + self.conv2(self.conv1(x)))


class UpConv2x(nnx.Module):
    """PyTorch's `ConvTranspose2d(in, out, kernel_size=2, stride=2)`: every input pixel becomes a
    2×2 block, `y[2i+a, 2j+b] = x[i, j] @ kernel[a, b] + bias`.

    Written as one einsum and a depth-to-space reshape: exact, exportable, and on CPU about ten
    times faster to differentiate than `lax.conv_transpose`. The kernel is [2, 2, in, out] in
    PyTorch's orientation (flax's ConvTranspose flips it), so imported weights only transpose.
    """

    def __init__(self, in_features: int, out_features: int, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        init = nnx.initializers.lecun_normal()  # fan-in 2*2*in, as nnx.ConvTranspose
        self.kernel = nnx.Param(init(rngs.params(), (2, 2, in_features, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype))
        self.dtype = dtype

    def __call__(self, x: jax.Array) -> jax.Array:
        n, h, w, _ = x.shape
        kernel = self.kernel[...].astype(self.dtype)
        y = jnp.einsum("nhwc,abco->nhawbo", x.astype(self.dtype), kernel)
        return y.reshape(n, 2 * h, 2 * w, kernel.shape[-1]) + self.bias[...].astype(self.dtype)
