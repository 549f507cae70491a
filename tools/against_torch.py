"""segjax against the PyTorch originals: forward and train step per model, side by side.

python tools/benchmark.py --against torch [--models a,b] [--repeats N] [--rounds R] [--onnx]
    [--size full|tiny] [--precision fp32|bf16|both] [--batch cpu|gpu] [--json out.json]
    [--markdown out.md] [--deadline_s S]

For each model of MODELS: the segjax forward (eval mode) and train step (forward +
cross-entropy + backward + AdamW, as segjax.engine.steps builds it) and the same for the PyTorch
original (torchvision / smp / timm where segjax has its layout, else a port in torch_ports.py),
each framework in its own fresh process, `rounds` times alternately; a time is the minimum over
all timed calls after warm-up (the least disturbed by other load). ratio = PyTorch time / segjax
time: above 1 segjax is faster. With --onnx each framework's exported graph (segjax's jax2onnx
export, torch.onnx's TorchScript export) is timed in onnxruntime (CPU), again one process each.
`--size tiny` keeps the architectures and shrinks the inputs (tests). Each step's FLOPs come from
XLA's cost analysis of segjax's step (`step_flops`), one count for both frameworks and ONNX (the
same model), and give each framework's GFLOP/s beside the CPU's fp32 peak (tools/machine_peak.py).
Prints two Markdown tables (times and ratios; GFLOP and GFLOP/s); --json writes every number
(after each model), --markdown the tables.

Adding a model is one `Bench` entry in MODELS: its input shapes, a segjax builder and a torch one.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NUM_CLASSES = 21


@dataclasses.dataclass(frozen=True)
class Bench:
    """One model: `segjax(dtype, rngs)` and `torch(ref)` build it; `inputs[batch]` is
    (N, H, W) images in [0, 1], or for a head on features (N, C, H, W) plus `rois` per image.
    `loss` names the step's loss ("pixels": per-pixel cross-entropy over the logits; "queries":
    class cross-entropy + mask BCE on the hybrid's outputs)."""

    segjax: Callable
    torch: Callable
    inputs: dict  # "cpu" / "gpu" / "tiny" -> shape tuple
    rois: int = 0
    loss: str = "pixels"
    classes: int = NUM_CLASSES


def _semantic(name):
    def build(dtype, rngs):
        from segjax.models.semantic_models import SEMANTIC_MODELS
        return SEMANTIC_MODELS[name](NUM_CLASSES, dtype=dtype, rngs=rngs)
    return build


def _encoder_decoder(resnet):
    def build(ref):
        return ref.ports.EncoderDecoder(getattr(ref.torchvision.models, resnet)(), NUM_CLASSES)
    return build


def _hybrid(dtype, rngs):
    from segjax.models.hybrid import SIZES, HybridQueryModel
    return HybridQueryModel(1, **SIZES["full"], dtype=dtype, rngs=rngs)


def _roi_head(dtype, rngs):
    from segjax.models.roi_head import SIZES, roi_human_model
    return roi_human_model(**SIZES["full"], backbone=False, dtype=dtype, rngs=rngs)


MODELS = {
    "voc_resnet18": Bench(_semantic("resnet18"), _encoder_decoder("resnet18"),
                          {"cpu": (4, 224, 224), "gpu": (32, 224, 224), "tiny": (1, 64, 64)}),
    "voc_resnet34": Bench(_semantic("resnet34"), _encoder_decoder("resnet34"),
                          {"cpu": (4, 224, 224), "gpu": (32, 224, 224), "tiny": (1, 64, 64)}),
    "voc_resnet50": Bench(_semantic("resnet50"), _encoder_decoder("resnet50"),
                          {"cpu": (4, 224, 224), "gpu": (32, 224, 224), "tiny": (1, 64, 64)}),
    "unet": Bench(_semantic("unet"), lambda ref: ref.ports.Normalized(
        ref.smp.Unet("resnet34", encoder_weights=None, classes=NUM_CLASSES)),
        {"cpu": (2, 512, 512), "gpu": (16, 512, 512), "tiny": (1, 64, 64)}),
    "deeplabv3": Bench(_semantic("deeplabv3"), lambda ref: ref.ports.Normalized(
        ref.torchvision.models.segmentation.deeplabv3_resnet50(
            num_classes=NUM_CLASSES, aux_loss=False, weights=None, weights_backbone=None), "out"),
        {"cpu": (2, 512, 512), "gpu": (16, 512, 512), "tiny": (1, 64, 64)}),
    # tiny: 2 images, as PyTorch's BatchNorm refuses one value per channel (the 1×1 pooling bin).
    "fastscnn": Bench(_semantic("fastscnn"), lambda ref: ref.ports.FastSCNN(NUM_CLASSES),
                      {"cpu": (2, 512, 512), "gpu": (32, 1024, 1024), "tiny": (2, 64, 64)}),
    "hybrid": Bench(_hybrid, lambda ref: ref.ports.HybridQuery(
        ref.timm.create_model("darknet53", features_only=True, out_indices=(3, 4, 5)), 1),
        {"cpu": (1, 640, 640), "gpu": (16, 640, 640), "tiny": (1, 64, 64)}, loss="queries", classes=2),
    # The ROI head on stride-8 features: the 1 image / 8 ROIs, and roi_human's training
    # batch (16 images, up to 8 ROIs each).
    "roi_head": Bench(_roi_head, lambda ref: ref.ports.RoiMaskHead(),
                      {"cpu": (1, 1024, 80, 80), "gpu": (1, 1024, 80, 80), "tiny": (1, 1024, 8, 8)},
                      rois=8, classes=3),
    "roi_head_b16": Bench(_roi_head, lambda ref: ref.ports.RoiMaskHead(),
                          {"cpu": (16, 1024, 80, 80), "gpu": (64, 1024, 80, 80), "tiny": (2, 1024, 8, 8)},
                          rois=8, classes=3),
}


# --- inputs shared by both frameworks (numpy, NHWC images / NCHW features) ------------------------

def make_inputs(bench: Bench, shape: tuple) -> dict:
    import numpy as np
    rng = np.random.default_rng(0)
    if bench.rois:
        n, c, h, w = shape
        side = 8 * h
        x1y1 = rng.uniform(0, side * 0.6, size=(n * bench.rois, 2))
        wh = rng.uniform(side * 0.1, side * 0.4, size=(n * bench.rois, 2))
        boxes = np.concatenate([x1y1, np.minimum(x1y1 + wh, side)], 1).astype(np.float32)
        index = np.repeat(np.arange(n, dtype=np.float32), bench.rois)[:, None]
        # Training takes boxes per image [N, R, 4]; the exported graphs take rois [K, 5].
        return {"features": rng.standard_normal((n, h, w, c), dtype=np.float32),
                "boxes": boxes.reshape(n, bench.rois, 4), "rois": np.concatenate([index, boxes], 1),
                "target": rng.integers(0, bench.classes, (n * bench.rois, 56, 56)).astype(np.int32)}
    n, h, w = shape
    images = rng.uniform(size=(n, h, w, 3)).astype(np.float32)
    if bench.loss == "queries":
        return {"images": images, "classes": rng.integers(0, bench.classes, (n, 100)).astype(np.int32),
                "masks": (rng.uniform(size=(n, 100, h, w)) > 0.5).astype(np.float32)}
    return {"images": images, "target": rng.integers(0, bench.classes, (n, h, w)).astype(np.int32)}


# --- one framework in this process -------------------------------------------------------------

def _timed(call, repeats: int, sync) -> dict:
    """First call (compile / warm-up) apart, one more untimed, then `repeats` timed calls."""
    start = time.perf_counter()
    sync(call())
    first = time.perf_counter() - start
    sync(call())
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        sync(call())
        times.append(time.perf_counter() - start)
    return {"first_s": first, "times_s": times}


def run_segjax(bench: Bench, data: dict, args) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from flax import nnx

    from segjax import config as config_lib
    from segjax.engine import mesh as mesh_lib
    from segjax.engine import optim as optim_lib
    from segjax.engine import steps as steps_lib

    dtype = jnp.bfloat16 if args.precision == "bf16" else jnp.float32
    model = nnx.jit(lambda: bench.segjax(dtype, nnx.Rngs(0)))()
    tx, _ = optim_lib.make_optimizer(
        config_lib.OptimConfig(optimizer="adamw", lr=1e-4, weight_decay=1e-4, scheduler="none"), 1, 1)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.Param)
    model_def, model_state = nnx.split(model)
    opt_def, opt_state = nnx.split(optimizer)
    model.eval()
    eval_def = nnx.graphdef(model)
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    replicated = mesh_lib.replicated(mesh_lib.make_data_mesh())
    shardings = jax.tree.map(lambda _: replicated, (model_state, opt_state))
    batch = jax.device_put({k: jnp.asarray(v) for k, v in data.items()})

    def forward(m, batch):
        return m(batch["features"], batch["boxes"]) if bench.rois else m(batch["images"])

    def loss_fn(m, batch, key):  # the step passes a key; these losses draw nothing
        out = forward(m, batch)
        if bench.loss == "queries":
            ce = optax.softmax_cross_entropy_with_integer_labels(
                out["pred_logits"].astype(jnp.float32), batch["classes"]).mean()
            loss = ce + optax.sigmoid_binary_cross_entropy(
                out["pred_masks"].astype(jnp.float32), batch["masks"]).mean()
        else:
            loss = optax.softmax_cross_entropy_with_integer_labels(
                out.astype(jnp.float32), batch["target"]).mean()
        return loss, ({"loss": loss}, None)

    train_step = steps_lib.make_train_step(model_def, opt_def, loss_fn, shardings)
    eval_step = steps_lib.inference_jit(lambda state, batch: forward(nnx.merge(eval_def, state), batch))
    state = {"model": model_state, "opt": opt_state}

    def train():
        state["model"], state["opt"], sums = train_step(state["model"], state["opt"], batch)
        return sums

    out = {"parameters": int(num_params),
           "forward": _timed(lambda: eval_step(state["model"], batch), args.repeats, jax.block_until_ready),
           "train": _timed(train, args.repeats, jax.block_until_ready),
           "flops": {"forward": step_flops(eval_step, state["model"], batch),
                     "train": step_flops(train_step, state["model"], state["opt"], batch)}}
    if args.onnx_dir:
        out["onnx_export_s"] = _export_segjax(nnx.merge(eval_def, state["model"]), bench, data,
                                              Path(args.onnx_dir) / "segjax.onnx")
    return out


def step_flops(jitted, *args) -> float:
    """FLOPs of one call of a `jax.jit` function: XLA's cost analysis of the lowered HLO, before
    any backend pass, so the count is the model's own arithmetic and needs no second compile. A
    convolution counts 2 FLOPs per multiply-add of taps inside the image (zero padding left out,
    so below 2·N·H·W·K·K·Cin·Cout at the borders), a matrix product 2·M·K·N, an elementwise op 1
    per element. On jax 0.12.1 the compiled program's count is never lower (YNNPACK fusions are
    counted) and at most ~1 % higher (elementwise work XLA duplicates into fusions)."""
    return float(jitted.lower(*args).cost_analysis()["flops"])


def _export_segjax(model, bench: Bench, data: dict, path: Path) -> float:
    import jax.numpy as jnp

    from segjax.export.onnx import convert

    start = time.perf_counter()
    if bench.rois:
        def forward(features, rois):
            return jnp.transpose(model(jnp.transpose(features, (0, 2, 3, 1)), rois), (0, 3, 1, 2))
        _, h, w, c = data["features"].shape
        specs = [("features", ("B", c, h, w)), ("rois", ("K", 5))]
    else:
        def forward(images):
            out = model(jnp.transpose(images, (0, 2, 3, 1)))
            return (out["pred_logits"], out["pred_masks"]) if isinstance(out, dict) \
                else jnp.transpose(out, (0, 3, 1, 2))
        _, h, w, _ = data["images"].shape
        specs = [("images", ("B", 3, h, w))]
    outputs = ["pred_logits", "pred_masks"] if bench.loss == "queries" else ["logits"]
    path.write_bytes(convert(forward, specs, outputs, 23).SerializeToString())
    return time.perf_counter() - start


def torch_reference():
    """torch with torchvision's pure-Python models (its compiled ops do not load on this CPU
    build; see STACK_NOTES and tests/test_bridge.py), timm, smp and the ports."""
    import types
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import segmentation_models_pytorch
    import timm
    import torch
    import torchvision

    sys.path.insert(0, str(Path(__file__).parent))
    import torch_ports
    return types.SimpleNamespace(torch=torch, torchvision=torchvision, timm=timm,
                                 smp=segmentation_models_pytorch, ports=torch_ports)


def run_torch(bench: Bench, data: dict, args) -> dict:
    ref = torch_reference()
    torch, F = ref.torch, ref.torch.nn.functional
    torch.manual_seed(0)
    device = "cuda" if args.batch == "gpu" else "cpu"
    net = bench.torch(ref).to(device)
    num_params = sum(p.numel() for p in net.parameters())
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-4, weight_decay=1e-4)
    if bench.rois:
        inputs = (torch.from_numpy(data["features"].transpose(0, 3, 1, 2).copy()).to(device),
                  torch.from_numpy(data["boxes"]).to(device))
    else:
        inputs = (torch.from_numpy(data["images"].transpose(0, 3, 1, 2).copy()).to(device),)
    targets = {k: torch.from_numpy(v).to(device) for k, v in data.items()
               if k not in ("images", "features", "boxes", "rois")}
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def forward():
        with torch.inference_mode(), autocast:
            return net(*inputs)

    def train():
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            out = net(*inputs)
            if bench.loss == "queries":
                logits, masks = out
                loss = F.cross_entropy(logits.float().flatten(0, 1), targets["classes"].long().flatten())
                loss = loss + F.binary_cross_entropy_with_logits(masks.float(), targets["masks"])
            else:
                loss = F.cross_entropy(out.float(), targets["target"].long())
        loss.backward()
        optimizer.step()
        return loss

    net.eval()
    result = {"parameters": int(num_params), "threads": torch.get_num_threads(),
              "forward": _timed(forward, args.repeats, lambda _: sync())}
    net.train()
    result["train"] = _timed(train, args.repeats, lambda _: sync())
    if args.onnx_dir:
        net.eval()
        start = time.perf_counter()
        names = ["features", "rois"] if bench.rois else ["images"]
        outputs = ["pred_logits", "pred_masks"] if bench.loss == "queries" else ["logits"]
        axes = {"features": {0: "B"}, "rois": {0: "K"}} if bench.rois else {"images": {0: "B"}}
        example = (inputs[0].cpu(), torch.from_numpy(data["rois"])) if bench.rois else (inputs[0].cpu(),)
        try:
            torch.onnx.export(net.cpu(), example, str(Path(args.onnx_dir) / "torch.onnx"),
                              input_names=names, output_names=outputs, dynamic_axes=axes, opset_version=17,
                              dynamo=False)
            result["onnx_export_s"] = time.perf_counter() - start
        except Exception as err:  # e.g. adaptive pooling to sizes that do not divide the input
            result["onnx_error"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return result


def run_onnx(bench: Bench, data: dict, args) -> dict:
    import onnxruntime as ort
    session = ort.InferenceSession(args.onnx_file, providers=["CPUExecutionProvider"])
    if bench.rois:
        feed = {"features": data["features"].transpose(0, 3, 1, 2).copy(), "rois": data["rois"]}
    else:
        feed = {"images": data["images"].transpose(0, 3, 1, 2).copy()}
    return {"forward": _timed(lambda: session.run(None, feed), args.repeats, lambda _: None)}


WORKERS = {"segjax": run_segjax, "torch": run_torch, "onnx": run_onnx}


def worker(args) -> None:
    bench = MODELS[args.models]
    data = make_inputs(bench, bench.inputs["tiny" if args.size == "tiny" else args.batch])
    result = WORKERS[args.worker](bench, data, args)
    if args.worker == "segjax":
        import jax
        result["device"] = jax.devices()[0].device_kind
    print("RESULT " + json.dumps(result), flush=True)


# --- the parent: fresh processes, alternating, table ---------------------------------------------

def _spawn(args, name: str, framework: str, extra: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--worker", framework, "--models", name, "--repeats", str(args.repeats),
           "--size", args.size, "--precision", args.precision, "--batch", args.batch, *extra]
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines:
        raise RuntimeError(f"{framework} worker for {name} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def _best(runs: list[dict], kind: str) -> float:
    return min(min(run[kind]["times_s"]) for run in runs)


def compare(args) -> dict:
    """{precision: {model: entry}}; after `--deadline_s` the remaining runs are skipped and listed."""
    names = list(MODELS) if args.models == "all" else args.models.split(",")
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    start = time.perf_counter()
    from machine_peak import machine_peak  # tools/ is on sys.path: this file runs as a script
    peak = machine_peak() if args.batch == "cpu" else {"gflops": None, "source": "GPU batch: no CPU peak"}
    out = {"device": None, "cpus": os.cpu_count(), "size": args.size, "batch": args.batch,
           "repeats": args.repeats, "rounds": args.rounds, "peak": peak,
           "ratio": "PyTorch time / segjax time (above 1: segjax faster)", "runs": {}, "skipped": []}
    for precision in precisions:
        results = out["runs"].setdefault(precision, {})
        for name in names:
            if args.deadline_s and time.perf_counter() - start > args.deadline_s:
                out["skipped"].append(f"{precision}/{name}")
                continue
            results[name] = _compare_model(args, name, precision)
            out["device"] = results[name].pop("device")
            print(_row(name, precision, results[name], args.onnx), file=sys.stderr, flush=True)
            if args.json:  # after every model, so a run cut short keeps what it measured
                Path(args.json).write_text(json.dumps(out, indent=2))
    return out


def _compare_model(args, name: str, precision: str) -> dict:
    bench = MODELS[name]
    runs = {"segjax": [], "torch": []}
    flags = ["--precision", precision]
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for framework in ("segjax", "torch") if r % 2 == 0 else ("torch", "segjax"):
                onnx = ["--onnx_dir", tmp] if args.onnx and r == 0 else []
                runs[framework].append(_spawn(args, name, framework, flags + onnx))
        entry = {"input": list(bench.inputs["tiny" if args.size == "tiny" else args.batch]),
                 "device": runs["segjax"][0]["device"]}
        for framework, framework_runs in runs.items():
            entry[framework] = {"parameters": framework_runs[0]["parameters"],
                                **{k: _best(framework_runs, k) for k in ("forward", "train")},
                                "first_train_s": framework_runs[0]["train"]["first_s"]}
        entry["flops"] = runs["segjax"][0]["flops"]  # the same model: one count for both frameworks
        for kind in ("forward", "train"):
            entry[f"{kind}_ratio"] = entry["torch"][kind] / entry["segjax"][kind]
            for framework in runs:
                entry[framework][f"{kind}_gflops_per_s"] = entry["flops"][kind] / entry[framework][kind] / 1e9
        if args.onnx:
            errors = {f: runs[f][0]["onnx_error"] for f in runs if "onnx_error" in runs[f][0]}
            onnx_runs = {"segjax": [], "torch": []}
            for r in range(args.rounds if not errors else 0):
                for framework in ("segjax", "torch") if r % 2 == 0 else ("torch", "segjax"):
                    onnx_runs[framework].append(
                        _spawn(args, name, "onnx", ["--onnx_file", str(Path(tmp) / f"{framework}.onnx")]))
            entry["onnx"] = {"export_errors": errors} if errors else {
                **{f: _best(v, "forward") for f, v in onnx_runs.items()}}
            if not errors:
                entry["onnx"]["ratio"] = entry["onnx"]["torch"] / entry["onnx"]["segjax"]
                entry["onnx"]["gflops_per_s"] = {f: entry["flops"]["forward"] / entry["onnx"][f] / 1e9
                                                 for f in onnx_runs}
    return entry


def _row(name: str, precision: str, e: dict, onnx: bool) -> str:
    shape = "×".join(map(str, e["input"]))
    cells = [name, shape, precision]
    for kind in ("forward", "train"):
        cells += [f"{e['segjax'][kind] * 1e3:.0f}", f"{e['torch'][kind] * 1e3:.0f}", f"{e[f'{kind}_ratio']:.2f}"]
    if onnx and "ratio" in e["onnx"]:
        cells += [f"{e['onnx']['segjax'] * 1e3:.0f}", f"{e['onnx']['torch'] * 1e3:.0f}", f"{e['onnx']['ratio']:.2f}"]
    elif onnx:
        cells += ["n/a" if f in e["onnx"]["export_errors"] else "-" for f in ("segjax", "torch")] + ["export failed"]
    return "| " + " | ".join(cells) + " |"


def _flops_row(name: str, precision: str, e: dict, onnx: bool, peak: float | None) -> str:
    def rate(gflops_per_s):
        return f"{gflops_per_s:.1f}" + (f" ({gflops_per_s / peak:.1%})" if peak else "")

    cells = [name, "×".join(map(str, e["input"])), precision]
    for kind in ("forward", "train"):
        cells += [f"{e['flops'][kind] / 1e9:.2f}", rate(e["segjax"][f"{kind}_gflops_per_s"]),
                  rate(e["torch"][f"{kind}_gflops_per_s"])]
    if onnx:
        cells += [rate(e["onnx"]["gflops_per_s"][f]) if "gflops_per_s" in e["onnx"] else "-"
                  for f in ("segjax", "torch")]
    return "| " + " | ".join(cells) + " |"


def _table(head: list[str], rows: list[str]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * 3 + "---:|" * (len(head) - 3), *rows]


def table(out: dict, onnx: bool) -> str:
    """The times and ratios, then each step's GFLOP (XLA's count, see step_flops) and the GFLOP/s
    each framework achieved, as % of the machine's fp32 peak (machine_peak.py) on the CPU."""
    head = ["model", "input", "precision", "fwd segjax ms", "fwd torch ms", "fwd ratio",
            "train segjax ms", "train torch ms", "train ratio"]
    if onnx:
        head += ["onnx segjax ms", "onnx torch ms", "onnx ratio"]
    rows = [(name, precision, e) for precision, results in out["runs"].items() for name, e in results.items()]
    lines = _table(head, [_row(*row, onnx) for row in rows])
    peak = out["peak"]["gflops"]
    head = ["model", "input", "precision", "fwd GFLOP", "fwd segjax GFLOP/s", "fwd torch GFLOP/s",
            "train GFLOP", "train segjax GFLOP/s", "train torch GFLOP/s"]
    if onnx:
        head += ["onnx segjax GFLOP/s", "onnx torch GFLOP/s"]
    lines += ["", "fp32 peak: " + (f"{peak:.1f} GFLOP/s = " if peak else "") + out["peak"]["source"]
              + ("; (%) = share of it" if peak else ""), ""]
    lines += _table(head, [_flops_row(*row, onnx, peak) for row in rows])
    failed = [f"{name} ({framework}): {error}" for results in out["runs"].values() for name, e in results.items()
              for framework, error in e.get("onnx", {}).get("export_errors", {}).items()]
    if failed:
        lines.append("\nONNX export failed: " + "; ".join(failed))
    if out["skipped"]:
        lines.append(f"\nskipped (deadline): {', '.join(out['skipped'])}")
    return "\n".join(lines)


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", choices=("torch",), default="torch")
    parser.add_argument("--models", default="all", help=f"comma-separated, from: {', '.join(MODELS)}")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per step and process")
    parser.add_argument("--rounds", type=int, default=1,
                        help="fresh processes per framework, alternating; times are the minimum over all")
    parser.add_argument("--size", choices=("full", "tiny"), default="full",
                        help="tiny: the same architectures on small inputs (tests)")
    parser.add_argument("--batch", choices=("cpu", "gpu"), default="cpu",
                        help="the input sizes: this CPU's, or GPU-sized batches on the GPU")
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="fp32",
                        help="segjax compute dtype / torch autocast; both: fp32, then bf16")
    parser.add_argument("--onnx", action="store_true", help="also time both exported graphs in onnxruntime")
    parser.add_argument("--json", help="write the results here (after every model)")
    parser.add_argument("--markdown", help="write the table here")
    parser.add_argument("--deadline_s", type=float, default=0,
                        help="skip the models left after this many seconds (0: none)")
    parser.add_argument("--worker", choices=tuple(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--onnx_dir", help=argparse.SUPPRESS)
    parser.add_argument("--onnx_file", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.rounds < 1:
        parser.error("--repeats and --rounds must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker:
        worker(args)
        return 0
    try:
        out = compare(args)
    except (ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(table(out, args.onnx))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    if args.markdown:
        Path(args.markdown).write_text(table(out, args.onnx) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
