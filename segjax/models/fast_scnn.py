"""Fast-SCNN (Poudel, Liwicki, Cipolla 2019, "Fast-SCNN: Fast Semantic Segmentation Network").

Paper, Table 1, for an input of H×W:
  learning to downsample   Conv2D 32 s2, DSConv 48 s2, DSConv 64 s2            -> 1/8, 64
  global feature extractor bottleneck (t=6) 64 ×3 s2, 96 ×3 s2, 128 ×3 s1, PPM -> 1/32, 128
  feature fusion           Table 2: low-res ×4 bilinear, 3×3 depthwise (dilation 4),
                           1×1 conv; high-res 1×1 conv; add, ReLU                -> 1/8, 128
  classifier               DSConv 128 ×2, 1×1 conv to num_classes, bilinear to H×W
All convolutions are 3×3 unless stated, without bias and followed by BatchNorm (the final
classifier conv has a bias instead). As in the paper a DSConv has no nonlinearity between its
depthwise and pointwise convs, and a bottleneck's projection is linear (MobileNetV2). Choices
the paper leaves open: the pyramid pooling module is PSPNet's (bins 1, 2, 3, 6, each a 1×1
conv-BN-ReLU to C/4, bilinear back, concatenated with the input, 1×1 conv-BN-ReLU to C);
dropout (0.1) before the last conv.

Full size: 1,137,795 parameters with 19 classes (Cityscapes; the paper reports 1.11 million),
1,138,053 with 21.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from segjax.models.layers import ConvNormAct, imagenet_normalize
from segjax.ops.resize import adaptive_avg_pool, resize_bilinear

# Variants: "full" the published layout (the class defaults), "tiny" narrow widths for tests and demos.
SIZES = {"full": {}, "tiny": dict(downsample_channels=(8, 12, 16), block_channels=(16, 24, 32), fusion_channels=32)}


class DSConv(nnx.Module):
    """Depthwise-separable conv: 3×3 depthwise (stride) + BN, then 1×1 pointwise + BN + ReLU."""

    def __init__(self, in_features: int, out_features: int, strides: int = 1, *,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        kwargs = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.depthwise = ConvNormAct(
            in_features, in_features, 3, strides, groups=in_features, act=None, **kwargs)
        self.pointwise = ConvNormAct(in_features, out_features, 1, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.pointwise(self.depthwise(x))


class InvertedResidual(nnx.Module):
    """MobileNetV2 bottleneck: 1×1 expand ×t + BN + ReLU, 3×3 depthwise (stride) + BN + ReLU,
    1×1 linear projection + BN; the input is added back when the shapes agree."""

    def __init__(self, in_features: int, out_features: int, strides: int = 1, *,
                 expansion: int = 6, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        kwargs = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        hidden = in_features * expansion
        self.expand = ConvNormAct(in_features, hidden, 1, **kwargs)
        self.depthwise = ConvNormAct(hidden, hidden, 3, strides, groups=hidden, **kwargs)
        self.project = ConvNormAct(hidden, out_features, 1, act=None, **kwargs)
        self.residual = strides == 1 and in_features == out_features

    def __call__(self, x: jax.Array) -> jax.Array:
        out = self.project(self.depthwise(self.expand(x)))
        return x + out if self.residual else out


class PyramidPooling(nnx.Module):
    """PSPNet's pyramid pooling: adaptive average pooling to each bin count, 1×1 conv-BN-ReLU
    to C/len(bins), bilinear back, concatenated with the input, 1×1 conv-BN-ReLU."""

    def __init__(self, in_features: int, out_features: int, bins: Sequence[int] = (1, 2, 3, 6),
                 *, dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        kwargs = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        branch_features = in_features // len(bins)
        self.bins = tuple(bins)
        self.branches = nnx.List(
            [ConvNormAct(in_features, branch_features, 1, **kwargs) for _ in self.bins])
        self.out = ConvNormAct(
            in_features + len(bins) * branch_features, out_features, 1, **kwargs)

    def __call__(self, x: jax.Array) -> jax.Array:
        size = x.shape[1:3]
        pooled = [resize_bilinear(branch(adaptive_avg_pool(x, (b, b))), size)
                  for b, branch in zip(self.bins, self.branches)]
        return self.out(jnp.concatenate([x, *pooled], axis=-1))


class FeatureFusion(nnx.Module):
    """Paper Table 2: low-res features resized to the high-res map, 3×3 depthwise with dilation
    `scale` + BN + ReLU, 1×1 conv + BN; high-res 1×1 conv + BN; sum, ReLU."""

    def __init__(self, high_features: int, low_features: int, out_features: int, *,
                 scale: int = 4, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        kwargs = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.depthwise = ConvNormAct(
            low_features, low_features, 3, dilation=scale, groups=low_features, **kwargs)
        self.low_project = ConvNormAct(low_features, out_features, 1, act=None, **kwargs)
        self.high_project = ConvNormAct(high_features, out_features, 1, act=None, **kwargs)

    def __call__(self, high: jax.Array, low: jax.Array) -> jax.Array:
        low = self.low_project(self.depthwise(resize_bilinear(low, high.shape[1:3])))
        return nnx.relu(self.high_project(high) + low)


class FastSCNN(nnx.Module):
    """Fast-SCNN with the paper's widths by default.

    Takes RGB images [N, H, W, 3] in [0, 1] (any H, W), normalises with ImageNet mean/std,
    returns logits [N, H, W, num_classes] in the compute dtype. Dropout is active in train
    mode only (`model.eval()` turns it off).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        downsample_channels: tuple[int, int, int] = (32, 48, 64),
        block_channels: tuple[int, int, int] = (64, 96, 128),
        blocks_per_stage: int = 3,
        expansion: int = 6,
        fusion_channels: int = 128,
        dropout_rate: float = 0.1,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        c1, c2, c3 = downsample_channels
        # Learning to downsample: three stride-2 layers to 1/8.
        self.conv = ConvNormAct(3, c1, 3, 2, use_bias=False, **precision)
        self.dsconv1 = DSConv(c1, c2, 2, **precision)
        self.dsconv2 = DSConv(c2, c3, 2, **precision)
        # Global feature extractor: bottleneck stages with strides 2, 2, 1 (to 1/32), then PPM.
        blocks, in_features = [], c3
        for out_features, strides in zip(block_channels, (2, 2, 1)):
            for i in range(blocks_per_stage):
                blocks.append(InvertedResidual(
                    in_features, out_features, strides if i == 0 else 1, expansion=expansion,
                    **precision))
                in_features = out_features
        self.bottlenecks = nnx.List(blocks)
        self.ppm = PyramidPooling(in_features, in_features, **precision)
        # 1/32 features fuse into the 1/8 map: dilation 4 on the upsampled map.
        self.fusion = FeatureFusion(c3, in_features, fusion_channels, scale=4, **precision)
        self.classifier_dsconv1 = DSConv(fusion_channels, fusion_channels, **precision)
        self.classifier_dsconv2 = DSConv(fusion_channels, fusion_channels, **precision)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.classifier = nnx.Conv(fusion_channels, num_classes, (1, 1), **precision)

    def __call__(self, images: jax.Array) -> jax.Array:
        high = self.dsconv2(self.dsconv1(self.conv(imagenet_normalize(images))))
        low = high
        for block in self.bottlenecks:
            low = block(low)
        x = self.fusion(high, self.ppm(low))
        x = self.classifier_dsconv2(self.classifier_dsconv1(x))
        logits = self.classifier(self.dropout(x))
        return resize_bilinear(logits, images.shape[1:3])
