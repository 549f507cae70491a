"""Semantic-segmentation models by name.

`SEMANTIC_MODELS[name](num_classes, *, size="full"|"tiny", dtype, param_dtype, rngs)` builds a
model that maps RGB images [N, H, W, 3] in [0, 1] to logits [N, H, W, num_classes]; the sizes
are each model module's `SIZES` variants.
"""
from collections.abc import Callable

import jax.numpy as jnp
from flax import nnx

from segjax.models import deeplabv3, encoder_decoder, fast_scnn, unet


def _sized(model_class: type[nnx.Module], sizes: dict[str, dict], **fixed) -> Callable[..., nnx.Module]:
    """A table entry: `model_class(num_classes, **fixed)` with the widths of `sizes[size]`."""

    def build(num_classes: int, *, size: str = "full", dtype: jnp.dtype = jnp.float32,
              param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs) -> nnx.Module:
        if size not in sizes:
            raise ValueError(f"unknown size {size!r}; choose one of {tuple(sizes)}")
        return model_class(num_classes, **fixed, **sizes[size], dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs)

    return build


SEMANTIC_MODELS = {
    "unet": _sized(unet.Unet, unet.SIZES, encoder="resnet34"),
    "deeplabv3": _sized(deeplabv3.DeepLabV3, deeplabv3.SIZES),
    "fastscnn": _sized(fast_scnn.FastSCNN, fast_scnn.SIZES),
    # voc_resnet: the encoder-decoder on each ResNet.
    **{name: _sized(encoder_decoder.EncoderDecoder, encoder_decoder.SIZES, encoder=name)
       for name in ("resnet18", "resnet34", "resnet50")},
}
