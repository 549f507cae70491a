"""ONNX export of a task's model with jax2onnx, checked against the JAX model with onnxruntime.

The exporter never branches on an experiment; the task supplies the interface:
- `task.export_signature(variant)` -> ([(input name, shape)], [output names]); str dims are
  dynamic, ints fixed;
- `task.export_forward(model, *inputs, variant=)` -> tuple of outputs: NCHW float32 inputs (images
  RGB in [0, 1]; the models normalise) to NCHW outputs, as the PyTorch originals.
Two input names of the PyTorch originals mean something here: `images` (`height`/`width` set its
size; validation images feed it in the fp16 check) and `rois` (checked with valid boxes, see
`runtime.random_inputs`).

Format: IR 10, opset 23 (what jax2onnx 0.17 writes and onnxruntime 1.31 loads), weights inside
the one .onnx file, metadata in `metadata_props` as JSON values (`runtime.read_metadata`), so a
served model needs nothing else. fp16: the exported f32 graph converted by onnxruntime's float16
tool, inputs and outputs kept float32.

The check runs the written file with onnxruntime (CPU) and the JAX model on the same inputs: random
ones for each dynamic dimension at sizes 1 and 2 (two batch sizes, two ROI counts), and with fp16
also validation images. Every output must satisfy max |onnx - jax| <= tolerance × max(1, max |jax|)
(TOLERANCE: fp32 1e-4, fp16 3e-2); with fp16 the argmax over the class axis (axis 1 of 4-D
outputs, else the last) must also agree on at least 99% of positions. A model that fails is left
at `<out>.unchecked.onnx` and ExportCheckError is raised.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import logging
import os
import tomllib
import warnings
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
import onnx
import onnx_ir as ir
from flax import nnx
from jax._src import core as jax_core
from jax2onnx import to_onnx
from jax2onnx.plugins._ir_shapes import _ensure_value_metadata, _stamp_type_and_shape, _to_ir_dim_for_shape
from jax2onnx.plugins._patching import MonkeyPatchSpec
from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive
from onnxruntime.transformers.float16 import convert_float_to_float16
from PIL import Image

from segjax import config as config_lib
from segjax.export.runtime import concrete_shape, make_session, random_inputs
from segjax.ops import resize as resize_lib

# jax 0.12 merged ClosedJaxpr into Jaxpr (which still takes the legacy `(jaxpr, consts)` form, and
# jax.extend.core exports it under the old name too); jax2onnx 0.17.1's jit plugin asks
# jax._src.core for ClosedJaxpr and fails on every model without it.
if not hasattr(jax_core, "ClosedJaxpr"):
    jax_core.ClosedJaxpr = jax_core.Jaxpr

OPSET = 23
TOLERANCE = {"fp32": 1e-4, "fp16": 3e-2}  # of max(1, max |jax output|)
MIN_FP16_ARGMAX_AGREEMENT = 0.99
NORMALIZATION = "RGB [0,1], ImageNet mean/std inside the graph"
CHECK_SIZES = (1, 2)  # every dynamic dimension is checked at each of these sizes


class ExportCheckError(RuntimeError):
    """The exported model's outputs differ from the JAX model's beyond the tolerance."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


def export(
    task,
    model: nnx.Module,
    out_path: str | Path,
    *,
    variant: str = "default",
    batch: str | int = "dynamic",
    height: int | None = None,
    width: int | None = None,
    fp16: bool = False,
    opset: int = OPSET,
    tolerance: float | None = None,
    num_images: int = 4,
    seed: int = 0,
) -> dict:
    """Exports `model` (in eval mode, whatever its own mode) to `out_path` and checks the file.

    `batch`: "dynamic" or a fixed batch size; `height`/`width`: the `images` input's size
    (default: the task's); `tolerance`: replaces TOLERANCE[precision]; `num_images`: validation
    images in the fp16 check. Returns the report (see `format_report`).
    """
    precision = "fp16" if fp16 else "fp32"
    tolerance = TOLERANCE[precision] if tolerance is None else tolerance
    signature, output_names = task.export_signature(variant)
    specs = _resolve_specs(signature, batch, height, width)
    model = nnx.view(model, deterministic=True, use_running_average=True, raise_if_not_found=False)
    forward = functools.partial(task.export_forward, variant=variant)

    proto = convert(functools.partial(forward, model), specs, output_names, opset)
    if fp16:
        proto = convert_float_to_float16(proto, keep_io_types=True)
    metadata = {
        "experiment": task.cfg.experiment,
        "task": task.cfg.task,
        "class_names": list(task.class_names),
        "variant": variant,
        "inputs": {name: list(shape) for name, shape in specs},
        "outputs": list(output_names),
        "input_size": list(specs[0][1][-2:]),
        "normalization": NORMALIZATION if "images" in dict(specs) else "none: the inputs are features",
        "precision": precision,  # weights and arithmetic; inputs and outputs are float32
        "segjax_version": segjax_version(),
        "config": json.loads(config_lib.to_json(task.cfg)),  # rebuilds the task (segjax.predict --onnx)
    }
    onnx.helper.set_model_props(proto, {key: json.dumps(value) for key, value in metadata.items()})
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    unchecked = out_path.with_name(out_path.stem + ".unchecked.onnx")
    onnx.save(proto, unchecked)

    session = make_session(unchecked, prefer=("cpu",))
    graphdef, state = nnx.split(model)
    reference = jax.jit(lambda s, *x: forward(nnx.merge(graphdef, s), *x))
    checks = []
    for source, inputs in _check_inputs(task, specs, fp16, num_images, seed):
        expected = reference(state, *(inputs[name] for name, _ in specs))
        actual = session.run(list(output_names), inputs)
        dims = {name: list(x.shape) for name, x in inputs.items()}
        checks.append({"inputs": source, "shapes": dims, "outputs": {
            name: _compare(np.asarray(e), a) for name, e, a in zip(output_names, expected, actual)}})

    failures = [f"{check['inputs']} {check['shapes']} {name}: {problem}" for check in checks
                for name, result in check["outputs"].items() if (problem := _problem(result, tolerance, fp16))]
    report = {"path": str(out_path), "precision": precision, "variant": variant, "tolerance": tolerance,
              "min_argmax_agreement": MIN_FP16_ARGMAX_AGREEMENT if fp16 else None, "metadata": metadata,
              "checks": checks, "passed": not failures}
    if failures:
        report["path"] = str(unchecked)
        raise ExportCheckError(f"ONNX model differs from the JAX model ({'; '.join(failures)}); "
                               f"the unchecked model is at {unchecked}", report)
    os.replace(unchecked, out_path)
    return report


def format_report(report: dict) -> str:
    """One line per checked output: max |onnx - jax|, its bound and the argmax agreement."""
    lines = [f"{report['path']} ({report['precision']}, variant {report['variant']}): "
             f"{'passed' if report['passed'] else 'FAILED'}"]
    for check in report["checks"]:
        shapes = ", ".join(f"{name} {shape}" for name, shape in check["shapes"].items())
        for name, r in check["outputs"].items():
            lines.append(f"  {check['inputs']:<8} {shapes}  {name}: max |onnx - jax| {r['max_abs_diff']:.2e} "
                         f"(bound {report['tolerance'] * r['scale']:.1e}), "
                         f"argmax agreement {r['argmax_agreement']:.4%}")
    return "\n".join(lines)


def segjax_version() -> str:
    """The installed package's version, else the source tree's pyproject.toml's."""
    try:
        return importlib.metadata.version("segjax")
    except importlib.metadata.PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[2] / "pyproject.toml"
        return tomllib.loads(pyproject.read_text())["project"]["version"] if pyproject.is_file() else "unknown"


def _resolve_specs(signature: Sequence[tuple[str, tuple]], batch: str | int, height: int | None,
                   width: int | None) -> list[tuple[str, tuple]]:
    """The task's signature with a fixed batch size and the `images` size applied."""
    if batch != "dynamic" and (not isinstance(batch, int) or batch < 1):
        raise ValueError(f"batch must be 'dynamic' or a positive int, got {batch!r}")
    batch_dim = signature[0][1][0]
    specs, resized = [], False
    for name, shape in signature:
        shape = [batch if d == batch_dim and batch != "dynamic" else d for d in shape]
        if name == "images" and (height or width):
            shape[-2:] = [height or shape[-2], width or shape[-1]]
            resized = True
        specs.append((name, tuple(shape)))
    if (height or width) and not resized:
        raise ValueError(f"height/width set the size of an `images` input; this model's inputs are "
                         f"{[name for name, _ in signature]}")
    return specs


@contextlib.contextmanager
def _quiet(logger_name: str):
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def convert(forward, specs: Sequence[tuple[str, tuple]], output_names: Sequence[str], opset: int) -> onnx.ModelProto:
    """`forward` to an ONNX model with inputs `specs` ([(name, shape)], str dims dynamic), unchecked."""
    # jax2onnx's own DeprecationWarnings and onnx_ir's notes about its internal values are noise.
    with warnings.catch_warnings(), _quiet("onnx_ir"):
        warnings.simplefilter("ignore", DeprecationWarning)
        proto = to_onnx(forward, [shape for _, shape in specs], opset=opset,
                        input_names=[name for name, _ in specs], output_names=list(output_names))
    # jax2onnx's layout pass turns NHWC tensors into NCHW but keeps their NHWC shapes in
    # value_info; onnxruntime trusts those hints and refuses the model (e.g. "Incompatible
    # dimensions" at a ResNet's residual Add). The hints are optional: drop them.
    del proto.graph.value_info[:]
    return proto


# --- bilinear resizing as one ONNX Resize ------------------------------------------------------
# segjax resizes with an einsum of interpolation matrices (segjax.ops.resize), which jax2onnx
# writes as a three-operand Einsum; onnxruntime's Resize computes the same interpolation several
# times faster. While jax2onnx traces, `resize._bilinear` binds this primitive instead, and the
# plugin lowers it to Resize(linear, half_pixel) of the NCHW tensor. half_pixel with clamped edges
# is PyTorch's align_corners=False rule, which the matrices encode; the export check compares them.
_bilinear_einsum = resize_lib._bilinear
resize_bilinear_p = jax.extend.core.Primitive("segjax_resize_bilinear")
resize_bilinear_p.def_impl(lambda x, *, size: _bilinear_einsum(x, size))
resize_bilinear_p.def_abstract_eval(
    lambda x, *, size: jax.core.ShapedArray((x.shape[0], *size, x.shape[3]), x.dtype))


@register_primitive(jaxpr_primitive=resize_bilinear_p.name, context="primitives.segjax", component="resize_bilinear")
class ResizeBilinearPlugin(PrimitiveLeafPlugin):
    """[N, H, W, C] -> [N, *size, C] as Transpose, one ONNX Resize, Transpose."""

    _PRIM = resize_bilinear_p

    def lower(self, ctx, eqn) -> None:
        (x_var,), (out_var,) = eqn.invars, eqn.outvars
        x = ctx.get_value_for_var(x_var, name_hint=ctx.fresh_name("resize_input"))
        dtype = x.type.dtype
        x = self._transpose(ctx, x, [0, 3, 1, 2], dtype)  # cancels against the models' NCHW transposes
        # sizes [N, C, *size], N and C read at run time so that the batch stays dynamic. (Resize's
        # `axes` would avoid that, but onnxruntime's transpose optimiser then breaks the model.)
        n, c = (ctx.builder.Shape(x, _outputs=[ctx.fresh_name("resize_dim")], start=i, end=i + 1) for i in (0, 1))
        hw = ctx.builder.add_initializer_from_array(name=ctx.fresh_name("resize_hw"),
                                                    array=np.asarray(eqn.params["size"], np.int64))
        sizes = ctx.builder.Concat(n, c, hw, _outputs=[ctx.fresh_name("resize_sizes")], axis=0)
        out = ctx.builder.Resize(x, None, None, sizes, _outputs=[ctx.fresh_name("resize_out")],
                                 mode="linear", coordinate_transformation_mode="half_pixel")
        n, h, w, c = out_var.aval.shape
        self._stamp(ctx, out, (n, c, h, w), dtype)  # the model's output once the transposes cancel
        out = self._transpose(ctx, out, [0, 2, 3, 1], dtype)
        self._stamp(ctx, out, (n, h, w, c), dtype)
        ctx.bind_value_for_var(out_var, out)

    @staticmethod
    def _transpose(ctx, x, perm, dtype):
        out = ctx.builder.Transpose(x, _outputs=[ctx.fresh_name("resize_transpose")], perm=perm)
        out.type = ir.TensorType(dtype)
        return out

    @staticmethod
    def _stamp(ctx, value, shape, dtype):
        value.type = ir.TensorType(dtype)
        _stamp_type_and_shape(value, tuple(_to_ir_dim_for_shape(d) for d in shape))
        _ensure_value_metadata(ctx, value)

    @classmethod
    def binding_specs(cls) -> list[MonkeyPatchSpec]:
        return [MonkeyPatchSpec(target="segjax.ops.resize", attr="_bilinear",
                                make_value=lambda _: lambda x, size: resize_bilinear_p.bind(x, size=tuple(size)))]


def _check_inputs(task, specs, fp16: bool, num_images: int, seed: int):
    """(name, inputs) pairs: random inputs per check size, then validation images for fp16."""
    dynamic = sorted({d for _, shape in specs for d in shape if isinstance(d, str)})
    for size in CHECK_SIZES if dynamic else (None,):
        dims = dict.fromkeys(dynamic, size)
        yield "random", random_inputs([(name, concrete_shape(shape, dims)) for name, shape in specs], seed)
    shape = dict(specs).get("images")
    if fp16 and shape is not None:
        batch = shape[0]
        images = _validation_images(task, num_images if isinstance(batch, str) else batch, shape[-2:])
        dims = dict.fromkeys(dynamic, CHECK_SIZES[-1])
        if isinstance(batch, str):
            dims[batch] = len(images)
        inputs = random_inputs([(name, concrete_shape(s, dims)) for name, s in specs], seed)
        yield "images", inputs | {"images": images}


def _validation_images(task, count: int, size: tuple[int, int]) -> np.ndarray:
    """`count` readable validation images of the task as NCHW float32 in [0, 1], resized to `size`
    (repeated when the set has fewer)."""
    source, transform = task.val_data()
    images = []
    for index in range(len(source)):
        record = transform(source[index])
        if record.get("image_ok", True):
            image = Image.fromarray(np.asarray(record["image"], np.uint8))
            if image.size != (size[1], size[0]):
                image = image.resize((size[1], size[0]), Image.BILINEAR)
            images.append(np.asarray(image))
        if len(images) == count:
            break
    if not images:
        raise ValueError("the task's validation set has no readable image for the fp16 check")
    images = np.stack([images[i % len(images)] for i in range(count)])
    return images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0


def _problem(result: dict, tolerance: float, fp16: bool) -> str | None:
    """Why one compared output fails the check, or None."""
    if result["max_abs_diff"] > tolerance * result["scale"]:
        return f"max |onnx - jax| {result['max_abs_diff']:.3g} > {tolerance:g} × {result['scale']:.3g}"
    if fp16 and result["argmax_agreement"] < MIN_FP16_ARGMAX_AGREEMENT:
        return f"argmax agreement {result['argmax_agreement']:.2%} < {MIN_FP16_ARGMAX_AGREEMENT:.0%}"
    return None


def _compare(expected: np.ndarray, actual: np.ndarray) -> dict:
    if expected.shape != actual.shape:
        raise ValueError(f"ONNX output shape {actual.shape} differs from the JAX model's {expected.shape}")
    expected = expected.astype(np.float32)
    axis = 1 if expected.ndim == 4 else -1
    return {"max_abs_diff": float(np.abs(actual - expected).max()),
            "scale": max(1.0, float(np.abs(expected).max())),
            "argmax_agreement": float((actual.argmax(axis) == expected.argmax(axis)).mean())}
