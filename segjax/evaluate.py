"""python -m segjax.evaluate CHECKPOINT: validate checkpoints and compare them in a table.

CHECKPOINT is a run directory, its `checkpoints/` directory (the best step is used) or one step
directory. `--multiple "GLOB"` validates every match and names the best by the experiment's metric.
"""
from __future__ import annotations

import glob
import json
import logging
import math
import sys
from pathlib import Path

import jax

from segjax.engine import mesh as mesh_lib
from segjax.engine.evaluation import make_evaluator, validate_model
from segjax.engine.runlog import json_safe, per_class_iou, setup_console_logging
from segjax.engine.setup import restore_model
from segjax.errors import ArgumentParser, guarded

log = logging.getLogger("segjax")


def evaluate_checkpoint(path: str | Path, *, visualize: bool = True, overrides: list[str] = ()) -> dict:
    """Validates one checkpoint with the config saved in it; returns its metrics and identity."""
    mesh = mesh_lib.make_data_mesh()
    restored = restore_model(path, overrides=overrides, sharding=mesh_lib.replicated(mesh))
    task, step, ckpt_dir = restored.task, restored.step, restored.ckpt_dir
    cfg = task.cfg
    evaluator = make_evaluator(task, restored.graphdef, mesh, cfg)
    out_dir = ckpt_dir.parent / "visualizations" / f"eval_step{step}"

    def draw(batch, outputs):
        if visualize and jax.process_index() == 0:
            task.visualize(batch, outputs, out_dir, f"step{step}", cfg.train.num_visualizations)

    if cfg.demo:
        log.warning("%s was trained on segjax's generated demo data (its run was given no data)",
                    ckpt_dir / str(step))
    metrics = validate_model(evaluator, restored.state, on_first_batch=draw)
    return {"checkpoint": str(ckpt_dir / str(step)), "epoch": restored.meta["epoch"], "step": step,
            "best_metric": task.best_metric, "best_mode": task.best_mode, "shown_metrics": list(task.shown_metrics),
            "demo": cfg.demo, "metrics": metrics}


def expand(pattern: str) -> list[str]:
    """Glob matches that hold checkpoints; half-written orbax temporaries are never matched."""
    matches = sorted(glob.glob(pattern))
    return [m for m in matches if ".orbax-checkpoint-tmp" not in m and Path(m).is_dir()]


def comparison_table(results: list[dict]) -> str:
    """The checkpoints (full paths) by the task's shown metrics, the best marked, then every
    class's IoU per checkpoint (#1, #2, ... as in the first column)."""
    metric, mode = results[0]["best_metric"], results[0]["best_mode"]
    values = [r["metrics"][metric] for r in results]
    finite = [v for v in values if not math.isnan(v)]
    best = (max if mode == "max" else min)(finite) if finite else None
    columns = [c for c in results[0]["shown_metrics"]
               if isinstance(results[0]["metrics"].get(c), float) and not c.startswith("iou_")]
    width = max(len("checkpoint"), *(len(r["checkpoint"]) for r in results))
    header = f"{'#':>3} {'checkpoint':<{width}} {'epoch':>5} " + " ".join(f"{c:>14}" for c in columns)
    lines = [header, "-" * len(header)]
    for i, (r, value) in enumerate(zip(results, values), 1):
        mark = " *" if best is not None and value == best else ""
        cells = " ".join(f"{r['metrics'][c]:14.4f}" for c in columns)
        lines.append(f"{f'#{i}':>3} {r['checkpoint']:<{width}} {r['epoch']:>5} {cells}{mark}"
                     + (" (demo data)" if r.get("demo") else ""))
    if best is not None:
        winner = results[values.index(best)]["checkpoint"]
        lines.append(f"* best by {metric} ({mode}): {winner}")
    per_class = per_class_iou([(f"#{i}", r["metrics"]) for i, r in enumerate(results, 1)])
    return "\n".join(lines + ([""] + per_class if per_class else []))


@guarded
def main(argv: list[str] | None = None) -> int:
    setup_console_logging()
    parser = ArgumentParser(prog="python -m segjax.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="run dir, checkpoints dir or step dir")
    parser.add_argument("--multiple", metavar="GLOB", help="validate every match, e.g. 'runs/roi_human/*'")
    parser.add_argument("--no_visualization", action="store_true", help="skip overlay images")
    parser.add_argument("--json", action="store_true", help="print results as JSON (strict: NaN as null)")
    parser.add_argument("--verbose", action="store_true", help="show third-party warnings (orbax/absl, onnxruntime)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a saved config field, e.g. --set data.val_ann=other.json or "
                        "--set eval.mode=slide (README \"Evaluation protocol\")")
    args = parser.parse_args(argv)
    setup_console_logging(verbose=args.verbose)
    if bool(args.checkpoint) == bool(args.multiple):
        parser.error("give either CHECKPOINT or --multiple GLOB")
    paths = expand(args.multiple) if args.multiple else [args.checkpoint]
    if not paths:
        raise FileNotFoundError(f"no checkpoint matches {args.multiple!r}")
    results = [evaluate_checkpoint(p, visualize=not args.no_visualization, overrides=args.set) for p in paths]
    if args.json:
        print(json.dumps(json_safe(results), indent=2, allow_nan=False))  # NaN (an absent class) as null
    else:
        print(comparison_table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
