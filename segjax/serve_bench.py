"""python -m segjax.serve_bench MODEL.onnx [--benchmark]: run an exported model with onnxruntime.

Everything comes from the .onnx file: input names and shapes from the graph, experiment, classes
and input size from the metadata that tools/export_onnx.py writes. Inputs are random (`rois`
valid boxes, everything else uniform in [0, 1]); a dynamic dimension (batch "B"/"N", ROI count
"K") is 1 unless `--dim NAME=SIZE` sets it.

Without --benchmark the model runs once on CPU and the output shapes are printed. With
--benchmark, for each of --providers (default: tensorrt cuda cpu) the mean and median latency of
--runs calls after --warmup untimed ones, and the median's speed-up against CPU; a provider this
onnxruntime lacks, or that fails to start, gets a one-line notice instead.
"""
from __future__ import annotations

import argparse
import logging
import sys

import onnxruntime as ort

from segjax.export import runtime

PROVIDER_LABELS = {"TensorrtExecutionProvider": "TensorRT", "CUDAExecutionProvider": "CUDA",
                   "CPUExecutionProvider": "CPU"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m segjax.serve_bench", description=__doc__.splitlines()[0])
    parser.add_argument("model", help="an .onnx file written by tools/export_onnx.py")
    parser.add_argument("--benchmark", action="store_true", help="time every provider (see --providers)")
    parser.add_argument("--runs", type=int, default=50, help="timed calls per provider (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    parser.add_argument("--providers", nargs="+", default=list(runtime.DEFAULT_PREFER),
                        help="tensorrt, cuda, cpu or full onnxruntime names (default: tensorrt cuda cpu)")
    parser.add_argument("--dim", action="append", default=[], metavar="NAME=SIZE",
                        help="size of a dynamic dimension, e.g. --dim B=4 --dim K=16 (default 1)")
    parser.add_argument("--threads", type=int, help="onnxruntime intra-op threads (default: onnxruntime's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random inputs")
    args = parser.parse_args(argv)
    try:
        args.dims = {name: int(size) for name, _, size in (item.partition("=") for item in args.dim)}
    except ValueError:
        parser.error(f"--dim expects NAME=SIZE, got {args.dim}")
    return args


def describe(path: str, meta: dict, shapes: list[tuple[str, tuple[int, ...]]]) -> str:
    classes = meta.get("class_names") or []
    inputs = ", ".join(f"{name} {list(shape)}" for name, shape in shapes)
    return (f"{path}: experiment {meta.get('experiment', '?')}, variant {meta.get('variant', '?')}, "
            f"{meta.get('precision', '?')}, {len(classes)} classes ({', '.join(map(str, classes[:6]))}"
            f"{', ...' if len(classes) > 6 else ''}); inputs {inputs}; {meta.get('normalization', '')}")


def benchmark_table(results: list[dict], notices: list[str]) -> str:
    cpu_ms = next((r["median_ms"] for r in results if r["provider"] == "CPUExecutionProvider"), None)
    lines = [f"{'provider':<10} {'mean ms':>10} {'median ms':>10} {'speed-up vs CPU':>16}"]
    for r in results:
        speedup = f"{cpu_ms / r['median_ms']:.2f}x" if cpu_ms else "-"
        label = PROVIDER_LABELS.get(r["provider"], r["provider"])
        lines.append(f"{label:<10} {r['mean_ms']:10.2f} {r['median_ms']:10.2f} {speedup:>16}")
    lines.append(f"({results[0]['runs']} runs after {results[0]['warmup']} warm-up)" if results else "(nothing ran)")
    return "\n".join(notices + lines)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR)  # runtime's fallback warnings become our notices
    args = parse_args(argv)
    try:
        providers = [runtime.provider_name(p) for p in args.providers]
        cpu = runtime.make_session(args.model, prefer=("cpu",), intra_op_threads=args.threads)
        meta = runtime.read_metadata(cpu)
        dims = {d: 1 for i in cpu.get_inputs() for d in i.shape if isinstance(d, str)} | args.dims
        shapes = [(i.name, runtime.concrete_shape(i.shape, dims)) for i in cpu.get_inputs()]
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    inputs = runtime.random_inputs(shapes, args.seed)
    print(describe(args.model, meta, shapes))
    if not args.benchmark:
        for info, value in zip(cpu.get_outputs(), cpu.run(None, inputs)):
            print(f"{info.name}: {list(value.shape)} {value.dtype}")
        return 0

    available = ort.get_available_providers()
    results, notices = [], []
    for name in providers:
        label = PROVIDER_LABELS.get(name, name)
        if name not in available:
            notices.append(f"{label}: not available in this onnxruntime build (has {', '.join(available)})")
            continue
        session = cpu if name == cpu.get_providers()[0] else runtime.make_session(
            args.model, prefer=(name,), intra_op_threads=args.threads)
        if session.get_providers()[0] != name:
            notices.append(f"{label}: failed to start (missing libraries?); skipped")
            continue
        results.append(runtime.benchmark(session, inputs, runs=args.runs, warmup=args.warmup))
    print(benchmark_table(results, notices))
    return 0


if __name__ == "__main__":
    sys.exit(main())
