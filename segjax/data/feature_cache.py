"""Features from a frozen ONNX extractor, cached on disk so later epochs skip the model."""
from __future__ import annotations

import hashlib
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from segjax.data.files import write_atomic

# Not a model: only onnxruntime provider selection, shared with export.
from segjax.export.runtime import DEFAULT_PREFER, make_session

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_MAX_NAME = 120


def cache_name(key: str) -> str:
    """A safe, collision-free file stem for `key`.

    Unsafe characters become `_`; when that changes the key (or it is too long), a hash of the
    original is appended so that e.g. `a/b` and `a_b` never share an entry. Stems never start
    with `.`, which keeps them apart from the hidden temp files written beside them.
    """
    safe = _UNSAFE.sub("_", key).lstrip(".")
    if safe == key and 0 < len(key) <= _MAX_NAME:
        return key
    digest = hashlib.sha1(key.encode()).hexdigest()[:16]
    return f"{safe[:_MAX_NAME]}-{digest}"


def _dims(value_info: onnx.ValueInfoProto) -> list[int | None]:
    """Static dims as ints, dynamic ones as None."""
    return [d.dim_value if d.HasField("dim_value") else None for d in value_info.type.tensor_type.shape.dim]


class OnnxFeatureExtractor:
    """Runs an N×3×H×W -> N×C×h×w ONNX model on uint8 RGB images and caches `[h, w, C]` float16.

    The onnxruntime session is opened on first use in each process and never pickled, so the
    extractor can be sent to grain workers; a fully cached dataset never opens it at all.
    `hits` / `misses` count cache look-ups in this process.
    """

    def __init__(
        self,
        model_path: str | Path,
        cache_dir: str | Path,
        *,
        prefer: Sequence[str] = DEFAULT_PREFER,
        batch_size: int = 8,
        intra_op_threads: int | None = None,
    ) -> None:
        self.model_path = Path(model_path)
        self.cache_dir = Path(cache_dir)
        self.prefer = tuple(prefer)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.intra_op_threads = intra_op_threads
        in_dims, out_dims, in_dtype = self._signature()
        self.input_dtype = in_dtype
        self.in_size: tuple[int, int] | None = None if None in in_dims[2:] else (in_dims[2], in_dims[3])
        self.out_channels: int | None = out_dims[1]
        # A model exported with a fixed batch can only be fed batches of exactly that size.
        self.batch_size = in_dims[0] or batch_size
        self._pad_batches = in_dims[0] is not None
        self.hits = 0
        self.misses = 0
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._session: ort.InferenceSession | None = None
        self._lock = threading.Lock()

    def _signature(self) -> tuple[list[int | None], list[int | None], np.dtype]:
        """Reads and checks the model's input/output shapes without opening a session."""
        if not self.model_path.is_file():
            raise FileNotFoundError(f"ONNX model not found: {self.model_path}")
        try:
            graph = onnx.load(self.model_path, load_external_data=False).graph
        except DecodeError as err:
            raise ValueError(f"cannot read ONNX model {self.model_path}: {err}") from err
        initializers = {t.name for t in graph.initializer}
        inputs = [i for i in graph.input if i.name not in initializers]
        if len(inputs) != 1 or not graph.output:
            raise ValueError(f"{self.model_path}: expected one image input and an output, "
                             f"got inputs {[i.name for i in inputs]}, outputs {[o.name for o in graph.output]}")
        in_dims, out_dims = _dims(inputs[0]), _dims(graph.output[0])
        if len(in_dims) != 4 or in_dims[1] not in (3, None) or len(out_dims) != 4:
            raise ValueError(f"{self.model_path}: expected input N×3×H×W and output N×C×h×w, "
                             f"got input {in_dims} and output {out_dims} (None = dynamic)")
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(inputs[0].type.tensor_type.elem_type))
        return in_dims, out_dims, dtype

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_session"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def _get_session(self) -> ort.InferenceSession:
        # grain may call from several threads of one worker; open the session only once.
        with self._lock:
            if self._session is None:
                self._session = make_session(self.model_path, prefer=self.prefer,
                                             intra_op_threads=self.intra_op_threads)
            return self._session

    def features(self, key: str, image: np.ndarray) -> np.ndarray:
        """Features `[h, w, C]` float16 of one uint8 `[H, W, 3]` image, from cache when present."""
        return self.features_batch([key], [image])[0]

    def features_batch(self, keys: Sequence[str], images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Like `features` for many images; the uncached ones go through the model `batch_size` at a time."""
        if len(keys) != len(images):
            raise ValueError(f"{len(keys)} keys for {len(images)} images")
        out: list[np.ndarray | None] = []
        todo: list[int] = []
        for i, key in enumerate(keys):
            path = self.cache_dir / f"{cache_name(key)}.npy"
            if path.exists():
                out.append(np.load(path))
            else:
                out.append(None)
                todo.append(i)
        # Per-process counts for logs and tests, not synchronised across threads.
        self.hits += len(keys) - len(todo)
        self.misses += len(todo)
        for start in range(0, len(todo), self.batch_size):
            chunk = todo[start:start + self.batch_size]
            feats = self._run([self._check(images[i]) for i in chunk])
            for i, feat in zip(chunk, feats):
                # Atomic: a reader (another worker) sees the whole entry or none.
                write_atomic(self.cache_dir / f"{cache_name(keys[i])}.npy", lambda f, feat=feat: np.save(f, feat))
                out[i] = feat
        return out

    def _check(self, image: np.ndarray) -> np.ndarray:
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a uint8 [H, W, 3] image, got {image.dtype} {image.shape}")
        if self.in_size is not None and image.shape[:2] != self.in_size:
            raise ValueError(f"{self.model_path} takes {self.in_size} images, got {image.shape[:2]}; resize first")
        return image

    def _run(self, images: list[np.ndarray]) -> np.ndarray:
        """Model output for uint8 NHWC images, as float16 [n, h, w, C]."""
        x = np.stack(images).astype(np.float32) / 255.0
        x = x.transpose(0, 3, 1, 2).astype(self.input_dtype)
        n = len(images)
        if self._pad_batches and n < self.batch_size:
            x = np.concatenate([x, np.zeros((self.batch_size - n, *x.shape[1:]), x.dtype)])
        session = self._get_session()
        y = session.run([session.get_outputs()[0].name], {session.get_inputs()[0].name: x})[0]
        return y[:n].transpose(0, 2, 3, 1).astype(np.float16, order="C")
