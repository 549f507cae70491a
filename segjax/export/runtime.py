"""onnxruntime sessions: provider choice with fallback, TensorRT engine cache, model metadata,
example inputs and latency benchmarks."""
from __future__ import annotations

import json
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnxruntime.capi.onnxruntime_pybind11_state import Fail, InvalidGraph, InvalidProtobuf

logger = logging.getLogger(__name__)

DEFAULT_PREFER = ("tensorrt", "cuda", "cpu")

# Short names users type; full onnxruntime provider names are accepted as well.
_ALIASES = {
    "tensorrt": "TensorrtExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "cpu": "CPUExecutionProvider",
}
_CPU = _ALIASES["cpu"]
_TRT = _ALIASES["tensorrt"]


def provider_name(name: str) -> str:
    """onnxruntime's name of a provider given by short name ("cuda") or full name."""
    full = _ALIASES.get(name.lower(), name)
    if full not in ort.get_all_providers():
        raise ValueError(f"unknown onnxruntime provider {name!r}; use one of {sorted(_ALIASES)} "
                         f"or a full name from onnxruntime.get_all_providers()")
    return full


def available_providers(prefer: Sequence[str] = DEFAULT_PREFER) -> list[str]:
    """The preferred providers this onnxruntime build has, in order; logs each one it lacks.

    CPU is appended when nothing preferred is available, so the result is never empty.
    """
    have = ort.get_available_providers()
    chosen = []
    for name in prefer:
        full = provider_name(name)
        if full in have:
            chosen.append(full)
        else:
            logger.warning("onnxruntime: %s is not available (have %s); falling back", full, ", ".join(have))
    if not chosen:
        logger.warning("onnxruntime: none of %s is available; using %s", list(prefer), _CPU)
        chosen.append(_CPU)
    return chosen


def make_session(
    model_path: str | Path,
    *,
    prefer: Sequence[str] = DEFAULT_PREFER,
    fp16: bool = False,
    trt_cache_dir: str | Path | None = None,
    intra_op_threads: int | None = None,
) -> ort.InferenceSession:
    """An InferenceSession on the first available of `prefer` (TensorRT -> CUDA -> CPU by default).

    With TensorRT, built engines are cached in `trt_cache_dir` (default `<model>.trt_cache/`),
    because building one takes minutes; `fp16` lets TensorRT pick half-precision kernels.
    """
    path = Path(model_path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model not found: {path}")
    providers = available_providers(prefer)
    provider_args: list[str | tuple[str, dict[str, str]]] = list(providers)
    if _TRT in providers:
        cache = Path(trt_cache_dir) if trt_cache_dir is not None else path.with_name(path.name + ".trt_cache")
        cache.mkdir(parents=True, exist_ok=True)
        provider_args[providers.index(_TRT)] = (_TRT, {
            "trt_engine_cache_enable": "True",
            "trt_engine_cache_path": str(cache),
            "trt_fp16_enable": str(fp16),
        })
    elif fp16:
        logger.warning("onnxruntime: fp16 only applies to TensorRT, which is not in use; running the model as stored")
    options = ort.SessionOptions()
    if intra_op_threads is not None:
        options.intra_op_num_threads = intra_op_threads
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=provider_args)
    except (InvalidProtobuf, InvalidGraph, Fail) as err:
        raise ValueError(f"cannot load ONNX model {path}: {err}") from err
    # A provider can be listed as available and still fail to start (missing CUDA/TensorRT
    # libraries); onnxruntime then drops it quietly, so say so in our log.
    for name in providers:
        if name not in session.get_providers():
            logger.warning("onnxruntime: %s failed to start for %s; using %s", name, path, session.get_providers())
    return session


def read_metadata(source: ort.InferenceSession | str | Path) -> dict[str, object]:
    """The model's custom metadata, from a session or an .onnx file; values that are valid JSON
    are decoded, others stay strings."""
    if isinstance(source, ort.InferenceSession):
        props = source.get_modelmeta().custom_metadata_map
    else:
        props = {p.key: p.value for p in onnx.load(str(source), load_external_data=False).metadata_props}
    meta: dict[str, object] = {}
    for key, value in props.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return meta


def concrete_shape(shape: Sequence[int | str | None], dims: Mapping[str, int]) -> tuple[int, ...]:
    """`shape` with its named (dynamic) dimensions taken from `dims`."""
    missing = [d for d in shape if not isinstance(d, int) and d not in dims]
    if missing:
        raise ValueError(f"shape {list(shape)} has dynamic dimensions {missing} without a size; give them one "
                         f"(have {dict(dims)})")
    return tuple(d if isinstance(d, int) else int(dims[d]) for d in shape)


def random_inputs(shapes: Sequence[tuple[str, Sequence[int]]], seed: int = 0) -> dict[str, np.ndarray]:
    """float32 inputs for concrete shapes, by the PyTorch originals' input names.

    `rois` [K, 5] gets valid boxes (batch index, x1, y1, x2, y2 in pixels): indices below the first
    input's batch size, corners within its last two dimensions (the whole image for an image
    input; for stride-s features, the top-left 1/s of the image). Every other input is uniform in
    [0, 1], the range of images.
    """
    rng = np.random.default_rng(seed)
    first = tuple(shapes[0][1])
    out = {}
    for name, shape in shapes:
        if name == "rois":
            count, height, width = shape[0], first[-2], first[-1]
            index = rng.integers(0, first[0], (count, 1))
            xs = np.sort(rng.uniform(0, width, (count, 2)), axis=1)
            ys = np.sort(rng.uniform(0, height, (count, 2)), axis=1)
            out[name] = np.concatenate([index, xs[:, :1], ys[:, :1], xs[:, 1:], ys[:, 1:]], axis=1).astype(np.float32)
        else:
            out[name] = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    return out


def benchmark(session: ort.InferenceSession, inputs: Mapping[str, np.ndarray], runs: int = 50,
              warmup: int = 5) -> dict[str, object]:
    """Latency of `session.run` on `inputs` over `runs` calls after `warmup` untimed ones
    (the first calls allocate buffers and, with TensorRT, build engines)."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"need runs >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    feed = dict(inputs)
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        session.run(None, feed)
        times.append(1000.0 * (time.perf_counter() - start))
    return {"provider": session.get_providers()[0], "runs": runs, "warmup": warmup,
            "mean_ms": statistics.fmean(times), "median_ms": statistics.median(times), "min_ms": min(times)}
