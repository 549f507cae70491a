"""Export a trained model to ONNX and check the file against the JAX model with onnxruntime.

python tools/export_onnx.py --experiment NAME (--checkpoint C | --init_from torch:W.pth [--set k=v])
    --out model.onnx [--fp16] [--batch dynamic|N] [--height H --width W] [--variant end_to_end]
    [--model NAME] [--tolerance T]

C is a run directory, its checkpoint directory or one step (the best step is used, else the
latest); the model is rebuilt from the config saved with it. --model NAME is for experiments that
train several models one after the other (coco_semantic: unet, deeplabv3, fastscnn, each in its
own run directory): C may then be a directory holding runs (e.g. runs/), and the newest run of
that model under it is exported. Variants are the task's (roi_human: "default" is the ROI head on
stride-8 features, "end_to_end" the head on the built-in backbone). The max difference and argmax
agreement of every check are printed; the exit status is 1 when one exceeds its tolerance (the
model is then left at <out>.unchecked.onnx), 2 for usage errors.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flax import nnx

from segjax import config as config_lib
from segjax import tasks
from segjax.engine.checkpoint import latest_run
from segjax.engine.runlog import setup_console_logging
from segjax.evaluate import restore_model
from segjax.export.onnx import OPSET, ExportCheckError, export, format_report
from segjax.train import load_torch_weights, resolve_config


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experiment", required=True, help="built-in name or a .py file, as for segjax.train")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run dir, checkpoint dir or step dir (see --model)")
    source.add_argument("--init_from", metavar="torch:PATH",
                        help="a PyTorch state dict (.pth/.safetensors) of the experiment's model instead")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --init_from: config overrides, e.g. model.name=deeplabv3")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--model", help="model.name of the run to export, among the runs under --checkpoint")
    parser.add_argument("--variant", default="default", help="export variant of the task (default: default)")
    parser.add_argument("--batch", default="dynamic", help="'dynamic' (default) or a fixed batch size")
    parser.add_argument("--height", type=int, help="image height (default: the config's input size)")
    parser.add_argument("--width", type=int, help="image width (default: the config's input size)")
    parser.add_argument("--fp16", action="store_true", help="convert to float16 inside (inputs, outputs stay float32)")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    parser.add_argument("--tolerance", type=float,
                        help="max |onnx - jax| allowed, relative to max(1, max |jax|) (default: 1e-4, fp16 3e-2)")
    args = parser.parse_args(argv)
    if args.batch != "dynamic":
        if not args.batch.isdigit() or int(args.batch) < 1:
            parser.error(f"--batch must be 'dynamic' or a positive int, got {args.batch!r}")
        args.batch = int(args.batch)
    return args


def load_weights(args: argparse.Namespace):
    """(task, model): the weights source. The model is built for float32 arithmetic whatever
    precision it trained in (bfloat16 ONNX does not run on onnxruntime's CPU provider)."""
    experiment = config_lib.load_experiment(args.experiment).experiment
    if args.init_from:
        if not args.init_from.startswith("torch:"):
            raise config_lib.ConfigError(f"--init_from expects torch:PATH, got {args.init_from!r}")
        argv = ["--experiment", args.experiment, "--set", "train.precision=fp32"]
        for item in args.set:
            argv += ["--set", item]
        task = tasks.build(resolve_config(argv)[0])
        model = nnx.jit(lambda: task.build_model(nnx.Rngs(0)))()
        load_torch_weights(task, model, args.init_from.removeprefix("torch:"))
        return task, model
    checkpoint = Path(args.checkpoint)
    if args.model:
        checkpoint = latest_run(checkpoint, experiment, args.model)
    restored = restore_model(checkpoint, overrides=["train.precision=fp32"])
    if restored.task.cfg.experiment != experiment:
        raise config_lib.ConfigError(f"{checkpoint} holds a {restored.task.cfg.experiment!r} model, "
                                     f"not {experiment!r}")
    return restored.task, nnx.merge(restored.graphdef, restored.state)


def main(argv: list[str] | None = None) -> int:
    setup_console_logging()
    args = parse_args(argv)
    try:
        task, model = load_weights(args)
        report = export(task, model, args.out, variant=args.variant, batch=args.batch, height=args.height,
                        width=args.width, fp16=args.fp16, opset=args.opset, tolerance=args.tolerance)
    except ExportCheckError as e:
        print(format_report(e.report))
        print(f"error: {e}", file=sys.stderr)
        return 1
    except (FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
