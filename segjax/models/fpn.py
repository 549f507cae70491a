"""Top-down feature pyramid over c3/c4/c5 that fuses by concatenation (YOLOv3-neck style).

Layers, in order (every conv is conv without bias + BatchNorm + ReLU):
  lateral5  1×1 conv  c5 (in_channels[2]) -> channels                          => p5, stride 32
  fuse4     3×3 conv  concat(bilinear(p5 -> size of c4), c4) -> channels       => p4, stride 16
  fuse3     3×3 conv  concat(bilinear(p4 -> size of c3), c3) -> channels       => p3, stride 8
Upsampling goes to the skip's size rather than by 2, so sizes that are not multiples of 32 work.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from segjax.models.layers import ConvNormAct
from segjax.ops.resize import resize_bilinear


class FPN(nnx.Module):
    """Features [c3, c4, c5] with `in_channels` channels to [p3, p4, p5] with `channels` each."""

    def __init__(
        self,
        in_channels: Sequence[int],
        channels: int = 256,
        *,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(in_channels) != 3:
            raise ValueError(f"need the channels of c3, c4, c5, got {tuple(in_channels)}")
        c3, c4, c5 = in_channels
        kwargs = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.lateral5 = ConvNormAct(c5, channels, 1, **kwargs)
        self.fuse4 = ConvNormAct(channels + c4, channels, 3, **kwargs)
        self.fuse3 = ConvNormAct(channels + c3, channels, 3, **kwargs)
        self.out_channels = channels

    def __call__(self, features: Sequence[jax.Array]) -> list[jax.Array]:
        c3, c4, c5 = features
        p5 = self.lateral5(c5)
        p4 = self.fuse4(jnp.concatenate([resize_bilinear(p5, c4.shape[1:3]), c4], axis=-1))
        p3 = self.fuse3(jnp.concatenate([resize_bilinear(p4, c3.shape[1:3]), c3], axis=-1))
        return [p3, p4, p5]
