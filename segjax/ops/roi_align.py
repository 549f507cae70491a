"""RoIAlign with torchvision / onnxruntime semantics, written as bilinear-weight contractions.

Formulation. Every output bin of RoIAlign averages bilinear samples taken on a regular
grid of points. Bilinear weights factor into a row part and a column part, and so does
the "point outside the map contributes 0" rule, so the whole op is separable: for each
ROI we build an interpolation matrix ``Wy [K, out_h, H]`` (the bilinear row weights of all
sample points of a bin, averaged) and ``Wx [K, out_w, W]``, and the output is
``sum_hw Wy[k,y,h] Wx[k,x,w] F[b_k,h,w,c]``. This is exact, not an approximation.

Rois given per image (``[N, R, 4]``, torchvision's list of per-image boxes with R boxes each, the
layout of a training batch) need no selection: each image's weights meet only its own map, one
batched GEMM ``[N][R*out_h, H] @ [N][H, W*C]``. For rois ``[K, 5]`` with batch indices,
batch selection is folded into ``Wy`` as a one-hot over images instead of gathering
``features[batch_idx]``: a gather materialises ``[K, H, W, C]`` (128 ROIs on an 80x80x1024
map is 3.4 GB in float32) and its backward is a scatter-add of the same size, whereas the
one-hot form is one dense GEMM ``[K*out_h, N*H] @ [N*H, W*C]`` that reads the feature map
once and whose backward is again a GEMM. It spends N times the FLOPs of the gather form on
that first contraction (the weights for the other images are zero), which is cheap next to
the gather's memory traffic for the per-device batches detection models use. Everything is
iota / compare / clip / einsum, so jax2onnx exports it with a dynamic ROI count and batch.

Memory, float32 elements, with ``S`` the number of sample points evaluated per bin and axis:
  weights   ``K*out_h*N*H + K*out_w*W`` (plus ``K*out*S*H`` to build them; fused under XLA),
  middle    ``min(K*out_h*W*C, K*H*out_w*C)`` (the cheaper contraction order is picked),
  output    ``K*out_h*out_w*C``.
For 128 ROIs, 28x28 bins and an 80x80x1024 map: 1.2 GB middle and 0.4 GB output (float32).
"""
import functools
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    if isinstance(value, int):
        value = (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2 or min(value) < 1:
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value}")
    return value


def _exact_div(a, b):
    """``a / b`` rounded as IEEE division.

    XLA rewrites division by a constant or a broadcast into multiplication by a reciprocal,
    which is an ulp off: enough to turn ceil(21 / 7) into 4 or move a sample point from
    exactly ``H`` (kept by the reference) to just past it (dropped). The barrier hides the
    divisor from that rewrite; jax2onnx exports it as an Identity.
    """
    a, b = jnp.broadcast_arrays(a, b)
    return a / lax.optimization_barrier(b)


def _axis_weights(start, bin_size, out_len: int, in_len: int, grid, max_grid: int, dtype):
    """Averaged bilinear weights ``[K, out_len, in_len]`` along one axis.

    ``start``/``bin_size``: [K] ROI start and bin extent in feature cells; ``grid``: sample
    points per bin, a [K] float array (may be <= 0) or an int; ``max_grid``: how many are
    evaluated.
    """
    start, bin_size = start[:, None, None], bin_size[:, None, None]
    bins = jnp.arange(out_len, dtype=dtype)[None, :, None]
    points = jnp.arange(max_grid, dtype=dtype)[None, None, :]
    grid = jnp.reshape(jnp.asarray(grid, dtype), (-1, 1, 1))
    divisor = jnp.maximum(grid, 1.0)
    # Same expression order as the reference kernels. XLA still contracts multiply-adds into
    # FMAs (as nvcc does for their CUDA builds), so positions may be an ulp apart.
    pos = start + bins * bin_size + _exact_div((points + 0.5) * bin_size, divisor)
    keep = (pos >= -1) & (pos <= in_len) & (points < grid)
    pos = jnp.clip(pos, 0.0, in_len - 1.0)
    # On [0, in_len - 1] the tent max(0, 1 - |pos - i|) is exactly the reference's
    # (1 - ly, ly) split between floor(pos) and floor(pos) + 1, including its clamp to the
    # last row, and needs no integer indexing (friendlier to ONNX export).
    cells = jnp.arange(in_len, dtype=dtype)
    tent = jnp.maximum(1.0 - jnp.abs(pos[..., None] - cells), 0.0)
    tent = jnp.where(keep[..., None], tent, 0.0)
    return tent.sum(axis=2) / divisor


# Jitted with the configuration static: op-by-op dispatch compiles dozens of tiny kernels.
@functools.partial(
    jax.jit,
    static_argnames=(
        "output_size", "spatial_scale", "sampling_ratio", "aligned", "max_sampling_ratio", "precision"
    ),
)
def roi_align(
    features: jax.Array,
    rois: jax.Array,
    output_size: int | Sequence[int],
    spatial_scale: float,
    sampling_ratio: int = -1,
    aligned: bool = True,
    *,
    max_sampling_ratio: int | None = None,
    precision: lax.Precision | None = lax.Precision.HIGHEST,
) -> jax.Array:
    """RoIAlign, equal to ``torchvision.ops.roi_align`` and onnxruntime ``RoiAlign`` (avg).

    Args:
        features: ``[N, H, W, C]`` feature maps (NHWC).
        rois: ``[K, 5]`` rows ``[batch_index, x1, y1, x2, y2]`` in input-image pixels. The
            batch index is truncated to an int; an index outside ``[0, N)`` gives zeros.
            Rows of zeros (padding to a fixed ROI bucket) give finite values. Or ``[N, R, 4]``:
            R boxes ``[x1, y1, x2, y2]`` on each image, the same as ``[K, 5]`` rows with index
            ``k // R`` but N times cheaper for N images (no one-hot selection).
        output_size: ``out_h`` and ``out_w`` as an int or a tuple. This and the other
            arguments after ``rois`` are static (hashable, one compile per value).
        spatial_scale: maps image pixels to feature cells, e.g. 1/8 for a stride-8 map.
        sampling_ratio: sample points per bin along each axis; ``<= 0`` is adaptive:
            ``ceil(roi_h / out_h)`` rows and ``ceil(roi_w / out_w)`` columns for each ROI.
        aligned: the pixel model. With ``aligned=False`` (the legacy RoIAlign, onnx
            "output_half_pixel") a box corner ``x`` maps to ``x * spatial_scale``, i.e. pixel
            indices are treated as continuous coordinates, so a box is misaligned by half a
            pixel against the bilinear sampling of pixel centres, and ROI width and height
            are clamped to at least one cell. With ``aligned=True`` (onnx "half_pixel") the
            corner maps to ``x * spatial_scale - 0.5``: a pixel's centre is at ``i + 0.5``
            in box coordinates, so a box [0, 2] covers exactly pixels 0 and 1 and sampling
            is symmetric; there is no minimum ROI size. Use True unless matching a model
            trained with the legacy op.
        max_sampling_ratio: adaptive mode only. Shapes must be static under ``jit``, so a
            fixed number of points per bin and axis is evaluated and those beyond each
            ROI's own count are masked out. The result equals the reference for every ROI
            whose adaptive count is <= this; a ROI needing more is sampled with this many
            evenly spaced points per bin (the reference with ``sampling_ratio`` set to it).
            ``None`` uses ``ceil(H / out_h)`` and ``ceil(W / out_w)``, which covers every ROI
            no larger than the feature map (any box clipped to the image). The weight-build
            cost grows linearly with it.
        precision: matmul precision of the contractions. HIGHEST keeps float32 exact on GPUs,
            whose default uses TF32 (about 1e-3 relative error); pass None for speed.

    Returns:
        ``[K, out_h, out_w, C]`` in ``features.dtype``; computed in at least float32.
        Differentiable with respect to ``features``. Against onnxruntime's float32 kernel the
        error is about ulp(sample position) times the feature slope: 3e-6 on a 12x10 map and
        4e-5 on an 80x80 one for unit-variance features, from XLA's FMA contraction.
    """
    if features.ndim != 4:
        raise ValueError(f"features must be [N, H, W, C], got shape {features.shape}")
    n, h, w, c = features.shape
    per_image = rois.ndim == 3
    if per_image and rois.shape[::2] != (n, 4):
        raise ValueError(f"per-image rois must be [N={n}, R, 4], got shape {rois.shape}")
    if not per_image and (rois.ndim != 2 or rois.shape[1] != 5):
        raise ValueError(f"rois must be [K, 5] or [N, R, 4], got shape {rois.shape}")
    out_h, out_w = _pair(output_size, "output_size")
    dtype = jnp.promote_types(features.dtype, jnp.float32)
    rois = rois.astype(dtype)
    boxes = rois.reshape(-1, 4) if per_image else rois[:, 1:]

    offset = 0.5 if aligned else 0.0
    x1, y1, x2, y2 = (boxes[:, i] * spatial_scale - offset for i in range(4))
    roi_w, roi_h = x2 - x1, y2 - y1
    if not aligned:
        roi_w, roi_h = jnp.maximum(roi_w, 1.0), jnp.maximum(roi_h, 1.0)

    bin_h = _exact_div(roi_h, jnp.asarray(out_h, dtype))
    bin_w = _exact_div(roi_w, jnp.asarray(out_w, dtype))

    if sampling_ratio > 0:
        grid_h = grid_w = max_h = max_w = sampling_ratio
    else:
        if max_sampling_ratio is None:
            max_h, max_w = max(1, math.ceil(h / out_h)), max(1, math.ceil(w / out_w))
        else:
            max_h = max_w = int(max_sampling_ratio)
        # The references' ceil(roi_h / out_h) is ceil of the bin size.
        grid_h = jnp.minimum(jnp.ceil(bin_h), max_h)
        grid_w = jnp.minimum(jnp.ceil(bin_w), max_w)

    wy = _axis_weights(y1, bin_h, out_h, h, grid_h, max_h, dtype)
    wx = _axis_weights(x1, bin_w, out_w, w, grid_w, max_w, dtype)
    x = features.astype(dtype)
    if per_image:
        wy, wx = wy.reshape(n, -1, out_h, h), wx.reshape(n, -1, out_w, w)
        if out_h * w <= h * out_w:
            mid = jnp.einsum("nryh,nhwc->nrywc", wy, x, precision=precision)
            out = jnp.einsum("nrxw,nrywc->nryxc", wx, mid, precision=precision)
        else:
            mid = jnp.einsum("nrxw,nhwc->nrhxc", wx, x, precision=precision)
            out = jnp.einsum("nryh,nrhxc->nryxc", wy, mid, precision=precision)
        return out.reshape(-1, out_h, out_w, c).astype(features.dtype)
    # iota rather than arange: jax2onnx mis-sizes arange(n) when the batch is dynamic.
    images = lax.broadcasted_iota(jnp.int32, (1, n), 1)
    select = (rois[:, :1].astype(jnp.int32) == images).astype(dtype)

    # Contract the axis whose intermediate is smaller first; the selection rides along.
    if out_h * w <= h * out_w:
        wy_n = jnp.einsum("kn,kyh->kynh", select, wy)
        mid = jnp.einsum("kynh,nhwc->kywc", wy_n, x, precision=precision)
        out = jnp.einsum("kxw,kywc->kyxc", wx, mid, precision=precision)
    else:
        wx_n = jnp.einsum("kn,kxw->kxnw", select, wx)
        mid = jnp.einsum("kxnw,nhwc->khxc", wx_n, x, precision=precision)
        out = jnp.einsum("kyh,khxc->kyxc", wy, mid, precision=precision)
    return out.astype(features.dtype)
