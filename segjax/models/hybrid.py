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
from flax import nnx

from segjax.models.darknet import DarkNet
from segjax.models.fpn import FPN
from segjax.models.layers import NORM_EPSILON
from segjax.models.transformer import MLP, DecoderLayer, sine_positions
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
