"""onnxruntime sessions: provider choice with fallback, TensorRT engine cache, model metadata."""
from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

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


def _provider_name(name: str) -> str:
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
        full = _provider_name(name)
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


def read_metadata(session: ort.InferenceSession) -> dict[str, object]:
    """The model's custom metadata; values that are valid JSON are decoded, others stay strings."""
    meta: dict[str, object] = {}
    for key, value in session.get_modelmeta().custom_metadata_map.items():
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            meta[key] = value
    return meta
