"""The `voc_resnet` model: ResNet encoder, transposed-convolution decoder with one skip, 1×1
classifier at input resolution.

Decoder, from the encoder's stride-32 features c4:
  up4, up3, up2   UpBlock ×3 (stride 32 -> 16 -> 8 -> 4), widths decoder_channels[0..2]
  fuse            concat with layer1's c1 (the skip, stride 4), 3×3 conv-BN-ReLU
  up1, up0        UpBlock ×2 (stride 4 -> 2 -> 1), widths decoder_channels[3..4]
  classifier      1×1 conv (with bias) to num_classes
An UpBlock is PyTorch's `ConvTranspose2d(k=2, s=2)` (`UpConv2x`, with bias) + BN + ReLU rather
than k=4/s=2: each output pixel 2i+a comes from input pixel i alone, so the kernels never
overlap unevenly (the checkerboard source), no padding convention is needed, and crops stay
aligned; `UpConv2x` is an einsum, exact, exportable and cheap to differentiate on CPU.
Every encoder step gives ceil(size / 2) rows, so doubling is at most one row/column too many:
each UpBlock output is cropped at the bottom/right to the size of the level it reaches (the
encoder's stem and the input included), which aligns it with the skip and gives logits at
exactly H×W for any input size.
"""
import jax
import jax.numpy as jnp
from flax import nnx

from segjax.models.layers import ConvNormAct, UpConv2x, batch_norm, imagenet_normalize
from segjax.models.resnet import RESNETS

# Variants: "full" the published layout (the class defaults), "tiny" narrow widths for tests and demos.
SIZES = {"full": {}, "tiny": dict(encoder_width=8, decoder_channels=(32, 16, 16, 8, 8))}


class UpBlock(nnx.Module):
    """2× transposed conv (k=2, s=2, bias), BatchNorm, ReLU, cropped to `size`."""

    def __init__(self, in_features: int, out_features: int, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.up = UpConv2x(in_features, out_features, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)
        self.bn = batch_norm(out_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, size: tuple[int, int]) -> jax.Array:
        x = self.up(x)[:, :size[0], :size[1]]
        return nnx.relu(self.bn(x))


class EncoderDecoder(nnx.Module):
    """`voc_resnet`: ResNet-18/34/50 encoder and the transposed-conv decoder above.

    Takes RGB images [N, H, W, 3] in [0, 1] (any H, W), normalises with ImageNet mean/std,
    returns logits [N, H, W, num_classes] in the compute dtype. The encoder's names match
    torchvision's (resnet.py), so ImageNet weights load into `encoder`.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        encoder: str = "resnet18",
        encoder_width: int = 64,
        decoder_channels: tuple[int, int, int, int, int] = (256, 128, 64, 32, 32),
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if encoder not in RESNETS:
            raise ValueError(f"unknown encoder {encoder!r}; choose one of {sorted(RESNETS)}")
        if len(decoder_channels) != 5:
            raise ValueError(f"need 5 decoder widths, got {decoder_channels}")
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.encoder = RESNETS[encoder](width=encoder_width, **precision)
        _, c1, _, _, c4 = self.encoder.out_channels
        d4, d3, d2, d1, d0 = decoder_channels
        self.up4 = UpBlock(c4, d4, **precision)
        self.up3 = UpBlock(d4, d3, **precision)
        self.up2 = UpBlock(d3, d2, **precision)
        self.fuse = ConvNormAct(d2 + c1, d2, 3, use_bias=False, **precision)
        self.up1 = UpBlock(d2, d1, **precision)
        self.up0 = UpBlock(d1, d0, **precision)
        self.classifier = nnx.Conv(d0, num_classes, (1, 1), **precision)

    def __call__(self, images: jax.Array) -> jax.Array:
        stem, c1, c2, c3, c4 = self.encoder(imagenet_normalize(images))
        x = self.up4(c4, c3.shape[1:3])
        x = self.up3(x, c2.shape[1:3])
        x = self.fuse(jnp.concatenate([self.up2(x, c1.shape[1:3]), c1], axis=-1))
        x = self.up1(x, stem.shape[1:3])
        return self.classifier(self.up0(x, images.shape[1:3]))
