"""Query-based mask model (the `hybrid_p3m` experiment): DarkNet-53 + FPN + transformer decoder.

  images [B, H, W, 3] in [0, 1]
  backbone  DarkNet53 -> c3, c4, c5 (strides 8, 16, 32)
  fpn       FPN       -> p3, p4, p5 (`fpn_channels` each); only p3 feeds the decoder
  decoder   QueryDecoder on p3:
    patchify      2×2 stride-2 conv p3 -> d_model: memory tokens at stride 16
    positions     fixed 2D sine encoding of the token grid (DETR's, normalised to [0, 2π]), so
                  any input size works without interpolating a learned table
    layers        `num_layers` post-norm DETR decoder layers: self-attention over the queries,
                  cross-attention queries -> tokens, FFN; LayerNorm after each, one at the end
    queries       `num_queries` learned content vectors (`query_feat`) and learned positions
                  (`query_embed`), added to the queries and keys of every attention (Mask2Former)
    heads         class logits [B, Q, num_classes + 1] (last = no object); a 3-layer MLP mask
                  embedding dotted with per-pixel features (1×1 conv p3 -> d_model) gives mask
                  logits at stride 8, bilinearly resized to the input size
  -> {"pred_logits": [B, Q, num_classes + 1], "pred_masks": [B, Q, H, W]} (PyTorch's names)

The three parts can be called (and timed) separately:
  features = model.backbone(images); pyramid = model.fpn(features)
  outputs = model.decoder(pyramid[0], images.shape[1:3])
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segjax.models.darknet import DarkNet
from segjax.models.fpn import FPN
from segjax.models.layers import NORM_EPSILON
from segjax.ops.resize import resize_bilinear

# HybridQueryModel's variants: "full" the published layout, "tiny" narrow and shallow (tests, demos).
SIZES = {
    "full": dict(backbone_depths=(1, 2, 8, 8, 4), backbone_widths=(64, 128, 256, 512, 1024),
                 backbone_stem_width=32, fpn_channels=256, num_queries=100, d_model=384, num_layers=6,
                 num_heads=6, dim_feedforward=2048, dropout_rate=0.1),
    "tiny": dict(backbone_depths=(1, 1, 1, 1, 1), backbone_widths=(8, 16, 32, 64, 128),
                 backbone_stem_width=8, fpn_channels=32, num_queries=8, d_model=32, num_layers=2,
                 num_heads=2, dim_feedforward=64, dropout_rate=0.0),
}


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
    """DETR's post-norm decoder layer: self-attention, cross-attention, FFN (ReLU), each followed
    by dropout, the residual sum and LayerNorm. Positions are added to queries and keys only."""

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        dim_feedforward: int,
        *,
        dropout_rate: float = 0.1,
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

    def __call__(self, queries: jax.Array, query_pos: jax.Array, memory: jax.Array,
                 memory_pos: jax.Array) -> jax.Array:
        q = queries + query_pos
        queries = self.norm1(queries + self.dropout(self.self_attn(q, q, queries)))
        attended = self.cross_attn(queries + query_pos, memory + memory_pos, memory)
        queries = self.norm2(queries + self.dropout(attended))
        hidden = self.dropout(nnx.relu(self.linear1(queries)))
        return self.norm3(queries + self.dropout(self.linear2(hidden)))


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


class QueryDecoder(nnx.Module):
    """Stride-8 features [B, h, w, in_channels] to class and mask logits (see the module doc)."""

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        *,
        num_queries: int = 100,
        d_model: int = 384,
        num_layers: int = 6,
        num_heads: int = 6,
        dim_feedforward: int = 2048,
        dropout_rate: float = 0.1,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patchify = nnx.Conv(in_channels, d_model, (2, 2), 2, padding="VALID", **precision)
        self.query_feat = nnx.Embed(num_queries, d_model, **precision)
        self.query_embed = nnx.Embed(num_queries, d_model, **precision)
        self.layers = nnx.List([
            DecoderLayer(d_model, num_heads, dim_feedforward, dropout_rate=dropout_rate,
                         **precision)
            for _ in range(num_layers)])
        self.norm = nnx.LayerNorm(d_model, epsilon=NORM_EPSILON, **precision)
        self.class_embed = nnx.Linear(d_model, num_classes + 1, **precision)
        self.mask_embed = MLP((d_model,) * 4, **precision)
        self.mask_features = nnx.Conv(in_channels, d_model, (1, 1), **precision)
        self.d_model = d_model

    def __call__(self, p3: jax.Array, size: tuple[int, int]) -> dict[str, jax.Array]:
        """p3: [B, h, w, in_channels] at stride 8; size: the input's (H, W)."""
        batch = p3.shape[0]
        tokens = self.patchify(p3)  # PyTorch's floor: an odd last row/column of p3 is dropped
        _, th, tw, _ = tokens.shape
        memory = tokens.reshape(batch, th * tw, self.d_model)
        memory_pos = jnp.asarray(sine_positions(th, tw, self.d_model), memory.dtype)[None]
        query_pos, queries = (
            jnp.broadcast_to(e.embedding[...].astype(memory.dtype), (batch, *e.embedding.shape))
            for e in (self.query_embed, self.query_feat))
        for layer in self.layers:
            queries = layer(queries, query_pos, memory, memory_pos)
        queries = self.norm(queries)
        pred_logits = self.class_embed(queries)
        pixels = self.mask_features(p3)
        masks = jnp.einsum("bqc,bhwc->bhwq", self.mask_embed(queries), pixels)
        pred_masks = jnp.moveaxis(resize_bilinear(masks, size), -1, 1)
        return {"pred_logits": pred_logits, "pred_masks": pred_masks}


class HybridQueryModel(nnx.Module):
    """DarkNet-53 backbone, FPN, query decoder (see the module doc).

    Takes RGB images [B, H, W, 3] in [0, 1] (any H, W; normalised inside the backbone) and
    returns {"pred_logits": [B, Q, num_classes + 1], "pred_masks": [B, Q, H, W]} logits in the
    compute dtype. Use class index 0 for "person" with num_classes=1 (no object is index 1).
    `backbone_negative_slope=0.01` reproduces timm's `darknet53` activations. The sizes are
    `SIZES`' variants: `HybridQueryModel(1, **SIZES["full"], rngs=rngs)`.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backbone_depths: Sequence[int],
        backbone_widths: Sequence[int],
        backbone_stem_width: int,
        backbone_negative_slope: float = 0.1,
        fpn_channels: int,
        num_queries: int,
        d_model: int,
        num_layers: int,
        num_heads: int,
        dim_feedforward: int,
        dropout_rate: float,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.backbone = DarkNet(
            backbone_depths, backbone_widths, stem_width=backbone_stem_width,
            negative_slope=backbone_negative_slope, **precision)
        self.fpn = FPN(self.backbone.out_channels, fpn_channels, **precision)
        self.decoder = QueryDecoder(
            fpn_channels, num_classes, num_queries=num_queries, d_model=d_model,
            num_layers=num_layers, num_heads=num_heads, dim_feedforward=dim_feedforward,
            dropout_rate=dropout_rate, **precision)

    def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
        p3, _, _ = self.fpn(self.backbone(images))
        return self.decoder(p3, images.shape[1:3])
