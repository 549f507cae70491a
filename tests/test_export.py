"""ONNX export of every model family on tiny configs: parity with JAX through onnxruntime at two
batch sizes and two ROI counts, names and dynamic dimensions, metadata, fp16, the export CLI on a
trained checkpoint, a forced mismatch, and serve_bench's table."""
import contextlib
import dataclasses
import io
from pathlib import Path

import numpy as np
import onnx
import pytest
from flax import nnx
from helpers import ROI_TINY, load_tool

from segjax import config as config_lib
from segjax import serve_bench, tasks
from segjax.export import onnx as onnx_export
from segjax.export.onnx import export, format_report
from segjax.export.runtime import make_session, random_inputs, read_metadata
from segjax.models.semantic_models import SEMANTIC_MODELS
from segjax.train import resolve_config, train_and_evaluate

SEMANTIC_SIZE = ["--set", "data.eval_size=48", "--set", "data.crop_size=48"]


def _task(*argv: str):
    cfg, _ = resolve_config(list(argv))
    return tasks.build(tasks.resolve(cfg))


def _shapes(path) -> dict[str, list]:
    """Declared input and output shapes of an ONNX file, dynamic dimensions by name."""
    session = make_session(path, prefer=("cpu",))
    return {x.name: list(x.shape) for x in [*session.get_inputs(), *session.get_outputs()]}


def _model(task) -> nnx.Module:
    # Initialised under jit: eagerly, every layer shape compiles its own small program.
    return nnx.jit(lambda: task.build_model(nnx.Rngs(0)))()


def _semantic_task(voc_task, name: str):
    """voc_resnet's task for the tiny `name` model."""
    model_cfg = dataclasses.replace(voc_task.cfg.model, name=name, size="tiny")
    return tasks.build(tasks.resolve(dataclasses.replace(voc_task.cfg, model=model_cfg)))


def _check_sizes(report: dict) -> list[dict[str, list]]:
    return [check["shapes"] for check in report["checks"] if check["inputs"] == "random"]


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("demo")


@pytest.fixture(scope="module")
def voc_task(demo_root):
    return _task("--experiment", "voc_resnet", "--set", f"data.demo_root={demo_root}", *SEMANTIC_SIZE)


@pytest.fixture(scope="module")
def roi(demo_root):
    task = _task("--experiment", "roi_human", "--set", f"data.demo_root={demo_root}", *ROI_TINY)
    return task, _model(task)


@pytest.mark.parametrize("variant, first", [("default", ["N", 16, 8, 8]), ("end_to_end", ["N", 3, 64, 64])],
                         ids=["head", "end_to_end"])
def test_roi_variants_match_jax(roi, tmp_path, variant, first):
    task, model = roi
    report = export(task, model, tmp_path / "roi.onnx", variant=variant)
    print(format_report(report))
    assert report["passed"] and not (tmp_path / "roi.unchecked.onnx").exists()
    assert _shapes(tmp_path / "roi.onnx") == {"features" if variant == "default" else "images": first,
                                              "rois": ["K", 5], "masks": ["K", 3, 56, 56]}
    # Two image counts and two ROI counts, each checked against JAX.
    sizes = _check_sizes(report)
    assert [s["rois"][0] for s in sizes] == [1, 2] and [s[next(iter(s))][0] for s in sizes] == [1, 2]
    assert max(r["max_abs_diff"] for c in report["checks"] for r in c["outputs"].values()) < 1e-4
    meta = read_metadata(tmp_path / "roi.onnx")
    assert meta["variant"] == variant and meta["class_names"] == ["background", "this_person", "other_people"]
    assert meta["normalization"].startswith("RGB" if variant == "end_to_end" else "none")


@pytest.mark.parametrize("name", sorted(SEMANTIC_MODELS))
def test_semantic_models_match_jax(voc_task, tmp_path, name):
    task = _semantic_task(voc_task, name)
    model = _model(task)
    # Not square and not a multiple of 32: every resize and crop path of the models runs.
    report = export(task, model, tmp_path / f"{name}.onnx", height=40, width=56)
    print(format_report(report))
    assert report["passed"]
    assert _shapes(tmp_path / f"{name}.onnx") == {"images": ["B", 3, 40, 56], "logits": ["B", 21, 40, 56]}
    assert [s["images"][0] for s in _check_sizes(report)] == [1, 2]
    assert max(r["max_abs_diff"] for c in report["checks"] for r in c["outputs"].values()) < 1e-4


def test_hybrid_matches_jax(demo_root, tmp_path):
    task = _task("--experiment", "hybrid_p3m", "--set", f"data.demo_root={demo_root}", "--set", "data.image_size=32")
    report = export(task, _model(task), tmp_path / "hybrid.onnx")
    print(format_report(report))
    assert report["passed"]
    shapes = _shapes(tmp_path / "hybrid.onnx")
    assert shapes["images"] == ["B", 3, 32, 32] and shapes["pred_masks"] == ["B", 8, 32, 32]
    assert shapes["pred_logits"] == ["B", 8, 2]
    assert [s["images"][0] for s in _check_sizes(report)] == [1, 2]


@pytest.fixture(scope="module")
def fp16_export(voc_task, tmp_path_factory):
    task = _semantic_task(voc_task, "unet")
    path = tmp_path_factory.mktemp("fp16") / "unet16.onnx"
    return path, export(task, _model(task), path, fp16=True, batch=2)


def test_fp16_keeps_float32_io_and_agrees(fp16_export):
    path, report = fp16_export
    print(format_report(report))
    session = make_session(path, prefer=("cpu",))
    assert [x.type for x in [*session.get_inputs(), *session.get_outputs()]] == ["tensor(float)"] * 2
    assert session.get_inputs()[0].shape == [2, 3, 48, 48]  # fixed batch
    weights = onnx.load(path).graph.initializer
    assert any(w.data_type == onnx.TensorProto.FLOAT16 for w in weights)
    assert [c["inputs"] for c in report["checks"]] == ["random", "images"]  # demo images too
    for check in report["checks"]:
        assert check["outputs"]["logits"]["argmax_agreement"] >= 0.99
        assert check["outputs"]["logits"]["max_abs_diff"] > 1e-5  # really computed in half precision


def test_metadata_round_trip(fp16_export):
    path, report = fp16_export
    meta = read_metadata(path)
    assert meta == read_metadata(make_session(path, prefer=("cpu",))) == report["metadata"]
    assert meta["experiment"] == "voc_resnet" and meta["task"] == "semantic_maps" and meta["variant"] == "default"
    assert meta["class_names"][:2] == ["background", "aeroplane"] and len(meta["class_names"]) == 21
    assert meta["input_size"] == [48, 48] and meta["inputs"] == {"images": [2, 3, 48, 48]}
    assert meta["normalization"] == "RGB [0,1], ImageNet mean/std inside the graph"
    assert meta["precision"] == "fp16" and meta["segjax_version"] == onnx_export.segjax_version()
    # The config that rebuilds the task (segjax.predict --onnx needs no checkpoint).
    assert config_lib.from_dict(meta["config"]).data.class_names == tuple(meta["class_names"])


def test_bad_requests_fail_before_exporting(roi, voc_task, tmp_path):
    task, model = roi
    with pytest.raises(ValueError, match="choose one of \\['default', 'end_to_end'\\]"):
        export(task, model, tmp_path / "x.onnx", variant="whole")
    with pytest.raises(ValueError, match="`images` input; this model's inputs are \\['features', 'rois'\\]"):
        export(task, model, tmp_path / "x.onnx", height=32)
    with pytest.raises(ValueError, match="batch must be 'dynamic' or a positive int"):
        export(voc_task, None, tmp_path / "x.onnx", batch=0)
    assert not list(tmp_path.iterdir())


def test_random_rois_are_valid_boxes():
    rois = random_inputs([("images", (3, 3, 40, 56)), ("rois", (50, 5))])["rois"]
    index, x1, y1, x2, y2 = rois.T
    assert set(index) <= {0.0, 1.0, 2.0} and len(set(index)) > 1
    assert (0 <= x1).all() and (x1 <= x2).all() and (x2 <= 56).all()
    assert (0 <= y1).all() and (y1 <= y2).all() and (y2 <= 40).all()


# ------------------------------------------------------------------------- export CLI, serve_bench

@pytest.fixture(scope="module")
def trained(demo_root, tmp_path_factory) -> Path:
    """The run directory of a one-step voc_resnet run (tiny resnet18, one image) in its own run root."""
    cfg, _ = resolve_config(["--experiment", "voc_resnet", "--set", f"data.demo_root={demo_root}", *SEMANTIC_SIZE,
                             "--backbone", "resnet18", "--set", "data.overfit_one=true", "--epochs", "1",
                             "--batch_size", "2", "--set", "train.num_visualizations=0",
                             "--checkpoint_dir", str(tmp_path_factory.mktemp("runs"))])
    return Path(train_and_evaluate(cfg)["run_dir"])


@pytest.fixture(scope="module")
def cli_export(trained, tmp_path_factory) -> tuple[Path, int, str]:
    """(out path, exit status, stdout) of the export tool given the run root and --model."""
    out = tmp_path_factory.mktemp("cli") / "voc.onnx"
    argv = ["--experiment", "voc_resnet", "--checkpoint", str(trained.parents[1]), "--model", "resnet18",
            "--out", str(out)]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        status = load_tool("export_onnx").main(argv)
    return out, status, stdout.getvalue()


def test_export_cli_writes_a_checked_model(cli_export):
    out, status, stdout = cli_export
    print(stdout)
    assert status == 0 and "passed" in stdout and "max |onnx - jax|" in stdout
    assert out.is_file() and read_metadata(out)["experiment"] == "voc_resnet"


def test_export_cli_names_the_models_it_found(trained, tmp_path, capsys):
    argv = ["--experiment", "voc_resnet", "--checkpoint", str(trained.parents[1]), "--model", "unet",
            "--out", str(tmp_path / "x.onnx")]
    assert load_tool("export_onnx").main(argv) == 2
    err = capsys.readouterr().err
    assert "no run of 'voc_resnet' with model 'unet' with checkpoints" in err and "models found: ['resnet18']" in err


def test_export_cli_takes_a_step_path_with_or_without_model(trained, tmp_path, capsys):
    step = next(p for p in (trained / "checkpoints").iterdir() if p.name.isdigit())
    for model in ([], ["--model", "resnet18"]):
        argv = ["--experiment", "voc_resnet", "--checkpoint", str(step), *model, "--out", str(tmp_path / "x.onnx")]
        with contextlib.redirect_stdout(io.StringIO()):
            assert load_tool("export_onnx").main(argv) == 0
    argv = ["--experiment", "voc_resnet", "--checkpoint", str(step), "--model", "unet",
            "--out", str(tmp_path / "y.onnx")]
    assert load_tool("export_onnx").main(argv) == 2
    assert f"{step} is a checkpoint of model 'resnet18', not 'unet'" in capsys.readouterr().err


def test_export_cli_fails_on_a_mismatch(trained, tmp_path, monkeypatch, capsys):
    convert = onnx_export.convert

    def corrupted(*args, **kwargs):  # one weight off: the graph no longer computes the JAX model
        proto = convert(*args, **kwargs)
        weight = max(proto.graph.initializer, key=lambda w: np.prod(w.dims))
        values = onnx.numpy_helper.to_array(weight) + 0.5
        weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
        return proto

    monkeypatch.setattr(onnx_export, "convert", corrupted)
    out = tmp_path / "bad.onnx"
    argv = ["--experiment", "voc_resnet", "--checkpoint", str(trained), "--out", str(out)]
    assert load_tool("export_onnx").main(argv) == 1
    assert "differs from the JAX model" in capsys.readouterr().err
    assert not out.exists() and (tmp_path / "bad.unchecked.onnx").is_file()


def test_serve_bench_prints_the_provider_table(cli_export, capsys):
    out, status, _ = cli_export
    assert status == 0
    assert serve_bench.main([str(out), "--benchmark", "--runs", "3", "--warmup", "1", "--dim", "B=2"]) == 0
    printed = capsys.readouterr().out
    print(printed)
    assert "experiment voc_resnet" in printed and "21 classes" in printed and "images [2, 3, 48, 48]" in printed
    assert "speed-up vs CPU" in printed and "(3 runs after 1 warm-up)" in printed
    cpu_row = next(line for line in printed.splitlines() if line.startswith("CPU "))
    assert cpu_row.split()[-1] == "1.00x"
    for label in ("TensorRT", "CUDA"):  # a row where onnxruntime has the provider, else a notice
        assert any(line.startswith(label) for line in printed.splitlines())


def test_serve_bench_runs_once_with_dynamic_dimensions_of_one(cli_export, capsys):
    out, status, _ = cli_export
    assert status == 0 and serve_bench.main([str(out)]) == 0
    assert "logits: [1, 21, 48, 48] float32" in capsys.readouterr().out


def test_export_cli_from_pytorch_weights_in_one_command(demo_root, tmp_path):
    """A PyTorch U-Net state dict (smp layout) straight to a checked ONNX file, through segjax."""
    import torch

    from segjax.bridge import to_torch_state_dict

    source = SEMANTIC_MODELS["unet"](21, size="tiny", rngs=nnx.Rngs(3))  # stands in for a trained smp Unet
    weights = tmp_path / "unet.pth"
    torch.save({k: torch.from_numpy(v) for k, v in to_torch_state_dict(source, "smp_unet").items()}, weights)
    out = tmp_path / "unet.onnx"
    argv = ["--experiment", "voc_resnet", "--init_from", f"torch:{weights}", "--model", "unet",
            "--set", "model.size=tiny", "--set", f"data.demo_root={demo_root}", *SEMANTIC_SIZE,
            "--out", str(out), "--height", "40", "--width", "56"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert load_tool("export_onnx").main(argv) == 0, stdout.getvalue()
    session = make_session(out, prefer=("cpu",))
    images = np.random.default_rng(0).uniform(size=(1, 3, 40, 56)).astype(np.float32)
    (logits,) = session.run(None, {"images": images})
    source.eval()
    expected = source(np.transpose(images, (0, 2, 3, 1)))  # the source weights, not a fresh init
    np.testing.assert_allclose(logits, np.transpose(np.asarray(expected), (0, 3, 1, 2)), atol=1e-4)


def test_readme_deeplabv3_import_and_export(ref, demo_root, tmp_path):
    """README's command on a real torchvision deeplabv3_resnet50 state dict: the full-size model
    (no demo variant), its class count (5) from the classifier; ONNX output equals torchvision's."""
    net = ref.torchvision.models.segmentation.deeplabv3_resnet50(weights=None, weights_backbone=None, num_classes=5)
    net.eval()
    weights, out = tmp_path / "deeplabv3.pth", tmp_path / "deeplab.onnx"
    ref.torch.save(net.state_dict(), weights)
    argv = ["--experiment", "voc_resnet", "--init_from", f"torch:{weights}", "--set", "model.name=deeplabv3",
            "--out", str(out), "--set", f"data.demo_root={demo_root}", "--height", "64", "--width", "64"]
    with contextlib.redirect_stdout(io.StringIO()) as stdout:
        assert load_tool("export_onnx").main(argv) == 0, stdout.getvalue()
    assert len(read_metadata(out)["class_names"]) == 5
    images = np.random.default_rng(0).uniform(size=(1, 3, 64, 64)).astype(np.float32)
    (logits,) = make_session(out, prefer=("cpu",)).run(None, {"images": images})
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    with ref.torch.no_grad():  # torchvision expects ImageNet-normalised input; the ONNX graph normalises inside
        expected = net(ref.torch.from_numpy(((images - mean[:, None, None]) / std[:, None, None]).astype(np.float32)))
    expected = expected["out"].numpy()
    assert logits.shape == expected.shape == (1, 5, 64, 64)
    assert np.abs(logits - expected).max() < 1e-3 * max(1.0, np.abs(expected).max())


def test_export_model_flag_acts_or_is_refused(tmp_path, capsys):
    argv = ["--experiment", "roi_human", "--init_from", "torch:w.pth", "--model", "unet", "--out", str(tmp_path / "x")]
    assert load_tool("export_onnx").main(argv) == 2
    assert "--model: experiment 'roi_human' has a single model (no model.name)" in capsys.readouterr().err
