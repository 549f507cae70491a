"""roi_align against onnxruntime's RoiAlign operator, which has torchvision's semantics."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
import pytest
from jax.test_util import check_grads
from onnx import TensorProto, helper

from segjax.ops.roi_align import roi_align

SCALE = 0.25  # 48x40 image pixels onto a 12x10 feature map
N, H, W, C = 2, 12, 10, 3


def ort_roi_align(x, rois, output_size, scale, sampling_ratio, aligned):
    """onnxruntime RoiAlign (opset 16, avg) on NHWC features and [K, 5] rois, NHWC result."""
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    node = helper.make_node(
        "RoiAlign", ["X", "rois", "batch_indices"], ["Y"], mode="avg",
        output_height=out_h, output_width=out_w, sampling_ratio=max(sampling_ratio, 0),
        spatial_scale=scale,
        coordinate_transformation_mode="half_pixel" if aligned else "output_half_pixel",
    )
    graph = helper.make_graph(
        [node], "roi_align",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("rois", TensorProto.FLOAT, None),
         helper.make_tensor_value_info("batch_indices", TensorProto.INT64, None)],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 16)])
    model.ir_version = 8  # onnxruntime 1.31 refuses the IR version onnx 1.23 writes
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2))
    rois = np.asarray(rois, np.float32)
    feeds = {"X": x, "rois": rois[:, 1:].copy(), "batch_indices": rois[:, 0].astype(np.int64)}
    (y,) = session.run(None, feeds)
    return y.transpose(0, 2, 3, 1)


def make_features(seed=0, shape=(N, H, W, C)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def make_rois(seed=0, count=16):
    """Boxes no larger than the map (so the default max_sampling_ratio is exact) of every kind."""
    rng = np.random.default_rng(seed)
    size = rng.uniform(1, [W / SCALE, H / SCALE], (count, 2))
    corner = rng.uniform(0, [W / SCALE, H / SCALE], (count, 2)) - size / 2
    random = np.concatenate([rng.integers(0, N, (count, 1)), corner, corner + size], 1)
    special = [
        [0, -12, -9, 20, 15],     # partly outside (top-left)
        [1, 25, 30, 52, 60],      # partly outside (bottom-right)
        [0, 60, 70, 80, 90],      # wholly outside
        [1, -30, -40, -10, -12],  # wholly outside, negative side
        [0, 10.2, 11.1, 10.9, 11.5],  # sub-pixel
        [1, 13, 7, 13, 30],       # degenerate: x1 == x2
        [0, 20, 20, 20, 20],      # a point
        [1, 0, 0, W / SCALE, H / SCALE],  # the whole image
    ]
    return np.concatenate([random, special]).astype(np.float32)


@pytest.mark.parametrize("output_size", [4, (3, 5), (5, 2)])
@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("aligned", [True, False])
def test_matches_onnxruntime(aligned, sampling_ratio, output_size):
    x, rois = make_features(), make_rois()
    got = roi_align(jnp.asarray(x), jnp.asarray(rois), output_size, SCALE, sampling_ratio, aligned)
    want = ort_roi_align(x, rois, output_size, SCALE, sampling_ratio, aligned)
    assert got.shape == want.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("aligned", [True, False])
def test_rois_larger_than_map(aligned):
    # Adaptive counts here reach ceil(90 / 3) = 30 and exceed the default max of ceil(12 / 3).
    x = make_features()
    rois = np.array([[0, -40, -60, 200, 300], [1, -100, 10, 150, 40], [0, 5, 5, 25, 30]], np.float32)
    got = roi_align(jnp.asarray(x), jnp.asarray(rois), 3, SCALE, -1, aligned, max_sampling_ratio=32)
    want = ort_roi_align(x, rois, 3, SCALE, -1, aligned)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    # Beyond the max, a ROI is sampled with max points per bin, i.e. fixed sampling_ratio=max.
    big = rois[:2]
    capped = roi_align(jnp.asarray(x), jnp.asarray(big), 3, SCALE, -1, aligned, max_sampling_ratio=2)
    want = ort_roi_align(x, big, 3, SCALE, 2, aligned)
    np.testing.assert_allclose(np.asarray(capped), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sampling_ratio", [2, -1])
def test_gradient_matches_finite_differences(sampling_ratio):
    rois = np.array([[0, -3, 2, 14, 17], [1, 4, 1, 9, 13], [1, 0.5, 0.5, 1.5, 2]])
    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(1).standard_normal((2, 5, 4, 2)))
        rois = jnp.asarray(rois)

        def f(features):
            return roi_align(features, rois, (2, 3), 0.3, sampling_ratio, True)

        assert f(x).dtype == jnp.float64
        check_grads(f, (x,), order=1, modes=("fwd", "rev"), eps=1e-4, atol=1e-7, rtol=1e-7)
        assert float(jnp.abs(jax.grad(lambda v: f(v).sum())(x)).sum()) > 0


@pytest.mark.parametrize("sampling_ratio", [2, -1])
@pytest.mark.parametrize("aligned", [True, False])
def test_jit_with_zero_padded_bucket(aligned, sampling_ratio):
    x, rois = jnp.asarray(make_features()), make_rois(count=3)[:3]
    padded = jnp.asarray(np.concatenate([rois, np.zeros((5, 5), np.float32)]))
    f = jax.jit(roi_align, static_argnums=(2, 3, 4, 5))
    out = f(x, padded, (3, 5), SCALE, sampling_ratio, aligned)
    assert out.shape == (8, 3, 5, C)
    assert bool(jnp.isfinite(out).all())
    want = ort_roi_align(np.asarray(x), rois, (3, 5), SCALE, sampling_ratio, aligned)
    np.testing.assert_allclose(np.asarray(out[:3]), want, rtol=1e-5, atol=1e-5)
    grad = jax.jit(jax.grad(lambda v: f(v, padded, (3, 5), SCALE, sampling_ratio, aligned).sum()))(x)
    assert bool(jnp.isfinite(grad).all())


def test_jit_dynamic_roi_count():
    x = make_features()
    f = jax.jit(lambda v, r: roi_align(v, r, (4, 3), SCALE))
    for count in (3, 7):
        rois = make_rois(seed=count, count=count)[:count]
        want = ort_roi_align(x, rois, (4, 3), SCALE, -1, True)
        got = f(jnp.asarray(x), jnp.asarray(rois))
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


def test_bfloat16_keeps_dtype():
    x, rois = make_features(), make_rois()
    got = roi_align(jnp.asarray(x, jnp.bfloat16), jnp.asarray(rois), 4, SCALE)
    assert got.dtype == jnp.bfloat16
    want = ort_roi_align(np.asarray(jnp.asarray(x, jnp.bfloat16), np.float32), rois, 4, SCALE, -1, True)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2e-2, atol=2e-2)


def test_onnx_export_dynamic_batch_and_rois():
    from jax2onnx import to_onnx

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # jax2onnx's own deprecation noise
        model = to_onnx(lambda v, r: roi_align(v, r, (3, 5), SCALE), [("B", H, W, C), ("K", 5)])
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    x, rois = make_features(), make_rois()
    for batch, keep in ((2, slice(None)), (1, rois[:, 0] == 0)):
        (got,) = session.run(None, dict(zip(names, (x[:batch], rois[keep]))))
        want = ort_roi_align(x[:batch], rois[keep], (3, 5), SCALE, -1, True)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_rejects_bad_shapes():
    x = jnp.zeros((1, 4, 4, 2))
    with pytest.raises(ValueError):
        roi_align(x[0], jnp.zeros((1, 5)), 2, 1.0)
    with pytest.raises(ValueError):
        roi_align(x, jnp.zeros((1, 4)), 2, 1.0)
    with pytest.raises(ValueError):
        roi_align(x, jnp.zeros((1, 5)), (2, 0), 1.0)


@pytest.mark.parametrize("aligned", [True, False])
def test_exact_bin_multiples(aligned):
    # 21 cells into 7 bins: ceil(21 / 7) = 3 points per bin, but 21 * (1 / 7) rounds to
    # 3.0000002 in float32, so a reciprocal multiply would take 4.
    x = make_features(shape=(1, 24, 24, 2))
    rois = np.array([[0, 1, 2, 22, 23], [0, 0.5, 0.5, 14.5, 21.5], [0, 3, 3, 10, 17]], np.float32)
    got = roi_align(jnp.asarray(x), jnp.asarray(rois), 7, 1.0, -1, aligned)
    want = ort_roi_align(x, rois, 7, 1.0, -1, aligned)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("output_size", [(3, 5), (5, 2)])  # both contraction orders
def test_per_image_rois_match_indexed_rois(output_size):
    """[N, R, 4] boxes per image equal [K, 5] rows with index k // R (onnxruntime), gradients too."""
    x = make_features()
    boxes = make_rois(count=6)[:6, 1:].reshape(2, 3, 4)
    indexed = np.concatenate([np.repeat(np.arange(2.0), 3)[:, None], boxes.reshape(-1, 4)], 1).astype(np.float32)
    got = roi_align(jnp.asarray(x), jnp.asarray(boxes), output_size, SCALE)
    np.testing.assert_allclose(np.asarray(got), ort_roi_align(x, indexed, output_size, SCALE, -1, True),
                               rtol=1e-5, atol=1e-5)

    def grad(rois):
        return jax.grad(lambda f: (roi_align(f, rois, output_size, SCALE) ** 2).sum())(jnp.asarray(x))

    np.testing.assert_allclose(grad(jnp.asarray(boxes)), grad(jnp.asarray(indexed)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"per-image rois must be \[N=2, R, 4\]"):
        roi_align(jnp.asarray(x), jnp.zeros((3, 1, 4)), 2, 1.0)
