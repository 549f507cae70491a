"""Swin Transformer as a feature backbone (NHWC), as Hugging Face's `SwinBackbone` computes it.

  patch_embed   patch×patch conv (stride patch; input zero-padded right/bottom to a multiple of
                the patch) + LayerNorm
  stages        `depths[i]` blocks at embed_dim·2^i channels, `num_heads[i]` heads; block j of a
                stage uses windows shifted by window_size // 2 when j is odd; between stages a
                patch merging (2×2 neighbours concatenated, LayerNorm, linear 4C -> 2C)
  block         x + drop_path(window_attention(LN(x))), then x + drop_path(mlp(LN(x)))
  outputs       every stage's output before its patch merging, through its own LayerNorm
                (`out_norms`, HF's `hidden_states_norms`): strides 4, 8, 16, 32 for patch 4

Exactly as HF (`always_partition=True`): a map is zero-padded (after the LayerNorm) to a
multiple of the window, padded tokens take part in the attention of unshifted windows, the
shifted windows' attention mask separates the nine cyclic-shift regions with −100, and windows
are never shrunk for small maps. Odd maps are padded by one row/column before patch merging.
Relative position bias: a learned table [(2w−1)², heads] indexed by the static offset of each
query/key pair in the window.
"""
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segjax.models.layers import NORM_EPSILON

# (embed_dim, depths, num_heads, window_size) of Mask2Former's Swin backbones
# (facebook/mask2former-swin-{tiny,small,base-IN21k,large}-*).
SWIN_VARIANTS = {
    "tiny": dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "small": dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24), window_size=7),
    "base": dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32), window_size=12),
    "large": dict(embed_dim=192, depths=(2, 2, 18, 2), num_heads=(6, 12, 24, 48), window_size=12),
}


def _layer_norm(features, **precision):
    return nnx.LayerNorm(features, epsilon=NORM_EPSILON, use_fast_variance=False, **precision)


@functools.cache
def _relative_position_index(window: int) -> np.ndarray:
    """[w², w²] index into the bias table of each (query, key) pair of a window."""
    coords = np.stack(np.meshgrid(np.arange(window), np.arange(window), indexing="ij")).reshape(2, -1)
    relative = coords[:, :, None] - coords[:, None, :] + window - 1  # [2, w², w²], from 0
    return relative[0] * (2 * window - 1) + relative[1]


@functools.cache
def _shift_mask(height: int, width: int, window: int, shift: int) -> np.ndarray:
    """[windows, w², w²] additive mask of shifted windows: −100 between tokens that came from
    different regions of the cyclically shifted (padded) map, 0 within one."""
    def regions(size):
        index = np.arange(size)
        return (index >= size - window).astype(np.int64) + (index >= size - shift)

    label = regions(height)[:, None] * 3 + regions(width)[None, :]
    label = label.reshape(height // window, window, width // window, window)
    label = label.transpose(0, 2, 1, 3).reshape(-1, window * window)
    return np.where(label[:, None, :] != label[:, :, None], -100.0, 0.0).astype(np.float32)


class WindowAttention(nnx.Module):
    """Multi-head self-attention inside windows [N, w², C] with relative position bias and an
    optional additive mask [windows, w², w²] (N = batch · windows)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, *, qkv_bias: bool = True,
                 dtype: jnp.dtype = jnp.float32, param_dtype: jnp.dtype = jnp.float32,
                 rngs: nnx.Rngs):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = nnx.Linear(dim, dim, use_bias=qkv_bias, **precision)
        self.k_proj = nnx.Linear(dim, dim, use_bias=qkv_bias, **precision)
        self.v_proj = nnx.Linear(dim, dim, use_bias=qkv_bias, **precision)
        self.o_proj = nnx.Linear(dim, dim, **precision)
        init = nnx.initializers.truncated_normal(0.02)
        self.relative_position_bias_table = nnx.Param(
            init(rngs.params(), ((2 * window_size - 1) ** 2, num_heads), param_dtype))
        self.num_heads, self.window_size, self.dtype = num_heads, window_size, dtype

    def __call__(self, x: jax.Array, mask: np.ndarray | None) -> jax.Array:
        n, tokens, dim = x.shape
        head_dim = dim // self.num_heads

        def heads(projection):
            return projection(x).reshape(n, tokens, self.num_heads, head_dim)

        q, k, v = heads(self.q_proj), heads(self.k_proj), heads(self.v_proj)
        scores = jnp.einsum("nqhd,nkhd->nhqk", q * head_dim ** -0.5, k).astype(jnp.float32)
        index = _relative_position_index(self.window_size)
        bias = self.relative_position_bias_table[...].astype(jnp.float32)[index]  # [w², w², heads]
        scores = scores + bias.transpose(2, 0, 1)
        if mask is not None:
            windows = mask.shape[0]
            scores = scores.reshape(n // windows, windows, self.num_heads, tokens, tokens)
            scores = (scores + mask[None, :, None]).reshape(n, self.num_heads, tokens, tokens)
        probs = jax.nn.softmax(scores, axis=-1).astype(self.dtype)
        out = jnp.einsum("nhqk,nkhd->nqhd", probs, v).reshape(n, tokens, dim)
        return self.o_proj(out)


class SwinBlock(nnx.Module):
    """One (shifted-)window transformer block on [B, H, W, C] (see the module doc)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift: int, *,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layernorm_before = _layer_norm(dim, **precision)
        self.attention = WindowAttention(dim, num_heads, window_size, **precision)
        self.layernorm_after = _layer_norm(dim, **precision)
        hidden = int(mlp_ratio * dim)
        self.fc1 = nnx.Linear(dim, hidden, **precision)
        self.fc2 = nnx.Linear(hidden, dim, **precision)
        # Stochastic depth: whole samples dropped (and the rest rescaled) in training mode.
        self.drop_path = nnx.Dropout(drop_path, broadcast_dims=(1, 2, 3), rngs=rngs)
        self.window_size, self.shift = window_size, shift

    def __call__(self, x: jax.Array) -> jax.Array:
        batch, height, width, dim = x.shape
        window, shift = self.window_size, self.shift
        h = self.layernorm_before(x)
        pad_h, pad_w = -height % window, -width % window
        h = jnp.pad(h, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
        hp, wp = height + pad_h, width + pad_w
        if shift:
            h = jnp.roll(h, (-shift, -shift), axis=(1, 2))
        windows = h.reshape(batch, hp // window, window, wp // window, window, dim)
        windows = windows.transpose(0, 1, 3, 2, 4, 5).reshape(-1, window * window, dim)
        mask = _shift_mask(hp, wp, window, shift) if shift else None
        h = self.attention(windows, mask)
        h = h.reshape(batch, hp // window, wp // window, window, window, dim)
        h = h.transpose(0, 1, 3, 2, 4, 5).reshape(batch, hp, wp, dim)
        if shift:
            h = jnp.roll(h, (shift, shift), axis=(1, 2))
        x = x + self.drop_path(h[:, :height, :width])
        h = self.fc2(jax.nn.gelu(self.fc1(self.layernorm_after(x)), approximate=False))
        return x + self.drop_path(h)


class PatchMerging(nnx.Module):
    """[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), 2C]: each 2×2 neighbourhood's four vectors
    concatenated in the order (0,0), (1,0), (0,1), (1,1), LayerNorm, linear without bias."""

    def __init__(self, dim: int, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, rngs: nnx.Rngs):
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = _layer_norm(4 * dim, **precision)
        self.reduction = nnx.Linear(4 * dim, 2 * dim, use_bias=False, **precision)

    def __call__(self, x: jax.Array) -> jax.Array:
        _, height, width, _ = x.shape
        x = jnp.pad(x, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)))
        x = jnp.concatenate([x[:, r::2, c::2] for c in range(2) for r in range(2)], axis=-1)
        return self.reduction(self.norm(x))


class Swin(nnx.Module):
    """Swin backbone: normalised images [B, H, W, 3] -> the four stage outputs (strides
    patch·1, 2, 4, 8), each through its LayerNorm; `out_channels` their widths.

    `drop_path_rate` rises linearly over all blocks from 0 (HF / the original), active in
    training mode only.
    """

    def __init__(
        self,
        *,
        embed_dim: int = 96,
        depths: Sequence[int] = (2, 2, 6, 2),
        num_heads: Sequence[int] = (3, 6, 12, 24),
        window_size: int = 7,
        patch_size: int = 4,
        mlp_ratio: float = 4.0,
        drop_path_rate: float = 0.0,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs,
    ):
        if len(depths) != len(num_heads):
            raise ValueError(f"one head count per stage: depths {depths}, num_heads {num_heads}")
        precision = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.patch_embed = nnx.Conv(3, embed_dim, (patch_size, patch_size), patch_size,
                                    padding="VALID", **precision)
        self.embed_norm = _layer_norm(embed_dim, **precision)
        rates = np.linspace(0, drop_path_rate, sum(depths)) if sum(depths) > 1 else [0.0]
        stages, merges, norms, block = [], [], [], 0
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2**i
            stages.append(nnx.List([
                SwinBlock(dim, heads, window_size, 0 if j % 2 == 0 else window_size // 2,
                          mlp_ratio=mlp_ratio, drop_path=float(rates[block + j]), **precision)
                for j in range(depth)]))
            block += depth
            norms.append(_layer_norm(dim, **precision))
            if i < len(depths) - 1:
                merges.append(PatchMerging(dim, **precision))
        self.stages, self.merges, self.out_norms = nnx.List(stages), nnx.List(merges), nnx.List(norms)
        self.patch_size = patch_size
        self.out_channels = tuple(embed_dim * 2**i for i in range(len(depths)))

    def __call__(self, x: jax.Array) -> list[jax.Array]:
        _, height, width, _ = x.shape
        p = self.patch_size
        x = jnp.pad(x, ((0, 0), (0, -height % p), (0, -width % p), (0, 0)))
        x = self.embed_norm(self.patch_embed(x))
        features = []
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x)
            features.append(self.out_norms[i](x))
            if i < len(self.merges):
                x = self.merges[i](x)
        return features
