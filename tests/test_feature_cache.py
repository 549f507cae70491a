"""OnnxFeatureExtractor and export.runtime against a tiny extractor exported with jax2onnx."""
import json
import logging
import pickle
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from flax import nnx
from jax2onnx import to_onnx

from segjax.data import feature_cache, files
from segjax.data.feature_cache import OnnxFeatureExtractor, cache_name
from segjax.export import runtime
from segjax.export.runtime import available_providers, make_session, read_metadata

SIZE = 64
CHANNELS = 8


class TinyExtractor(nnx.Module):
    """Stride-8 conv net with the ONNX extractor's NCHW interface."""

    def __init__(self, rngs: nnx.Rngs):
        self.c1 = nnx.Conv(3, CHANNELS, (3, 3), strides=2, rngs=rngs)
        self.c2 = nnx.Conv(CHANNELS, CHANNELS, (3, 3), strides=2, rngs=rngs)
        self.c3 = nnx.Conv(CHANNELS, CHANNELS, (3, 3), strides=2, rngs=rngs)

    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        x = jnp.transpose(x, (0, 2, 3, 1))
        x = self.c3(nnx.relu(self.c2(nnx.relu(self.c1(x)))))
        return jnp.transpose(x, (0, 3, 1, 2))


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """(path of the exported model, the JAX model)."""
    model = TinyExtractor(nnx.Rngs(0))
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # jax2onnx's own
        to_onnx(model, [("B", 3, SIZE, SIZE)], return_mode="file", output_path=str(path))
    return path, model


def _images(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return list(rng.integers(0, 256, (n, SIZE, SIZE, 3), dtype=np.uint8))


def _reference(model: TinyExtractor, image: np.ndarray) -> np.ndarray:
    """The JAX model's features for one image, NHWC float32."""
    x = jnp.asarray(image, jnp.float32)[None].transpose(0, 3, 1, 2) / 255.0
    return np.asarray(model(x))[0].transpose(1, 2, 0)


def _assert_f16_close(feat: np.ndarray, ref: np.ndarray) -> None:
    # float16 keeps 11 significant bits; allow one rounding step plus ORT-vs-XLA noise.
    assert feat.dtype == np.float16 and feat.shape == ref.shape
    np.testing.assert_allclose(feat.astype(np.float32), ref, rtol=2**-10, atol=1e-5)


def test_features_match_jax_then_hit_cache(exported, tmp_path):
    path, model = exported
    ex = OnnxFeatureExtractor(path, tmp_path / "cache", prefer=("cpu",))
    assert ex.in_size == (SIZE, SIZE) and ex.out_channels == CHANNELS
    image = _images(1)[0]
    ref = _reference(model, image)
    assert np.abs(ref).max() > 0.05  # the check below would pass on near-zero features

    first = ex.features("coco/img 001.jpg", image)
    _assert_f16_close(first, ref)
    assert (ex.hits, ex.misses) == (0, 1)
    entry = tmp_path / "cache" / f"{cache_name('coco/img 001.jpg')}.npy"
    np.testing.assert_array_equal(np.load(entry), first)

    second = ex.features("coco/img 001.jpg", image)
    assert (ex.hits, ex.misses) == (1, 1)
    np.testing.assert_array_equal(second, first)

    with pytest.raises(ValueError, match="resize first"):
        ex.features("small", np.zeros((32, 32, 3), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        ex.features("float", np.zeros((SIZE, SIZE, 3), np.float32))


def test_batches_and_static_batch_padding(exported, tmp_path):
    path, model = exported
    images = _images(3, seed=1)
    refs = [_reference(model, im) for im in images]
    keys = ["a", "b", "c"]

    ex = OnnxFeatureExtractor(path, tmp_path / "dynamic", prefer=("cpu",), batch_size=2)
    ex.features("b", images[1])
    for feat, ref in zip(ex.features_batch(keys, images), refs):
        _assert_f16_close(feat, ref)
    assert (ex.hits, ex.misses) == (1, 3)
    with pytest.raises(ValueError, match="2 keys for 1 images"):
        ex.features_batch(["a", "b"], images[:1])

    # A model exported with a fixed batch of 2: three images run as 2 + (1 padded to 2).
    fixed = onnx.load(path)
    for value in (fixed.graph.input[0], fixed.graph.output[0]):
        value.type.tensor_type.shape.dim[0].dim_value = 2
    fixed_path = tmp_path / "fixed.onnx"
    onnx.save(fixed, fixed_path)
    ex = OnnxFeatureExtractor(fixed_path, tmp_path / "fixed", prefer=("cpu",), batch_size=8)
    assert ex.batch_size == 2
    for feat, ref in zip(ex.features_batch(keys, images), refs):
        _assert_f16_close(feat, ref)


def test_pickled_extractor_reads_cache_without_session(exported, tmp_path, monkeypatch):
    path, model = exported
    ex = OnnxFeatureExtractor(path, tmp_path, prefer=("cpu",))
    image, other = _images(2, seed=2)
    first = ex.features("k", image)  # opens the session, which must not travel

    restored = pickle.loads(pickle.dumps(ex))

    def no_session(*args, **kwargs):
        raise AssertionError("a cache hit opened a session")

    with monkeypatch.context() as m:
        m.setattr(feature_cache, "make_session", no_session)
        np.testing.assert_array_equal(restored.features("k", image), first)
    assert restored.hits == ex.hits + 1 and restored.misses == ex.misses
    _assert_f16_close(restored.features("other", other), _reference(model, other))


def test_interrupted_writes_are_never_read(exported, tmp_path, monkeypatch):
    path, model = exported
    ex = OnnxFeatureExtractor(path, tmp_path, prefer=("cpu",))
    image = _images(1, seed=3)[0]
    ref = _reference(model, image)

    def crash_mid_write(file, arr, *args, **kwargs):
        file.write(b"\x93NUMPY\x01\x00half")
        raise KeyboardInterrupt("crash while writing")

    with monkeypatch.context() as m:
        m.setattr(np, "save", crash_mid_write)
        with pytest.raises(KeyboardInterrupt):
            ex.features("k", image)
    assert list(tmp_path.iterdir()) == []  # a crash that Python sees removes its temp file

    with monkeypatch.context() as m:
        m.setattr(np, "save", crash_mid_write)
        m.setattr(files.os, "unlink", lambda p: None)  # a killed process cleans nothing up
        with pytest.raises(KeyboardInterrupt):
            ex.features("k", image)
    assert len(list(tmp_path.iterdir())) == 1  # the half-written temp file stays behind
    assert not (tmp_path / f"{cache_name('k')}.npy").exists()

    _assert_f16_close(ex.features("k", image), ref)
    assert ex.misses == 3
    _assert_f16_close(ex.features("k", image), ref)
    assert ex.hits == 1


def test_cache_name_is_safe_and_collision_free():
    names = {cache_name(k) for k in ["a/b", "a_b", "a\\b", "../etc/passwd", ".hidden", "", "x" * 500, "img_001.jpg"]}
    assert len(names) == 8
    for name in names:
        assert name and not name.startswith(".") and len(name) <= 140
        assert all(c.isalnum() or c in "._-" for c in name)
    assert cache_name("img_001.jpg") == "img_001.jpg"


def test_make_session_falls_back_to_cpu_with_notice(exported, caplog, monkeypatch):
    path, _ = exported
    monkeypatch.setattr(runtime.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    caplog.set_level(logging.WARNING, logger=runtime.__name__)
    session = make_session(path, prefer=("tensorrt", "cuda", "cpu"), fp16=True, intra_op_threads=1)
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert session.get_session_options().intra_op_num_threads == 1
    lines = [r.getMessage() for r in caplog.records]
    assert sum("TensorrtExecutionProvider is not available" in line for line in lines) == 1
    assert sum("CUDAExecutionProvider is not available" in line for line in lines) == 1
    assert any("fp16 only applies to TensorRT" in line for line in lines)
    assert all("\n" not in line for line in lines)

    caplog.clear()
    assert available_providers(("cuda",)) == ["CPUExecutionProvider"]
    assert len(caplog.records) == 2
    with pytest.raises(ValueError, match="unknown onnxruntime provider 'gpu'"):
        available_providers(("gpu",))


def test_tensorrt_options_and_failed_start(exported, caplog, monkeypatch):
    """No TensorRT here: check what make_session asks onnxruntime for, and that it reports a drop."""
    path, _ = exported
    monkeypatch.setattr(runtime.ort, "get_available_providers",
                        lambda: ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"])
    calls = []

    class FakeSession:
        def __init__(self, model, sess_options, providers):
            calls.append(providers)

        def get_providers(self):  # TensorRT and CUDA libraries missing at run time
            return ["CPUExecutionProvider"]

    monkeypatch.setattr(runtime.ort, "InferenceSession", FakeSession)
    caplog.set_level(logging.WARNING, logger=runtime.__name__)
    make_session(path, fp16=True)
    trt, cuda, cpu = calls[0]
    default_cache = Path(f"{path}.trt_cache")
    assert trt == ("TensorrtExecutionProvider", {"trt_engine_cache_enable": "True",
                                                 "trt_engine_cache_path": str(default_cache),
                                                 "trt_fp16_enable": "True"})
    assert (cuda, cpu) == ("CUDAExecutionProvider", "CPUExecutionProvider")
    assert default_cache.is_dir()
    failed = [r.getMessage() for r in caplog.records if "failed to start" in r.getMessage()]
    assert len(failed) == 2

    make_session(path, trt_cache_dir=path.parent / "engines")
    assert calls[1][0][1]["trt_engine_cache_path"] == str(path.parent / "engines")
    assert calls[1][0][1]["trt_fp16_enable"] == "False"


def test_missing_and_unreadable_models_name_the_path(tmp_path):
    missing = tmp_path / "nope.onnx"
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        make_session(missing, prefer=("cpu",))
    with pytest.raises(FileNotFoundError, match="nope.onnx"):
        OnnxFeatureExtractor(missing, tmp_path / "cache")

    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"this is not a protobuf \xff\xfe")
    with pytest.raises(ValueError, match="garbage.onnx"):
        make_session(garbage, prefer=("cpu",))
    with pytest.raises(ValueError, match="garbage.onnx"):
        OnnxFeatureExtractor(garbage, tmp_path / "cache")


def _graph_model(path: Path, in_shape: list, out_shape: list, op: str, **attrs) -> Path:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node(op, ["x"], ["y"], **attrs)], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, in_shape)],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, out_shape)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 11)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


@pytest.mark.parametrize("in_shape, out_shape, op, attrs", [
    (["N", 3, 64, 64, 1], ["N", 3, 64, 64], "Squeeze", {"axes": [4]}),  # input rank 5
    (["N", 1, 64, 64], ["N", 1, 64, 64], "Identity", {}),  # one channel, not RGB
    (["N", 3, 64, 64], ["N", 12288], "Flatten", {}),  # output rank 2
])
def test_wrong_ranks_are_refused(tmp_path, in_shape, out_shape, op, attrs):
    path = _graph_model(tmp_path / "bad.onnx", in_shape, out_shape, op, **attrs)
    with pytest.raises(ValueError, match=r"bad\.onnx: expected input N×3×H×W and output N×C×h×w"):
        OnnxFeatureExtractor(path, tmp_path / "cache")


def test_read_metadata_round_trip(exported, tmp_path):
    path, _ = exported
    model = onnx.load(path)
    onnx.helper.set_model_props(model, {"classes": json.dumps(["bg", "person"]), "stride": "8", "name": "tiny"})
    with_meta = tmp_path / "meta.onnx"
    onnx.save(model, with_meta)
    meta = read_metadata(make_session(with_meta, prefer=("cpu",)))
    assert meta == {"classes": ["bg", "person"], "stride": 8, "name": "tiny"}
