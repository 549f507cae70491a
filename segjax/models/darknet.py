"""DarkNet-53 (YOLOv3's backbone) in timm's `darknet53` layout, as a c3/c4/c5 feature encoder.

Every convolution is conv (no bias) + BatchNorm + LeakyReLU with PyTorch's padding k // 2.
Names map 1:1 to a timm `darknet53` state dict (kernels OIHW -> HWIO; BatchNorm weight, bias,
running_mean, running_var -> scale, bias, mean, var); timm's `head.fc` classifier is not built:
  stem.conv1.conv / .bn                    -> stem.conv / .norm
  stages.S.conv_down.conv / .bn            -> stages[S].conv_down.conv / .norm
  stages.S.blocks.B.conv1.conv / .bn       -> stages[S].blocks[B].conv1.conv / .norm  (conv2 alike)
timm builds `darknet53` with `nn.LeakyReLU()` (slope 0.01); YOLOv3 uses 0.1, our default. Build
with `negative_slope=0.01` to reproduce timm's outputs from its weights.
"""
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from segjax.models.layers import ConvNormAct, imagenet_normalize


def _conv_bn_leaky(in_features, out_features, kernel_size, strides=1, *, negative_slope,
                   **precision) -> ConvNormAct:
    # Looked up at call time: jax2onnx patches nnx.leaky_relu while exporting, so the graph gets one
    # LeakyRelu (which onnxruntime fuses into the Conv) instead of GreaterOrEqual + Mul + Where.
    def act(x):
        return nnx.leaky_relu(x, negative_slope)

    return ConvNormAct(in_features, out_features, kernel_size, strides, act=act, use_bias=False,
                       **precision)


class DarkBlock(nnx.Module):
    """x + conv2(conv1(x)): a 1×1 conv to half the width, a 3×3 conv back; no activation after
    the sum (as timm's DarkBlock and YOLOv3's shortcut layer)."""

    def __init__(
        self,
        channels: int,
        *,
        negative_slope: float = 0.1,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kwargs = dict(negative_slope=negative_slope, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)
        self.conv1 = _conv_bn_leaky(channels, channels // 2, 1, **kwargs)
        self.conv2 = _conv_bn_leaky(channels // 2, channels, 3, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return x + self.conv2(self.conv1(x))


class DarkStage(nnx.Module):
    """A stride-2 3×3 downsampling conv to `out_features`, then `depth` DarkBlocks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        depth: int,
        *,
        negative_slope: float = 0.1,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kwargs = dict(negative_slope=negative_slope, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)
        self.conv_down = _conv_bn_leaky(in_features, out_features, 3, 2, **kwargs)
        self.blocks = nnx.List([DarkBlock(out_features, **kwargs) for _ in range(depth)])

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.conv_down(x)
        for block in self.blocks:
            x = block(x)
        return x


class DarkNet(nnx.Module):
    """Stem (3×3 conv, stride 1) and five stride-2 stages; returns [c3, c4, c5], the outputs of
    the last three stages, at strides 8, 16, 32 with `widths[2:]` channels (`out_channels`).

    Takes RGB images [N, H, W, 3] in [0, 1] and normalises them with ImageNet mean/std (timm's
    `darknet53` preprocessing). Every stride-2 step gives ceil(size / 2) rows, so any input size
    works: 640×640 gives 80, 40 and 20.
    """

    def __init__(
        self,
        depths: Sequence[int],
        widths: Sequence[int],
        *,
        stem_width: int = 32,
        negative_slope: float = 0.1,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(depths) != 5 or len(widths) != 5:
            raise ValueError(f"need 5 stage depths and 5 widths, got {depths}, {widths}")
        kwargs = dict(negative_slope=negative_slope, dtype=dtype, param_dtype=param_dtype,
                      rngs=rngs)
        self.stem = _conv_bn_leaky(3, stem_width, 3, **kwargs)
        in_widths = (stem_width, *widths[:-1])
        self.stages = nnx.List([DarkStage(i, o, d, **kwargs)
                                for i, o, d in zip(in_widths, widths, depths)])
        self.out_channels = tuple(widths[2:])

    def __call__(self, images: jax.Array) -> list[jax.Array]:
        x = self.stem(imagenet_normalize(images))
        features = []
        for stage in self.stages:
            x = stage(x)
            features.append(x)
        return features[2:]


# 40,584,928 parameters, timm's `darknet53` with `num_classes=0`.
DarkNet53 = functools.partial(DarkNet, (1, 2, 8, 8, 4), (64, 128, 256, 512, 1024))
