"""DeepLabV3 in torchvision's `deeplabv3_resnet50(num_classes, aux_loss=False)` layout.

Names map 1:1 to a torchvision state dict (kernels OIHW -> HWIO, BatchNorm as in resnet.py):
  backbone.*                      -> backbone.* (resnet.py's table; its fc is not loaded)
  classifier.0.convs.0.0 / .1     -> classifier.aspp.convs[0].conv / .norm        (1×1 branch)
  classifier.0.convs.R.0 / .1     -> classifier.aspp.convs[R].conv / .norm        (R = 1, 2, 3)
  classifier.0.convs.4.1 / .2     -> classifier.aspp.convs[4].conv.conv / .norm   (pooling)
  classifier.0.project.0 / .1     -> classifier.aspp.project.conv / .norm
  classifier.1 / classifier.2     -> classifier.conv.conv / classifier.conv.norm
  classifier.4                    -> classifier.out
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from segjax.models.layers import ConvNormAct, imagenet_normalize
from segjax.models.resnet import ResNet50
from segjax.ops.resize import resize_bilinear

# Variants: "full" the published layout (the class defaults), "tiny" narrow widths for tests and demos.
SIZES = {"full": {}, "tiny": dict(backbone_width=8, aspp_channels=16)}


class ASPPPooling(nnx.Module):
    """Image pooling branch: global average, 1×1 conv-BN-ReLU, bilinear back to the map size."""

    def __init__(self, in_features: int, out_features: int, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.conv = ConvNormAct(in_features, out_features, 1, use_bias=False,
                                dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        pooled = self.conv(jnp.mean(x, axis=(1, 2), keepdims=True))
        return resize_bilinear(pooled, x.shape[1:3])


class ASPP(nnx.Module):
    """Atrous spatial pyramid pooling: a 1×1 branch, one 3×3 branch per atrous rate, the image
    pooling branch, concatenated and projected by 1×1 conv-BN-ReLU + Dropout."""

    def __init__(
        self,
        in_features: int,
        atrous_rates: Sequence[int] = (12, 24, 36),
        out_features: int = 256,
        *,
        dropout_rate: float = 0.5,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        branches = [ConvNormAct(in_features, out_features, 1, use_bias=False, **precision)]
        branches += [ConvNormAct(in_features, out_features, 3, dilation=rate, use_bias=False,
                                 **precision) for rate in atrous_rates]
        branches.append(ASPPPooling(in_features, out_features, **precision))
        self.convs = nnx.List(branches)
        self.project = ConvNormAct(
            len(branches) * out_features, out_features, 1, use_bias=False, **precision)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.concatenate([branch(x) for branch in self.convs], axis=-1)
        return self.dropout(self.project(x))


class DeepLabHead(nnx.Module):
    """ASPP, then 3×3 conv-BN-ReLU, then a 1×1 classifier conv (with bias)."""

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        *,
        channels: int = 256,
        atrous_rates: Sequence[int] = (12, 24, 36),
        dropout_rate: float = 0.5,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.aspp = ASPP(in_features, atrous_rates, channels, dropout_rate=dropout_rate,
                         **precision)
        self.conv = ConvNormAct(channels, channels, 3, use_bias=False, **precision)
        self.out = nnx.Conv(channels, num_classes, (1, 1), **precision)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.out(self.conv(self.aspp(x)))


class DeepLabV3(nnx.Module):
    """DeepLabV3: ResNet-50 with dilated layer3/layer4 (output stride 8), DeepLabHead on the
    stride-8 features, logits resized bilinearly (half-pixel) to the input size.

    Takes RGB images [N, H, W, 3] in [0, 1] (any H, W), normalises with ImageNet mean/std,
    returns logits [N, H, W, num_classes] in the compute dtype. The ASPP dropout is active in
    train mode only (`model.eval()` turns it off).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backbone_width: int = 64,
        aspp_channels: int = 256,
        atrous_rates: Sequence[int] = (12, 24, 36),
        dropout_rate: float = 0.5,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.backbone = ResNet50(
            width=backbone_width, replace_stride_with_dilation=(False, True, True), **precision)
        self.classifier = DeepLabHead(
            self.backbone.out_channels[-1], num_classes, channels=aspp_channels,
            atrous_rates=atrous_rates, dropout_rate=dropout_rate, **precision)

    def __call__(self, images: jax.Array) -> jax.Array:
        features = self.backbone(imagenet_normalize(images))[-1]
        return resize_bilinear(self.classifier(features), images.shape[1:3])
