"""tools/benchmark.py end to end on a tiny roi_human config."""
import json
import os
import subprocess
import sys

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
