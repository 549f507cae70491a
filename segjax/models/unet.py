"""U-Net on a ResNet encoder in segmentation_models_pytorch's `Unet("resnet34")` layout (smp 0.6).

Names map 1:1 to an smp state dict (kernels OIHW -> HWIO, BatchNorm as in resnet.py):
  encoder.*                          -> encoder.* (resnet.py's table)
  decoder.blocks.I.conv1.0 / .1      -> decoder.blocks[I].conv1.conv / .norm  (conv2 alike)
  segmentation_head.0                -> segmentation_head
smp's decoder has no center block and no attention with the defaults used here.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from segjax.models.layers import ConvNormAct, imagenet_normalize
from segjax.models.resnet import RESNETS
from segjax.ops.resize import resize_nearest

# Variants: "full" the published layout (the class defaults), "tiny" narrow widths for tests and demos.
SIZES = {"full": {}, "tiny": dict(encoder_width=8, decoder_channels=(32, 16, 8, 8, 8))}


class UnetDecoderBlock(nnx.Module):
    """Nearest-resize to the skip's size, concatenate the skip, two 3×3 conv-BN-ReLU (no bias)."""

    def __init__(
        self,
        in_features: int,
        skip_features: int,
        out_features: int,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        kwargs = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = ConvNormAct(in_features + skip_features, out_features, 3, **kwargs)
        self.conv2 = ConvNormAct(out_features, out_features, 3, **kwargs)

    def __call__(self, x: jax.Array, size: tuple[int, int], skip: jax.Array | None) -> jax.Array:
        # smp upsamples to the next feature's size rather than by 2, so odd sizes line up.
        x = resize_nearest(x, size)
        if skip is not None:
            x = jnp.concatenate([x, skip], axis=-1)
        return self.conv2(self.conv1(x))


class UnetDecoder(nnx.Module):
    """Five blocks from the stride-32 features up to the input size, skipping from c3, c2, c1
    and the stem in turn; the last block has no skip."""

    def __init__(
        self,
        encoder_channels: tuple[int, ...],
        decoder_channels: tuple[int, ...],
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(decoder_channels) != len(encoder_channels):
            raise ValueError(
                f"need one decoder width per encoder feature ({len(encoder_channels)}), "
                f"got {decoder_channels}")
        deep_first = encoder_channels[::-1]
        in_channels = (deep_first[0], *decoder_channels[:-1])
        skip_channels = (*deep_first[1:], 0)
        self.blocks = nnx.List([
            UnetDecoderBlock(i, s, o, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for i, s, o in zip(in_channels, skip_channels, decoder_channels)])

    def __call__(self, features: list[jax.Array], size: tuple[int, int]) -> jax.Array:
        """features: the encoder's [stem, c1, .., c4]; size: the input's (H, W)."""
        x, *skips = features[::-1]
        for block, skip in zip(self.blocks, [*skips, None]):
            target = size if skip is None else skip.shape[1:3]
            x = block(x, target, skip)
        return x


class Unet(nnx.Module):
    """smp `Unet(encoder, classes=num_classes)`: ResNet encoder, U-Net decoder with widths
    `decoder_channels`, 3×3 conv segmentation head (with bias) at input resolution.

    Takes RGB images [N, H, W, 3] in [0, 1] (any H, W), normalises with ImageNet mean/std,
    returns logits [N, H, W, num_classes] in the compute dtype.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        encoder: str = "resnet34",
        encoder_width: int = 64,
        decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16),
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if encoder not in RESNETS:
            raise ValueError(f"unknown encoder {encoder!r}; choose one of {sorted(RESNETS)}")
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = RESNETS[encoder](width=encoder_width, **precision)
        self.decoder = UnetDecoder(self.encoder.out_channels, tuple(decoder_channels), **precision)
        self.segmentation_head = nnx.Conv(
            decoder_channels[-1], num_classes, (3, 3), padding=1, **precision)

    def __call__(self, images: jax.Array) -> jax.Array:
        features = self.encoder(imagenet_normalize(images))
        return self.segmentation_head(self.decoder(features, images.shape[1:3]))
