"""torchvision's ResNet-18/34/50 as a feature encoder (NHWC, no avgpool/fc).

Layout and names follow torchvision (v1.5: a Bottleneck strides on its 3×3 conv), so a
torchvision state dict maps 1:1, with PyTorch's OIHW kernels transposed to HWIO:
  conv1, bn1                            -> conv1, bn1
  layerL.B.conv1/bn1/conv2/bn2(/conv3/bn3) -> layerL[B].conv1 ... (same names)
  layerL.B.downsample.0 / .1            -> layerL[B].downsample.conv / .norm
  BatchNorm weight, bias, running_mean, running_var -> scale, bias, mean, var
The encoder takes already-normalised images; the models normalise.
"""
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from segjax.models.layers import Conv, ConvNormAct, batch_norm, max_pool2d


class BasicBlock(nnx.Module):
    """relu(bn2(conv2(relu(bn1(conv1(x))))) + downsample(x)), two 3×3 convs without bias."""

    expansion = 1

    def __init__(
        self,
        in_features: int,
        planes: int,
        *,
        strides: int = 1,
        dilation: int = 1,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if dilation != 1:
            raise ValueError("BasicBlock supports dilation 1 only (as torchvision)")
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = nnx.Conv(
            in_features, planes, (3, 3), strides, padding=1, use_bias=False, **precision)
        self.bn1 = batch_norm(planes, **precision)
        self.conv2 = nnx.Conv(planes, planes, (3, 3), padding=1, use_bias=False, **precision)
        self.bn2 = batch_norm(planes, **precision)
        self.downsample = _downsample(in_features, planes * self.expansion, strides, **precision)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return nnx.relu(out + identity)


class Bottleneck(nnx.Module):
    """1×1 reduce, 3×3 (stride, dilation), 1×1 expand ×4; BatchNorm after each, no conv bias."""

    expansion = 4

    def __init__(
        self,
        in_features: int,
        planes: int,
        *,
        strides: int = 1,
        dilation: int = 1,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        out_features = planes * self.expansion
        self.conv1 = Conv(in_features, planes, (1, 1), use_bias=False, **precision)
        self.bn1 = batch_norm(planes, **precision)
        self.conv2 = nnx.Conv(
            planes, planes, (3, 3), strides, padding=dilation, kernel_dilation=dilation,
            use_bias=False, **precision)
        self.bn2 = batch_norm(planes, **precision)
        self.conv3 = Conv(planes, out_features, (1, 1), use_bias=False, **precision)
        self.bn3 = batch_norm(out_features, **precision)
        self.downsample = _downsample(in_features, out_features, strides, **precision)

    def __call__(self, x: jax.Array) -> jax.Array:
        out = nnx.relu(self.bn1(self.conv1(x)))
        out = nnx.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        identity = x if self.downsample is None else self.downsample(x)
        return nnx.relu(out + identity)


def _downsample(in_features, out_features, strides, **precision) -> ConvNormAct | None:
    """torchvision's shortcut projection (1×1 strided conv + BatchNorm) where shapes change."""
    if strides == 1 and in_features == out_features:
        return None
    return ConvNormAct(
        in_features, out_features, 1, strides, act=None, use_bias=False, **precision)


class ResNet(nnx.Module):
    """ResNet encoder returning the features [stem, c1, c2, c3, c4] at strides 2, 4, 8, 16, 32.

    `stem` is relu(bn1(conv1(x))) before the max-pool (smp's U-Net skips from it); `cN` is the
    output of `layerN`. `width` scales every stage (64 in torchvision; smaller for tiny test
    models). `replace_stride_with_dilation` is torchvision's flag for layer2..4: a dilated layer
    keeps its input's resolution and dilates its 3×3 convs instead (its first block keeps the
    previous dilation), so (False, True, True) gives output stride 8 as in DeepLabV3.
    Every stride-2 step gives ceil(size / 2) rows, so any input size works.
    """

    def __init__(
        self,
        block: type[BasicBlock] | type[Bottleneck],
        layers: Sequence[int],
        *,
        width: int = 64,
        replace_stride_with_dilation: Sequence[bool] = (False, False, False),
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(layers) != 4 or len(replace_stride_with_dilation) != 3:
            raise ValueError(
                f"need 4 layer depths and 3 dilation flags, got {layers}, "
                f"{replace_stride_with_dilation}")
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = nnx.Conv(3, width, (7, 7), 2, padding=3, use_bias=False, **precision)
        self.bn1 = batch_norm(width, **precision)
        in_features, dilation = width, 1
        stages = []
        for i, (depth, dilate) in enumerate(zip(layers, (False, *replace_stride_with_dilation))):
            planes, strides, previous_dilation = width * 2**i, (1 if i == 0 else 2), dilation
            if dilate:
                dilation, strides = dilation * strides, 1
            blocks = [block(in_features, planes, strides=strides, dilation=previous_dilation,
                            **precision)]
            in_features = planes * block.expansion
            blocks += [block(in_features, planes, dilation=dilation, **precision)
                       for _ in range(1, depth)]
            stages.append(nnx.List(blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = (width, *(width * 2**i * block.expansion for i in range(4)))

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        stem = nnx.relu(self.bn1(self.conv1(x)))
        x = max_pool2d(stem, 3, 2, padding=1)
        features = [stem]
        for layer in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in layer:
                x = block(x)
            features.append(x)
        return features


ResNet18 = functools.partial(ResNet, BasicBlock, (2, 2, 2, 2))
ResNet34 = functools.partial(ResNet, BasicBlock, (3, 4, 6, 3))
ResNet50 = functools.partial(ResNet, Bottleneck, (3, 4, 6, 3))

# Encoders by the names torchvision and smp use.
RESNETS = {"resnet18": ResNet18, "resnet34": ResNet34, "resnet50": ResNet50}
