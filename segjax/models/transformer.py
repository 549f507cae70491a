"""Transformer bricks shared by the query-based models (hybrid, Mask2Former).

  sine_positions  DETR's normalised 2D sine position encoding of an unpadded grid
  DecoderLayer    post-norm decoder layer: self- and cross-attention (either order, the cross one
                  optionally masked), FFN; positions added to queries and keys only
  MLP             linear layers with ReLU between them
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segjax.models.layers import NORM_EPSILON


def sine_positions(height: int, width: int, d_model: int,
                   temperature: float = 10000.0) -> np.ndarray:
    """DETR's `PositionEmbeddingSine(d_model // 2, normalize=True)` for an unpadded height×width
    grid, flattened row-major to [height * width, d_model]: y features, then x features, each
    interleaving sin and cos. A numpy constant from the static shape."""
    if d_model % 4:
        raise ValueError(f"d_model must be a multiple of 4 for sine positions, got {d_model}")
    num_feats = d_model // 2
    scale, eps = 2 * np.pi, 1e-6
    y = np.arange(1, height + 1, dtype=np.float32) / (height + eps) * scale
    x = np.arange(1, width + 1, dtype=np.float32) / (width + eps) * scale
    dim_t = temperature ** (2 * (np.arange(num_feats) // 2) / num_feats)

    def encode(pos):
        pos = pos[:, None] / dim_t
        return np.stack([np.sin(pos[:, 0::2]), np.cos(pos[:, 1::2])], axis=2).reshape(len(pos), -1)

    pos_y = np.broadcast_to(encode(y)[:, None, :], (height, width, num_feats))
    pos_x = np.broadcast_to(encode(x)[None, :, :], (height, width, num_feats))
    return np.concatenate([pos_y, pos_x], axis=-1).reshape(height * width, d_model)


class DecoderLayer(nnx.Module):
    """Post-norm decoder layer: self-attention, cross-attention, FFN (ReLU), each followed by
    dropout, the residual sum and LayerNorm (`norm1` after self-, `norm2` after cross-attention,
    `norm3` after the FFN). Positions are added to queries and keys only.

    `cross_first=False` is DETR's order; True is Mask2Former's (cross, self, FFN). `memory_mask`
    [B, 1 or heads, queries, tokens] (True = may attend) restricts the cross-attention.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        *,
        dropout_rate: float = 0.1,
        cross_first: bool = False,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        attention = dict(in_features=d_model, qkv_features=d_model, out_features=d_model,
                         dropout_rate=dropout_rate, deterministic=False, decode=False,
                         **precision)
        self.self_attn = nnx.MultiHeadAttention(num_heads, **attention)
        self.norm1 = nnx.LayerNorm(d_model, epsilon=NORM_EPSILON, **precision)
        self.cross_attn = nnx.MultiHeadAttention(num_heads, **attention)
        self.norm2 = nnx.LayerNorm(d_model, epsilon=NORM_EPSILON, **precision)
        self.linear1 = nnx.Linear(d_model, dim_feedforward, **precision)
        self.linear2 = nnx.Linear(dim_feedforward, d_model, **precision)
        self.norm3 = nnx.LayerNorm(d_model, epsilon=NORM_EPSILON, **precision)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
        self.cross_first = cross_first

    def __call__(self, queries: jax.Array, query_pos: jax.Array, memory: jax.Array,
                 memory_pos: jax.Array, memory_mask: jax.Array | None = None) -> jax.Array:
        if self.cross_first:
            queries = self._cross(queries, query_pos, memory, memory_pos, memory_mask)
            queries = self._self(queries, query_pos)
        else:
            queries = self._self(queries, query_pos)
            queries = self._cross(queries, query_pos, memory, memory_pos, memory_mask)
        hidden = self.dropout(nnx.relu(self.linear1(queries)))
        return self.norm3(queries + self.dropout(self.linear2(hidden)))

    def _self(self, queries, query_pos):
        q = queries + query_pos
        return self.norm1(queries + self.dropout(self.self_attn(q, q, queries)))

    def _cross(self, queries, query_pos, memory, memory_pos, memory_mask):
        attended = self.cross_attn(queries + query_pos, memory + memory_pos, memory,
                                   mask=memory_mask)
        return self.norm2(queries + self.dropout(attended))


class MLP(nnx.Module):
    """Linear layers with ReLU between them (DETR's MLP)."""

    def __init__(self, features: Sequence[int], *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        self.layers = nnx.List([
            nnx.Linear(i, o, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for i, o in zip(features[:-1], features[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = nnx.relu(layer(x))
        return self.layers[-1](x)
