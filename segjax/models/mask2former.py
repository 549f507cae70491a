"""Mask2Former (Cheng et al. 2022) as Hugging Face's `Mask2FormerForUniversalSegmentation`
computes it in eval mode, NHWC inside. The math is transformers 5.x's (see the repository's
MASK2FORMER notes); the bridge (`segjax.bridge.hf_mask2former`) maps its weights 1:1.

  images [B, H, W, 3] RGB in [0, 1]  (ImageNet-normalised inside)
  backbone       Swin (`segjax.models.swin`) or ResNet (`segjax.models.resnet`): maps at
                 strides 4, 8, 16, 32
  pixel_decoder  PixelDecoder: the three coarsest maps (order 1/32, 1/16, 1/8) projected
                 (1×1 conv + GroupNorm 32) to `feature_size`, flattened and concatenated, plus
                 sine positions and a learned level embedding; `encoder_layers` post-norm layers
                 of multi-scale deformable self-attention (3 levels × 4 points per head) + FFN;
                 then FPN steps down to `common_stride` (lateral 1×1 conv + GroupNorm, plus the
                 bilinearly upsampled coarser output, 3×3 conv + GroupNorm + ReLU) and a 1×1
                 `mask_projection` -> mask features [B, H/4, W/4, mask_feature_size]
  transformer    MaskedAttentionDecoder: `num_queries` learned query features and positions;
                 a prediction from the queries alone, then `decoder_layers - 1` post-norm layers
                 (masked cross-attention -> self-attention -> FFN) cycling over the levels
                 1/32, 1/16, 1/8, each followed by a prediction; a prediction = the shared
                 LayerNorm, the class head (num_classes + 1, the last "no object") and the
                 3-layer mask MLP dotted with the mask features. Layer l may only attend where
                 the previous prediction's mask, bilinearly resized to its level, has
                 sigmoid ≥ 0.5 (a query that would see nothing sees everything); no gradient
                 flows through that mask.
  -> {"class_queries_logits": [B, Q, K + 1], "masks_queries_logits": [B, Q, H/4, W/4],
      "auxiliary_logits": the 9 earlier predictions as dicts with the same two keys}

As in HF, the pixel decoder ignores padding (no pixel mask). `model.features(images)` (backbone
and pixel decoder) and `model.decode(mask_features, multi_scale)` are the two halves for
frozen-backbone training and timing.
"""
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segjax.models.layers import NORM_EPSILON, ConvNormAct, imagenet_normalize
from segjax.models.resnet import BasicBlock, Bottleneck, ResNet
from segjax.models.swin import SWIN_VARIANTS, Swin
from segjax.models.transformer import MLP, DecoderLayer, sine_positions
from segjax.ops.ms_deform_attn import ms_deform_attn
from segjax.ops.resize import resize_bilinear

NUM_LEVELS = 3  # feature levels of the deformable attention and the decoder (fixed in HF)
NUM_POINTS = 4  # sampling points per head and level (fixed in HF)
RESNET_BLOCKS = {"basic": BasicBlock, "bottleneck": Bottleneck}

# Model sizes, declared once. Everything not named takes Mask2Former's defaults (the
# constructor's); "full" is the Swin-T model the roadways experiment fine-tunes.
MASK2FORMER_VARIANTS = {
    **{f"swin_{name}": dict(backbone="swin", backbone_config=swin)
       for name, swin in SWIN_VARIANTS.items()},
    "resnet50": dict(backbone="resnet", backbone_config=dict(
        layer_type="bottleneck", depths=(3, 4, 6, 3), width=64)),
    # Narrow and shallow, for tests, from the same classes: every stage has a shifted block,
    # and the 3 decoder layers visit every level once.
    "tiny": dict(backbone="swin", backbone_config=dict(
        embed_dim=16, depths=(2, 2, 2, 2), num_heads=(1, 2, 4, 8), window_size=7),
        feature_size=32, mask_feature_size=32, hidden_dim=32, num_queries=8, num_heads=2,
        encoder_layers=2, encoder_feedforward_dim=64, decoder_layers=4, dim_feedforward=64),
}
MASK2FORMER_VARIANTS["full"] = MASK2FORMER_VARIANTS["swin_tiny"]


class MSDeformAttn(nnx.Module):
    """Multi-scale deformable self-attention over the concatenated levels (Deformable DETR).

    Each query predicts, per head, NUM_POINTS offsets on each level (in pixels of that level,
    added to its reference point) and softmax weights over levels × points; the sampled values
    (`segjax.ops.ms_deform_attn`) are summed and projected. Initialised as HF / the original:
    zero offset weights with per-head directions (cos, sin of 2πh/heads, scaled to max 1, ×
    point index + 1) as bias, zero attention weights, Xavier-uniform projections.
    """

    def __init__(self, d_model: int, num_heads: int, *, method: str | None = None,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        if d_model % num_heads:
            raise ValueError(f"feature size {d_model} is not divisible by {num_heads} heads")
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        theta = np.arange(num_heads) * (2 * np.pi / num_heads)
        grid = np.stack([np.cos(theta), np.sin(theta)], -1)
        grid = grid / np.abs(grid).max(-1, keepdims=True)
        grid = grid[:, None, None, :] * np.arange(1, NUM_POINTS + 1)[None, None, :, None]
        grid = np.broadcast_to(grid, (num_heads, NUM_LEVELS, NUM_POINTS, 2)).reshape(-1)
        zeros, xavier = nnx.initializers.zeros, nnx.initializers.xavier_uniform()
        samples = num_heads * NUM_LEVELS * NUM_POINTS
        self.sampling_offsets = nnx.Linear(
            d_model, samples * 2, kernel_init=zeros,
            bias_init=lambda key, shape, dtype: jnp.asarray(grid, dtype), **precision)
        self.attention_weights = nnx.Linear(d_model, samples, kernel_init=zeros, **precision)
        self.value_proj = nnx.Linear(d_model, d_model, kernel_init=xavier, **precision)
        self.output_proj = nnx.Linear(d_model, d_model, kernel_init=xavier, **precision)
        self.num_heads, self.method = num_heads, method

    def __call__(self, query: jax.Array, value: jax.Array, reference: np.ndarray,
                 shapes: Sequence[tuple[int, int]]) -> jax.Array:
        """query, value [B, S, d]; reference [S, 2] (x, y) in [0, 1]; shapes the levels' (h, w)."""
        batch, length, d_model = value.shape
        heads = self.num_heads
        v = self.value_proj(value).reshape(batch, length, heads, d_model // heads)
        offsets = self.sampling_offsets(query).astype(jnp.float32)
        offsets = offsets.reshape(batch, length, heads, NUM_LEVELS, NUM_POINTS, 2)
        logits = self.attention_weights(query).astype(jnp.float32)
        weights = jax.nn.softmax(logits.reshape(batch, length, heads, NUM_LEVELS * NUM_POINTS))
        weights = weights.reshape(batch, length, heads, NUM_LEVELS, NUM_POINTS)
        normalizer = np.array([(w, h) for h, w in shapes], np.float32)  # offsets are in pixels
        locations = (reference[None, :, None, None, None, :]
                     + offsets / normalizer[None, None, None, :, None, :])
        out = ms_deform_attn(v, shapes, locations, weights.astype(v.dtype), method=self.method)
        return self.output_proj(out)


class PixelDecoderLayer(nnx.Module):
    """Post-norm: x = LN(x + MSDA(x + pos, x)); x = LN(x + fc2(relu(fc1(x))))."""

    def __init__(self, d_model: int, num_heads: int, dim_feedforward: int, *,
                 dropout_rate: float = 0.0, method: str | None = None,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.self_attn = MSDeformAttn(d_model, num_heads, method=method, **precision)
        self.self_attn_layer_norm = nnx.LayerNorm(d_model, epsilon=NORM_EPSILON, **precision)
        self.fc1 = nnx.Linear(d_model, dim_feedforward, **precision)
        self.fc2 = nnx.Linear(dim_feedforward, d_model, **precision)
        self.final_layer_norm = nnx.LayerNorm(d_model, epsilon=NORM_EPSILON, **precision)
        self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

    def __call__(self, x, pos, reference, shapes):
        attended = self.self_attn(x + pos, x, reference, shapes)
        x = self.self_attn_layer_norm(x + self.dropout(attended))
        hidden = self.dropout(nnx.relu(self.fc1(x)))
        return self.final_layer_norm(x + self.dropout(self.fc2(hidden)))


def _reference_points(shapes: Sequence[tuple[int, int]]) -> np.ndarray:
    """Pixel centres (x, y) in [0, 1] of every level, row-major, levels concatenated."""
    points = []
    for h, w in shapes:
        y, x = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
        points.append(np.stack([x.reshape(-1), y.reshape(-1)], -1))
    return np.concatenate(points).astype(np.float32)


class PixelDecoder(nnx.Module):
    """Backbone maps (strides s, 2s, 4s, 8s) -> (mask features at `common_stride`, the three
    encoder outputs at 1/32, 1/16, 1/8); see the module doc."""

    def __init__(
        self,
        in_channels: Sequence[int],
        strides: Sequence[int],
        *,
        feature_size: int = 256,
        mask_feature_size: int = 256,
        num_heads: int = 8,
        encoder_layers: int = 6,
        encoder_feedforward_dim: int = 1024,
        common_stride: int = 4,
        dropout_rate: float = 0.0,
        method: str | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        group = dict(norm="group", num_groups=32, **precision)
        self.input_projections = nnx.List([
            ConvNormAct(c, feature_size, 1, act=None, **group)
            for c in in_channels[::-1][:NUM_LEVELS]])
        self.level_embed = nnx.Param(
            jax.random.normal(rngs.params(), (NUM_LEVELS, feature_size), param_dtype))
        self.layers = nnx.List([
            PixelDecoderLayer(feature_size, num_heads, encoder_feedforward_dim,
                              dropout_rate=dropout_rate, method=method, **precision)
            for _ in range(encoder_layers)])
        # FPN steps from the finest encoder level (stride strides[-3]) down to common_stride.
        num_fpn = int(math.log2(strides[-NUM_LEVELS]) - math.log2(common_stride))
        self.adapters = nnx.List([
            ConvNormAct(c, feature_size, 1, act=None, use_bias=False, **group)
            for c in in_channels[:num_fpn]])
        self.fpn_layers = nnx.List([
            ConvNormAct(feature_size, feature_size, 3, use_bias=False, **group)
            for _ in range(num_fpn)])
        self.mask_projection = nnx.Conv(feature_size, mask_feature_size, (1, 1), **precision)
        self.feature_size = feature_size

    def __call__(self, features: Sequence[jax.Array]) -> tuple[jax.Array, list[jax.Array]]:
        batch, d = features[0].shape[0], self.feature_size
        maps = [project(x) for project, x in zip(self.input_projections, features[::-1])]
        shapes = [tuple(m.shape[1:3]) for m in maps]
        x = jnp.concatenate([m.reshape(batch, -1, d) for m in maps], axis=1)
        level_embed = self.level_embed[...].astype(x.dtype)
        pos = jnp.concatenate([
            jnp.asarray(sine_positions(h, w, d), x.dtype) + level_embed[i]
            for i, (h, w) in enumerate(shapes)])[None]
        reference = _reference_points(shapes)
        for layer in self.layers:
            x = layer(x, pos, reference, shapes)
        outputs, start = [], 0
        for h, w in shapes:
            outputs.append(x[:, start:start + h * w].reshape(batch, h, w, d))
            start += h * w
        y = outputs[-1]
        for i in reversed(range(len(self.adapters))):
            lateral = self.adapters[i](features[i])
            y = self.fpn_layers[i](lateral + resize_bilinear(y, lateral.shape[1:3]))
        return self.mask_projection(y), outputs


class MaskedAttentionDecoder(nnx.Module):
    """(mask features, the three encoder outputs) -> class and mask logits of every layer;
    see the module doc. Includes the class head (HF's top-level `class_predictor`)."""

    def __init__(
        self,
        num_classes: int,
        *,
        in_features: int = 256,
        hidden_dim: int = 256,
        mask_feature_size: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        decoder_layers: int = 10,
        dim_feedforward: int = 2048,
        enforce_input_projection: bool = False,
        dropout_rate: float = 0.0,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_projections = (
            nnx.List([nnx.Conv(in_features, hidden_dim, (1, 1), **precision)
                      for _ in range(NUM_LEVELS)])
            if in_features != hidden_dim or enforce_input_projection else None)
        embed = dict(embedding_init=nnx.initializers.normal(1.0), **precision)
        self.queries_features = nnx.Embed(num_queries, hidden_dim, **embed)
        self.queries_embedder = nnx.Embed(num_queries, hidden_dim, **embed)
        self.level_embed = nnx.Embed(NUM_LEVELS, hidden_dim, **embed)
        self.layers = nnx.List([
            DecoderLayer(hidden_dim, num_heads, dim_feedforward, dropout_rate=dropout_rate,
                         cross_first=True, **precision)
            for _ in range(decoder_layers - 1)])
        self.layernorm = nnx.LayerNorm(hidden_dim, epsilon=NORM_EPSILON, **precision)
        self.mask_embedder = MLP((hidden_dim, hidden_dim, hidden_dim, mask_feature_size),
                                 **precision)
        self.class_predictor = nnx.Linear(hidden_dim, num_classes + 1, **precision)
        self.hidden_dim = hidden_dim

    def __call__(self, mask_features: jax.Array,
                 multi_scale: Sequence[jax.Array]) -> dict[str, jax.Array]:
        batch, d = mask_features.shape[0], self.hidden_dim
        memories, positions, sizes = [], [], []
        level_embed = self.level_embed.embedding[...].astype(mask_features.dtype)
        for i, x in enumerate(multi_scale):
            if self.input_projections is not None:
                x = self.input_projections[i](x)
            _, h, w, _ = x.shape
            sizes.append((h, w))
            memories.append(x.reshape(batch, h * w, d) + level_embed[i])
            positions.append(jnp.asarray(sine_positions(h, w, d), x.dtype)[None])
        queries, query_pos = (
            jnp.broadcast_to(e.embedding[...].astype(mask_features.dtype),
                             (batch, *e.embedding.shape))
            for e in (self.queries_features, self.queries_embedder))
        predictions = [self._predict(queries, mask_features, sizes[0])]
        for i, layer in enumerate(self.layers):
            level = i % NUM_LEVELS
            queries = layer(queries, query_pos, memories[level], positions[level],
                            predictions[-1][2])
            predictions.append(self._predict(queries, mask_features, sizes[(i + 1) % NUM_LEVELS]))
        logits = [{"class_queries_logits": c, "masks_queries_logits": m}
                  for c, m, _ in predictions]
        return {**logits[-1], "auxiliary_logits": logits[:-1]}

    def _predict(self, queries, mask_features, size):
        """(class logits [B, Q, K+1], mask logits [B, Q, h, w], the next layer's attention
        mask [B, 1, Q, size h·w], True = may attend)."""
        normed = self.layernorm(queries)
        masks = jnp.einsum("bqc,byxc->byxq", self.mask_embedder(normed), mask_features)
        small = resize_bilinear(masks, size)
        batch, h, w, num_queries = small.shape
        blocked = (jax.nn.sigmoid(small) < 0.5).reshape(batch, h * w, num_queries)
        blocked = blocked.transpose(0, 2, 1)
        blocked = blocked & ~jnp.all(blocked, axis=-1, keepdims=True)  # never attend to nothing
        allowed = jax.lax.stop_gradient(~blocked)[:, None]
        return self.class_predictor(normed), masks.transpose(0, 3, 1, 2), allowed


class Mask2Former(nnx.Module):
    """Backbone + PixelDecoder + MaskedAttentionDecoder (see the module doc).

    Arguments are HF `Mask2FormerConfig`'s, with its defaults (`decoder_layers` counts the
    query-only prediction, as HF: 10 = 9 layers). `backbone` is "swin" (`backbone_config`:
    `segjax.models.swin.Swin` arguments) or "resnet" (`layer_type` "bottleneck" / "basic",
    `depths`, `width` = the stem width). `msda_method`: `segjax.ops.ms_deform_attn` METHODS,
    None = the backend's default.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        backbone: str = "swin",
        backbone_config: dict | None = None,
        feature_size: int = 256,
        mask_feature_size: int = 256,
        hidden_dim: int = 256,
        num_queries: int = 100,
        num_heads: int = 8,
        encoder_layers: int = 6,
        encoder_feedforward_dim: int = 1024,
        decoder_layers: int = 10,
        dim_feedforward: int = 2048,
        common_stride: int = 4,
        enforce_input_projection: bool = False,
        dropout_rate: float = 0.0,
        msda_method: str | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        backbone_config = dict(SWIN_VARIANTS["tiny"] if backbone_config is None
                               else backbone_config)
        # The architecture's arguments, for writing it back as a transformers config.
        self.arguments = dict(
            backbone=backbone, backbone_config=backbone_config, feature_size=feature_size,
            mask_feature_size=mask_feature_size, hidden_dim=hidden_dim, num_queries=num_queries,
            num_heads=num_heads, encoder_layers=encoder_layers,
            encoder_feedforward_dim=encoder_feedforward_dim, decoder_layers=decoder_layers,
            dim_feedforward=dim_feedforward, common_stride=common_stride,
            enforce_input_projection=enforce_input_projection, dropout_rate=dropout_rate)
        self.num_classes = num_classes
        if backbone == "swin":
            self.backbone = Swin(**backbone_config, **precision)
            patch = backbone_config.get("patch_size", 4)
            strides = [patch * 2**i for i in range(len(self.backbone.out_channels))]
        elif backbone == "resnet":
            config = dict(backbone_config)
            block = RESNET_BLOCKS[config.pop("layer_type", "bottleneck")]
            self.backbone = ResNet(block, config.pop("depths"), **config, **precision)
            strides = [4, 8, 16, 32]
        else:
            raise ValueError(f"unknown backbone {backbone!r}; choose 'swin' or 'resnet'")
        in_channels = self.backbone.out_channels[-4:]
        self.pixel_decoder = PixelDecoder(
            in_channels, strides, feature_size=feature_size, mask_feature_size=mask_feature_size,
            num_heads=num_heads, encoder_layers=encoder_layers,
            encoder_feedforward_dim=encoder_feedforward_dim, common_stride=common_stride,
            dropout_rate=dropout_rate, method=msda_method, **precision)
        self.transformer = MaskedAttentionDecoder(
            num_classes, in_features=feature_size, hidden_dim=hidden_dim,
            mask_feature_size=mask_feature_size, num_queries=num_queries, num_heads=num_heads,
            decoder_layers=decoder_layers, dim_feedforward=dim_feedforward,
            enforce_input_projection=enforce_input_projection, dropout_rate=dropout_rate,
            **precision)
        self.dtype = dtype

    def features(self, images: jax.Array) -> tuple[jax.Array, list[jax.Array]]:
        """RGB [B, H, W, 3] in [0, 1] -> (mask features, multi-scale features)."""
        x = imagenet_normalize(images).astype(self.dtype)
        return self.pixel_decoder(self.backbone(x)[-4:])

    def decode(self, mask_features: jax.Array, multi_scale: Sequence[jax.Array]) -> dict:
        return self.transformer(mask_features, multi_scale)

    def __call__(self, images: jax.Array) -> dict:
        return self.decode(*self.features(images))


# transformers' post_process_semantic_segmentation upsamples the mask logits to 384×384 (its
# preprocessed size) before combining them; None combines them at the model's stride 4.
SEMANTIC_INTERMEDIATE = (384, 384)


def semantic_scores(class_logits: jax.Array, mask_logits: jax.Array,
                    intermediate: tuple[int, int] | None = SEMANTIC_INTERMEDIATE) -> jax.Array:
    """Per-class scores [B, h, w, K] from class logits [B, Q, K + 1] and mask logits [B, Q, h, w]:
    mask logits bilinearly resized to `intermediate` (None: kept), then
    Σ_q softmax(class)[q, c] (without "no object") · sigmoid(mask)[q]."""
    masks = jnp.moveaxis(mask_logits.astype(jnp.float32), 1, -1)  # [B, h, w, Q]
    if intermediate is not None:
        masks = resize_bilinear(masks, intermediate)
    classes = jax.nn.softmax(class_logits.astype(jnp.float32), axis=-1)[..., :-1]
    return jnp.einsum("bqc,byxq->byxc", classes, jax.nn.sigmoid(masks))


def semantic_segmentation(class_logits: jax.Array, mask_logits: jax.Array,
                          size: tuple[int, int],
                          intermediate: tuple[int, int] | None = SEMANTIC_INTERMEDIATE) -> jax.Array:
    """Class per pixel [B, *size] (int32) from class logits [B, Q, K + 1] and mask logits
    [B, Q, h, w], as transformers' `post_process_semantic_segmentation(target_sizes=[size])`:
    `semantic_scores` bilinearly resized to `size`, argmax."""
    scores = semantic_scores(class_logits, mask_logits, intermediate)
    return jnp.argmax(resize_bilinear(scores, size), axis=-1)


EXPORT_OUTPUTS = {"default": ("class_queries_logits", "masks_queries_logits"),
                  "semantic": ("segmentation",)}


def export_forward(model: Mask2Former, images: jax.Array, *, variant: str = "default",
                   intermediate: tuple[int, int] | None = SEMANTIC_INTERMEDIATE) -> tuple:
    """The exported graph: images [B, 3, H, W] float32 RGB in [0, 1] (normalised inside) ->
    "default": (class_queries_logits [B, Q, K + 1], masks_queries_logits [B, Q, H/4, W/4])
    float32, transformers' names and layout; "semantic": (segmentation [B, H, W] int64,), as
    `semantic_segmentation` with `intermediate`. Batch may be dynamic; height and width are
    static (every shape-dependent constant is built in numpy from them)."""
    if variant not in EXPORT_OUTPUTS:
        raise ValueError(f"unknown export variant {variant!r}; choose one of {sorted(EXPORT_OUTPUTS)}")
    out = model(jnp.transpose(images, (0, 2, 3, 1)))
    class_logits = out["class_queries_logits"].astype(jnp.float32)
    mask_logits = out["masks_queries_logits"].astype(jnp.float32)
    if variant == "semantic":
        return (semantic_int64(class_logits, mask_logits, images.shape[2:], intermediate),)
    return class_logits, mask_logits


def semantic_int64(class_logits: jax.Array, mask_logits: jax.Array, size: tuple[int, int],
                   intermediate: tuple[int, int] | None = SEMANTIC_INTERMEDIATE) -> jax.Array:
    """`semantic_segmentation` as int64, transformers' dtype (64-bit in this last op only)."""
    segmentation = semantic_segmentation(class_logits, mask_logits, size, intermediate)
    with jax.enable_x64(True):
        return segmentation.astype(jnp.int64)
