"""tools/benchmark.py end to end on a tiny roi_human config."""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from helpers import ROI_TINY, ROOT


def test_benchmark_prints_timings_and_ratios(tmp_path):
    cmd = [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--experiment", "roi_human", *ROI_TINY,
           "--set", f"data.demo_root={tmp_path / 'demo'}", "--batch_size", "2", "--repeats", "2",
           "--pipeline_batches", "2", "--loop_steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout)
    assert out["device"]["count"] >= 1 and out["parameters"] > 0
    assert out["config"]["image_size"] == 64 and out["config"]["batch_size"] == 2 and out["config"]["demo_data"]
    for precision in ("fp32", "bf16"):
        for kind in ("train", "eval"):
            timing = out["precision"][precision][kind]
            assert set(timing) == {"compile_s", "median_s", "min_s", "max_s", "images_per_s"}
            assert 0 < timing["min_s"] <= timing["median_s"] <= timing["max_s"] and timing["compile_s"] > 0
    assert out["precision"]["baseline"] == "fp32" and out["precision"]["bf16_over_fp32"]["train"] > 0
    assert out["input_pipeline"]["records_per_s"] > 0 and out["input_pipeline"]["pipeline_over_step"] > 0
    hot = out["hot_loop"]
    assert hot["real_batches_step_s"] > 0 and hot["preplaced_step_s"] > 0 and hot["real_over_preplaced"] > 0


def _against_torch(args, tmp_path, script=("tools", "benchmark.py")):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"}
    return subprocess.run([sys.executable, str(ROOT.joinpath(*script)), *args], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=900)


def test_against_torch_times_both_frameworks_and_onnx(tmp_path):
    """voc_resnet18 (torchvision encoder + the decoder port) and Fast-SCNN (a port) at tiny inputs:
    the same parameter count on both sides, every time positive, ratios PyTorch / segjax; torch.onnx
    cannot export Fast-SCNN's pyramid pooling (bins that do not divide the map), which is reported."""
    proc = _against_torch(["--against", "torch", "--models", "voc_resnet18,fastscnn", "--size", "tiny",
                           "--repeats", "1", "--onnx", "--json", str(tmp_path / "out.json")], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out.json").read_text())
    assert set(out["runs"]) == {"fp32"} and out["skipped"] == []
    for name, entry in out["runs"]["fp32"].items():
        assert entry["segjax"]["parameters"] == entry["torch"]["parameters"] > 0, name
        for kind in ("forward", "train"):
            assert entry[f"{kind}_ratio"] == entry["torch"][kind] / entry["segjax"][kind] > 0
        shape = "×".join(map(str, entry["input"]))
        assert f"| {name} | {shape} | fp32 |" in proc.stdout
        # One FLOP count (segjax's step) for both frameworks; GFLOP/s beside this machine's peak.
        assert 0 < entry["flops"]["forward"] < entry["flops"]["train"], name
        for framework in ("segjax", "torch"):
            for kind in ("forward", "train"):
                assert entry[framework][f"{kind}_gflops_per_s"] == pytest.approx(
                    entry["flops"][kind] / entry[framework][kind] / 1e9), (name, framework, kind)
        assert f"| {name} | {shape} | fp32 | {entry['flops']['forward'] / 1e9:.2f} |" in proc.stdout
    assert out["peak"]["source"] and (out["peak"]["gflops"] is None or out["peak"]["gflops"] > 0)
    assert "| fwd GFLOP | fwd segjax GFLOP/s | fwd torch GFLOP/s | train GFLOP |" in proc.stdout
    assert f"fp32 peak: {out['peak']['gflops']:.1f} GFLOP/s" in proc.stdout or out["peak"]["gflops"] is None
    resnet, fastscnn = out["runs"]["fp32"]["voc_resnet18"], out["runs"]["fp32"]["fastscnn"]
    assert resnet["onnx"]["ratio"] == resnet["onnx"]["torch"] / resnet["onnx"]["segjax"] > 0
    assert resnet["onnx"]["gflops_per_s"]["torch"] == pytest.approx(
        resnet["flops"]["forward"] / resnet["onnx"]["torch"] / 1e9)
    assert list(fastscnn["onnx"]["export_errors"]) == ["torch"]
    assert "ONNX export failed: fastscnn (torch): SymbolicValueError" in proc.stdout


def test_step_flops_is_the_analytic_count():
    """XLA's count of a tiny convolution model and a matrix product: 2·N·H'·W'·K·K·Cin·Cout plus one
    FLOP per bias add; with zero padding only the taps inside the image count."""
    sys.path.insert(0, str(ROOT / "tools"))  # as the script runs (load_tool cannot hold its dataclass)
    from against_torch import step_flops
    n, h, w, cin, cout = 2, 12, 10, 8, 16
    x = jnp.ones((n, h, w, cin))
    # padding: (output pixels, multiply-adds per output channel and input channel)
    for padding, pixels, taps in (("VALID", (h - 2) * (w - 2), (h - 2) * (w - 2) * 9),
                                  ("SAME", h * w, (3 * h - 2) * (3 * w - 2))):
        conv = nnx.Conv(cin, cout, (3, 3), padding=padding, rngs=nnx.Rngs(0))
        graphdef, state = nnx.split(conv)
        forward = jax.jit(lambda s, x, g=graphdef: nnx.merge(g, s)(x))
        assert step_flops(forward, state, x) == 2 * n * taps * cin * cout + n * pixels * cout, padding
    assert step_flops(jax.jit(jnp.matmul), jnp.ones((64, 128)), jnp.ones((128, 32))) == 2 * 64 * 128 * 32


def test_against_torch_unknown_model_is_a_clear_error(tmp_path):
    proc = _against_torch(["--against", "torch", "--models", "resnet9"], tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown model(s) resnet9; choose from " + ", ".join(
            ["voc_resnet18", "voc_resnet34", "voc_resnet50", "unet", "deeplabv3", "fastscnn", "hybrid",
             "roi_head", "roi_head_b16"])]


def test_gpu_bench_dry_run_writes_json_and_markdown(tmp_path):
    """tools/gpu_bench.sh --dry_run: everything but the install and CUDA parts, both precisions."""
    proc = subprocess.run(["bash", str(ROOT / "tools" / "gpu_bench.sh"), "--dry_run", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=900,
                          env={**os.environ, "JAX_DISABLE_MOST_OPTIMIZATIONS": "true"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads((tmp_path / "out" / "gpu_bench.json").read_text())
    assert list(out["runs"]) == ["fp32", "bf16"] and out["batch"] == "cpu"
    for precision in ("fp32", "bf16"):
        assert out["runs"][precision]["voc_resnet18"]["train_ratio"] > 0
    table = (tmp_path / "out" / "gpu_bench.md").read_text()
    assert "| voc_resnet18 | 1×64×64 | fp32 |" in table and "| voc_resnet18 | 1×64×64 | bf16 |" in table


def test_repro_conv_row_has_flops_and_share_of_peak(tmp_path):
    """tools/repro_conv_backward.py's single 3×3 convolution row: the analytic count, XLA's (padding
    taps left out) and both frameworks' GFLOP/s with their share of the peak."""
    proc = _against_torch(["--cases", "conv3x3_c64", "--repeats", "1"], tmp_path,
                          script=("tools", "repro_conv_backward.py"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = next(line for line in proc.stdout.splitlines() if line.startswith("| conv3x3_c64 |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    n, h, c, o = 4, 56, 64, 64
    assert float(cells[2]) == round(2 * n * h * h * 9 * c * o / 1e9, 3)
    assert float(cells[3]) == round(2 * n * (3 * h - 2) ** 2 * c * o / 1e9, 3)
    assert float(cells[8]) > float(cells[3])  # forward and backward
    for cell in (cells[6], cells[7], cells[11], cells[12]):
        assert float(cell.split()[0]) > 0 and cell.endswith("%)"), cell
    assert "GFLOP/s (% of the fp32 peak: " in proc.stdout
