"""Semantic-segmentation models by name.

`SEMANTIC_MODELS[name](num_classes, *, size="full"|"tiny", dtype, param_dtype, rngs)` builds a
model that maps RGB images [N, H, W, 3] in [0, 1] to logits [N, H, W, num_classes]. "full" is
the published layout (the class defaults); "tiny" narrows the same classes for tests.
"""
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from segjax.models.deeplabv3 import DEEPLABV3_TINY, DeepLabV3
from segjax.models.encoder_decoder import ENCODER_DECODER_TINY, EncoderDecoder
from segjax.models.fast_scnn import FAST_SCNN_TINY, FastSCNN
from segjax.models.unet import UNET_TINY, Unet

SIZES = ("full", "tiny")


def _sized(model_class: type[nnx.Module], tiny: dict, **fixed) -> Callable[..., nnx.Module]:
    """A table entry: `model_class(num_classes, **fixed)`, with the `tiny` widths on request."""

    def build(num_classes: int, *, size: str = "full", dtype: jnp.dtype = jnp.float32,
              param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
        if size not in SIZES:
            raise ValueError(f"unknown size {size!r}; choose one of {SIZES}")
        widths = tiny if size == "tiny" else {}
        return model_class(num_classes, **fixed, **widths, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)

    return build


SEMANTIC_MODELS = {
    "unet": _sized(Unet, UNET_TINY, encoder="resnet34"),
    "deeplabv3": _sized(DeepLabV3, DEEPLABV3_TINY),
    "fastscnn": _sized(FastSCNN, FAST_SCNN_TINY),
    # voc_resnet: the encoder-decoder on each ResNet.
    "resnet18": _sized(EncoderDecoder, ENCODER_DECODER_TINY, encoder="resnet18"),
    "resnet34": _sized(EncoderDecoder, ENCODER_DECODER_TINY, encoder="resnet34"),
    "resnet50": _sized(EncoderDecoder, ENCODER_DECODER_TINY, encoder="resnet50"),
}
