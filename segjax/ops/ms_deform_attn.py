"""Multi-scale deformable attention sampling (Deformable DETR), pure JAX.

Each query q and head h reads `points` locations on each of `levels` value maps and returns the
attention-weighted sum of the bilinearly sampled values:

  out[b, q, h] = Σ_l Σ_p weight[b, q, h, l, p] · bilinear(value_l[b, :, :, h], loc[b, q, h, l, p])

Sampling is PyTorch's `grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False)`
at grid = 2·loc − 1: the pixel coordinate is loc·size − 0.5 (x by the width, y by the height),
and corners outside the map contribute 0. Two interchangeable forms, both differentiable in the
values, the locations and the weights, and both exportable (standard ONNX ops):

- "gather": the four bilinear corners of every point on every level packed into one index table
  of rows of the values viewed as [B · S · heads, D] and fetched with a single `take`;
  O(queries · levels · points · 4) reads. The backward pass is a scatter-add.
- "dense": per level, the separable bilinear weights are tent functions
  max(0, 1 − |i − y|) · max(0, 1 − |j − x|) over the whole grid (zero padding for free), summed
  into a dense [queries, h·w] matrix that multiplies the values; no gather at all, at
  O(queries · h·w) memory and flops.

`METHODS` names them and `DEFAULT_METHOD` picks one per JAX backend by measurement (README).
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ("gather", "dense")
# Measured at the Swin-T pixel decoder's shapes (README, "Mask2Former"; tools/msda_benchmark.py):
# on CPU the gather form is ~10x faster at 384² and the dense one needs 15-24 GiB at 768². No
# accelerator was available to measure: gather everywhere until one is.
DEFAULT_METHOD = {"cpu": "gather"}


def default_method() -> str:
    return DEFAULT_METHOD.get(jax.default_backend(), "gather")


def ms_deform_attn(
    value: jax.Array,
    shapes: Sequence[tuple[int, int]],
    locations: jax.Array,
    weights: jax.Array,
    *,
    method: str | None = None,
) -> jax.Array:
    """value [B, S, heads, D] (levels' h·w maps flattened row-major and concatenated,
    S = Σ h_l·w_l), `shapes` the static (h_l, w_l), locations [B, Q, heads, L, P, 2] (x, y) in
    [0, 1] of each map, weights [B, Q, heads, L, P] -> [B, Q, heads · D] in value's dtype.

    Locations should be float32: at 1/8 of a 768-pixel input a bfloat16 coordinate is off by up
    to a third of a pixel. `method`: one of METHODS, None = `default_method()`.
    """
    method = default_method() if method is None else method
    batch, total, heads, dim = value.shape
    _, queries, _, levels, _, _ = locations.shape
    if len(shapes) != levels or sum(h * w for h, w in shapes) != total:
        raise ValueError(f"value has {total} positions, locations {levels} levels; the shapes "
                         f"{list(shapes)} do not fit")
    if method == "gather":
        out = _gather(value, shapes, locations, weights)
    elif method == "dense":
        out = _dense(value, shapes, locations, weights)
    else:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    return out.reshape(batch, queries, heads * dim)


def _pixel(locations, shapes):
    """Pixel coordinates (x, y) [B, Q, heads, L, P] of every level in float32."""
    sizes = jnp.asarray([(w, h) for h, w in shapes], jnp.float32)  # [L, 2]
    pixel = locations.astype(jnp.float32) * sizes[:, None, :] - 0.5
    return pixel[..., 0], pixel[..., 1]


def _gather(value, shapes, locations, weights):
    batch, total, heads, dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    x, y = _pixel(locations, shapes)
    x0, y0 = jnp.floor(x), jnp.floor(y)
    fx, fy = x - x0, y - y0
    widths = jnp.asarray([w for _, w in shapes], jnp.float32)[:, None]  # [L, 1]
    heights = jnp.asarray([h for h, _ in shapes], jnp.float32)[:, None]
    starts = jnp.asarray(np.cumsum([0] + [h * w for h, w in shapes[:-1]]), jnp.int32)[:, None]
    # Row of value[b, s, h] in value viewed as [B · S · heads, D]: one gather of D-vectors.
    rows = (jax.lax.broadcasted_iota(jnp.int32, (batch, 1, 1, 1, 1), 0) * (total * heads)
            + jnp.arange(heads, dtype=jnp.int32)[:, None, None])
    indices, corner_weights = [], []
    for dy, dx in ((0, 0), (0, 1), (1, 0), (1, 1)):
        cx, cy = x0 + dx, y0 + dy
        valid = (cx >= 0) & (cx < widths) & (cy >= 0) & (cy < heights)
        bilinear = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
        corner_weights.append(jnp.where(valid, bilinear, 0.0))
        cx = jnp.clip(cx, 0, widths - 1).astype(jnp.int32)
        cy = jnp.clip(cy, 0, heights - 1).astype(jnp.int32)
        indices.append(rows + (starts + cy * widths.astype(jnp.int32) + cx) * heads)
    index = jnp.stack(indices, -1).reshape(-1)  # [B, Q, heads, L, P, 4] flattened
    sampled = jnp.take(value.reshape(-1, dim), index, axis=0, mode="clip")
    sampled = sampled.reshape(batch, queries, heads, levels * points * 4, dim)
    weight = jnp.stack(corner_weights, -1) * weights.astype(jnp.float32)[..., None]
    weight = weight.reshape(batch, queries, heads, -1).astype(value.dtype)
    return jnp.einsum("bqhk,bqhkd->bqhd", weight, sampled)


def _dense(value, shapes, locations, weights):
    x, y = _pixel(locations, shapes)
    out, start = 0, 0
    for level, (h, w) in enumerate(shapes):
        rows = jax.nn.relu(1 - jnp.abs(jnp.arange(h, dtype=jnp.float32) - y[..., level, :, None]))
        cols = jax.nn.relu(1 - jnp.abs(jnp.arange(w, dtype=jnp.float32) - x[..., level, :, None]))
        rows = rows * weights[..., level, :, None].astype(jnp.float32)
        # [B, Q, heads, h, w]: the sampling matrix of this level
        matrix = jnp.einsum("bqhpy,bqhpx->bqhyx", rows, cols).astype(value.dtype)
        level_value = value[:, start:start + h * w].reshape(value.shape[0], h, w, *value.shape[2:])
        out = out + jnp.einsum("bqhyx,byxhd->bqhd", matrix, level_value)
        start += h * w
    return out
