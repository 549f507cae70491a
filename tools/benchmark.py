"""Time an experiment's train and eval steps, input pipeline and hot loop; print JSON.

python tools/benchmark.py --experiment roi_human [--set k=v ...] [--repeats N] [--batch_size B]
    [--precision fp32|bf16|both] [--full_size]
python tools/benchmark.py --against torch [--models a,b] ...   (segjax against PyTorch, every
    model side by side, with each step's GFLOP and both frameworks' GFLOP/s beside the CPU's
    fp32 peak; see tools/against_torch.py and tools/machine_peak.py)
python tools/benchmark.py --against transformers [--size 384 --batch 2 --repeats 5]   (Mask2Former
    Swin-T forward and frozen fine-tuning step against transformers'; tools/mask2former_speed.py)

Each ratio compares with a baseline measured in the same run: bf16 against fp32 step times; the
grain train pipeline's images/s against the train step's; a loop that moves a real host batch to
the devices every step against the same steps on one batch already there. Step times leave out
the first (compiling) call, reported as compile_s. The config is resolved as `segjax.train`
resolves it (demo data and overrides when no data is given); --full_size takes the experiment's
own defaults instead (demo data, if none is given, letterboxed to the full input size).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import statistics
import sys
import time

import flax
import jax

from segjax import config as config_lib
from segjax import tasks
from segjax.data import pipeline
from segjax.engine import mesh as mesh_lib
from segjax.engine import steps as steps_lib
from segjax.engine.runlog import setup_console_logging
from segjax.engine.setup import build_state
from segjax.errors import ArgumentParser, guarded
from segjax.train import resolve_config


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="built-in name or a .py file, as for segjax.train")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per step after the compiling one")
    parser.add_argument("--batch_size", type=int, help="global batch (default: the config's; 2 per device "
                                                       "with --full_size on CPU)")
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both",
                        help="compute precision; both times bf16 against the fp32 baseline")
    parser.add_argument("--full_size", action="store_true",
                        help="the experiment's full-size config, without the demo overrides")
    parser.add_argument("--pipeline_batches", type=int, default=20, help="batches timed from the input pipeline")
    parser.add_argument("--loop_steps", type=int, default=10, help="steps in each hot-loop measurement")
    return parser.parse_args(argv)


def resolve(args: argparse.Namespace) -> config_lib.Config:
    """The config segjax.train would use, or with --full_size the experiment's defaults plus --set."""
    batch_size = args.batch_size
    if args.full_size and batch_size is None and jax.default_backend() == "cpu":
        batch_size = 2 * jax.device_count()
    overrides = args.set + ([f"train.batch_size={batch_size}"] if batch_size else [])
    argv = ["--experiment", args.experiment]
    for item in overrides:
        argv += ["--set", item]
    return resolve_config(argv, demo=not args.full_size)[0]


class Steps:
    """Replicated model and optimizer state with the jitted steps, built as segjax.train builds them."""

    def __init__(self, task, mesh: jax.sharding.Mesh, steps_per_epoch: int):
        setup = build_state(task, mesh, steps_per_epoch, task.cfg.train.epochs)
        self.model_state, self.opt_state, self.num_params = setup.model_state, setup.opt_state, setup.num_params
        seed = task.cfg.train.seed
        self.train_step = steps_lib.make_train_step(setup.model_def, setup.opt_def, task.loss_and_sums,
                                                    setup.shardings, seed, wrt=task.trainable)
        self.eval_step = steps_lib.make_eval_step(setup.eval_def, task.loss_and_sums, seed)

    def train(self, batch: dict):
        self.model_state, self.opt_state, sums = self.train_step(self.model_state, self.opt_state, batch)
        return self.model_state, self.opt_state, sums

    def eval(self, batch: dict):
        return self.eval_step(self.model_state, batch)


def time_step(call, repeats: int, batch_size: int) -> dict:
    """The first call (compile included) apart, then `repeats` calls, each blocked until ready."""

    def once() -> float:
        start = time.perf_counter()
        jax.block_until_ready(call())
        return time.perf_counter() - start

    compile_s = once()
    times = [once() for _ in range(repeats)]
    median = statistics.median(times)
    return {"compile_s": compile_s, "median_s": median, "min_s": min(times), "max_s": max(times),
            "images_per_s": batch_size / median}


def time_pipeline(batches, count: int, local_batch: int, num_workers: int) -> tuple[dict, dict]:
    """Host records/s over `count` batches in steady state; returns it and the last batch."""
    for _ in range(3 + 2 * num_workers):  # empties what workers buffer as they start (2 batches each)
        batch = next(batches)
    start = time.perf_counter()
    for _ in range(count):
        batch = next(batches)
    elapsed = time.perf_counter() - start
    return {"batches": count, "seconds": elapsed, "records_per_s": count * local_batch / elapsed}, batch


def time_loop(steps: Steps, next_batch, count: int) -> float:
    """Seconds per train step over `count` steps, blocked once at the end as the trainer runs."""
    jax.block_until_ready(steps.train(next_batch()))
    start = time.perf_counter()
    for _ in range(count):
        out = steps.train(next_batch())
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / count


def with_precision(cfg: config_lib.Config, precision: str) -> config_lib.Config:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, precision=precision))


def benchmark(args: argparse.Namespace) -> dict:
    cfg = resolve(args)
    demo_data = not tasks.task_class(cfg.task).has_data(cfg.data)
    precisions = ["fp32", "bf16"] if args.precision == "both" else [args.precision]
    mesh = mesh_lib.make_data_mesh()
    batch_size = cfg.train.batch_size
    local_batch = mesh_lib.check_batch_size(batch_size, mesh)
    task = tasks.build(tasks.resolve(with_precision(cfg, precisions[0])))
    cfg = task.cfg

    source, transform = task.train_data()
    steps_per_epoch = max(len(source) // batch_size, 1)
    batches = iter(pipeline.train_dataset(source, transform, local_batch=local_batch, seed=cfg.train.seed,
                                          num_workers=cfg.train.num_workers))
    feed, host_batch = time_pipeline(batches, args.pipeline_batches, local_batch, cfg.train.num_workers)
    placed = mesh_lib.to_global_batch(host_batch, mesh)

    results = {}
    for precision in precisions:
        task = task if precision == precisions[0] else tasks.build(tasks.resolve(with_precision(cfg, precision)))
        steps = Steps(task, mesh, steps_per_epoch)
        results[precision] = {
            "train": time_step(functools.partial(steps.train, placed), args.repeats, batch_size),
            "eval": time_step(functools.partial(steps.eval, placed), args.repeats, batch_size),
        }
        if precision == precisions[0]:
            baseline = steps  # the hot-loop measurement uses the baseline precision
    if len(precisions) == 2:
        results["bf16_over_fp32"] = {kind: results["bf16"][kind]["median_s"] / results["fp32"][kind]["median_s"]
                                     for kind in ("train", "eval")}

    step_images_per_s = results[precisions[0]]["train"]["images_per_s"]
    pipeline_images_per_s = feed["records_per_s"] * jax.process_count()
    real = time_loop(baseline, lambda: mesh_lib.to_global_batch(next(batches), mesh), args.loop_steps)
    preplaced = time_loop(baseline, lambda: placed, args.loop_steps)
    return {
        "device": {"platform": jax.default_backend(), "kind": jax.devices()[0].device_kind,
                   "count": jax.device_count(), "processes": jax.process_count()},
        "versions": {"jax": jax.__version__, "flax": flax.__version__},
        "config": {
            "experiment": cfg.experiment, "full_size": args.full_size, "demo_data": demo_data,
            "image_size": getattr(cfg.data, "image_size", None), "batch_size": batch_size,
            "num_workers": cfg.train.num_workers, "model": config_lib.to_dict(cfg)["model"],
        },
        "parameters": int(baseline.num_params),
        "repeats": args.repeats,
        "precision": {"baseline": precisions[0], **results},
        "input_pipeline": {
            **feed, "images_per_s": pipeline_images_per_s, "step_images_per_s": step_images_per_s,
            "pipeline_over_step": pipeline_images_per_s / step_images_per_s,
        },
        "hot_loop": {
            "steps": args.loop_steps, "precision": precisions[0], "real_batches_step_s": real,
            "preplaced_step_s": preplaced, "host_overhead_ms_per_step": (real - preplaced) * 1e3,
            "real_over_preplaced": real / preplaced,
        },
    }


@guarded
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--against" in argv:  # tools/ is on sys.path when this file runs as a script
        at = argv.index("--against")
        if argv[at + 1:at + 2] == ["transformers"]:  # Mask2Former against transformers' model
            import mask2former_speed
            return mask2former_speed.main(argv[:at] + argv[at + 2:])
        import against_torch
        return against_torch.main(argv)
    setup_console_logging()
    args = parse_args(argv)
    result = benchmark(args)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
