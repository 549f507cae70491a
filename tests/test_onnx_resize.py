"""ONNX export writes segjax's bilinear resize as one ONNX Resize; JAX keeps the einsum."""
import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime
import pytest
from flax import nnx

from segjax import tasks
from segjax.export.onnx import convert, export, format_report
from segjax.ops.resize import resize_bilinear
from segjax.train import resolve_config


def _ops(proto: onnx.ModelProto) -> list[str]:
    return [node.op_type for node in proto.graph.node]


@pytest.mark.parametrize("size", [(23, 64), (4, 3), (16, 16)])  # up, down, mixed (8 x 10 in)
def test_resize_exports_as_one_resize_equal_to_the_einsum(size):
    """NCHW in and out as the models' exports: Resize alone (its transposes cancel), at two batch
    sizes of a dynamic batch, equal to the JAX einsum form (PyTorch's align_corners=False)."""
    def forward(x):
        return jnp.transpose(resize_bilinear(jnp.transpose(x, (0, 2, 3, 1)), size), (0, 3, 1, 2))

    proto = convert(forward, [("x", ("B", 5, 8, 10))], ["y"], 23)
    assert _ops(proto).count("Resize") == 1 and "Einsum" not in _ops(proto) and "Transpose" not in _ops(proto)
    session = onnxruntime.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = np.random.default_rng(batch).standard_normal((batch, 5, 8, 10), dtype=np.float32)
        (actual,) = session.run(["y"], {"x": x})
        np.testing.assert_allclose(actual, jax.jit(forward)(x), rtol=0, atol=1e-5)


def test_jax_programs_keep_the_einsum_after_an_export():
    x = jnp.ones((1, 8, 10, 3))
    convert(lambda x: resize_bilinear(x, (16, 20)), [("x", ("B", 8, 10, 3))], ["y"], 23)
    jaxpr = str(jax.make_jaxpr(lambda x: resize_bilinear(x, (16, 20)))(x))
    assert "dot_general" in jaxpr and "segjax_resize_bilinear" not in jaxpr
    grad = jax.grad(lambda x: resize_bilinear(x, (16, 20)).sum())(x)  # training differentiates it
    assert grad.shape == x.shape and float(grad.sum()) == pytest.approx(16 * 20 * 3)


def test_tiny_hybrid_masks_upsample_with_one_resize(tmp_path):
    """hybrid_p3m's 8 -> 64 mask upsampling: one Resize makes pred_masks, no three-operand Einsum
    is left, and the checked export (batch 1 and 2 of a dynamic batch) within 1e-5 of the JAX model."""
    cfg, _ = resolve_config(["--experiment", "hybrid_p3m", "--set", f"data.demo_root={tmp_path / 'demo'}",
                             "--set", "data.image_size=64"])
    task = tasks.build(cfg)
    model = nnx.jit(lambda: task.build_model(nnx.Rngs(0)))()
    report = export(task, model, tmp_path / "hybrid.onnx", tolerance=1e-5)
    print(format_report(report))
    assert report["passed"] and [c["shapes"]["images"][0] for c in report["checks"]] == [1, 2]
    for check in report["checks"]:
        assert check["outputs"]["pred_masks"]["max_abs_diff"] <= 1e-5
    graph = onnx.load(tmp_path / "hybrid.onnx").graph
    assert [n.op_type for n in graph.node].count("Resize") == 3  # the FPN's two, the masks'
    assert not [n for n in graph.node if n.op_type == "Einsum" and len(n.input) == 3]
    sizes = {i.name: onnx.numpy_helper.to_array(i).tolist() for i in graph.initializer}
    producers = {out: n for n in graph.node for out in n.output}
    mask_resize = producers[graph.output[1].name]  # pred_masks
    assert mask_resize.op_type == "Resize" and sizes[producers[mask_resize.input[3]].input[2]] == [64, 64]
