"""Export a trained model to ONNX and check the file against the JAX model with onnxruntime.

python tools/export_onnx.py --experiment NAME (--checkpoint C | --init_from torch:W.pth | hf:DIR [--set k=v])
    --out model.onnx [--fp16] [--batch dynamic|N] [--height H --width W] [--variant end_to_end]
    [--model NAME] [--tolerance T]

C is a run directory, its checkpoint directory or one step (the best step is used, else the
latest); the model is rebuilt from the config saved with it. C may also be a folder holding runs
(e.g. runs/): its newest run of the experiment, of model NAME with --model (coco_semantic trains
unet, deeplabv3 and fastscnn in their own run directories), is exported; a checkpoint of another
model than --model is refused. With --init_from the model is the one the weights describe: the
experiment's full size (never its demo variant), model.name from --model, and the class count of
the state dict's classifier; `hf:DIR` (a transformers `save_pretrained` directory, for
roadways_mask2former) gives the directory's own architecture, classes and weights. Variants are
the task's (roi_human: "default" is the ROI head on stride-8 features, "end_to_end" the head on
the built-in backbone). The max difference and argmax agreement of every check are printed; the
exit status is 1 when one exceeds its tolerance (the model is then left at <out>.unchecked.onnx),
2 for usage errors.
"""
from __future__ import annotations

import argparse
import sys

from flax import nnx

from segjax import cli, tasks
from segjax import config as config_lib
from segjax.engine import setup
from segjax.engine.runlog import quiet_onnxruntime, setup_console_logging
from segjax.errors import ArgumentParser, guarded
from segjax.export.onnx import OPSET, ExportCheckError, export, format_report


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", help="run dir, checkpoint dir or step dir, or a folder of runs (see --model)")
    source.add_argument("--init_from", metavar="torch:PATH|hf:DIR",
                        help="a PyTorch state dict (.pth/.safetensors) of the experiment's model, or a transformers "
                             "save_pretrained directory, instead")
    parser.add_argument("--out", required=True, help="the .onnx file to write")
    parser.add_argument("--model", help="model.name to export: of the state dict (--init_from), or of the run to "
                                        "pick under --checkpoint")
    parser.add_argument("--variant", default="default", help="export variant of the task (default: default)")
    parser.add_argument("--batch", default="dynamic", help="'dynamic' (default) or a fixed batch size")
    parser.add_argument("--height", type=int, help="image height (default: the config's input size)")
    parser.add_argument("--width", type=int, help="image width (default: the config's input size)")
    parser.add_argument("--fp16", action="store_true", help="convert to float16 inside (inputs, outputs stay float32)")
    parser.add_argument("--opset", type=int, default=OPSET, help=f"ONNX opset (default {OPSET})")
    parser.add_argument("--verbose", action="store_true", help="show third-party warnings (orbax/absl, onnxruntime)")
    parser.add_argument("--tolerance", type=float,
                        help="max |onnx - jax| allowed, relative to max(1, max |jax|) (default: 1e-4, fp16 3e-2)")
    args = cli.parse(parser, argv, flags=False)
    if args.batch != "dynamic":
        if not args.batch.isdigit() or int(args.batch) < 1:
            parser.error(f"--batch must be 'dynamic' or a positive int, got {args.batch!r}")
        args.batch = int(args.batch)
    if args.checkpoint and args.set:
        parser.error("--set applies to --init_from; a checkpoint is exported with the config saved in it")
    return args


def load_weights(args: argparse.Namespace):
    """(task, model): the weights source. The model is built for float32 arithmetic whatever
    precision it trained in (bfloat16 ONNX does not run on onnxruntime's CPU provider)."""
    experiment = config_lib.load_experiment(args.experiment).experiment
    if args.init_from:
        if not args.init_from.startswith(("torch:", "hf:")):
            raise config_lib.ConfigError(f"--init_from expects torch:PATH or hf:DIR, got {args.init_from!r}")
        # The model the weights describe: the experiment's own sizes, never its demo variant.
        args.set = ["train.precision=fp32", *args.set, *([f"model.name={args.model}"] if args.model else [])]
        if args.model and not config_lib.has_path(config_lib.load_experiment(args.experiment), "model.name"):
            raise config_lib.ConfigError(f"--model: experiment {experiment!r} has a single model (no model.name)")
        task = tasks.build(tasks.resolve(cli.experiment_config(args, demo=False)))
        kind, _, path = args.init_from.partition(":")
        return setup.torch_model(task, path) if kind == "torch" else task.hf_model(path)
    checkpoint = setup.locate(args.checkpoint, experiment, args.model)
    restored = setup.restore_model(checkpoint, overrides=["train.precision=fp32"])
    if restored.task.cfg.experiment != experiment:
        raise config_lib.ConfigError(f"{checkpoint} holds a {restored.task.cfg.experiment!r} model, "
                                     f"not {experiment!r}")
    return restored.task, nnx.merge(restored.graphdef, restored.state)


@guarded
def main(argv: list[str] | None = None) -> int:
    setup_console_logging()
    args = parse_args(argv)
    setup_console_logging(verbose=args.verbose)
    quiet_onnxruntime(args.verbose)
    try:
        task, model = load_weights(args)
        report = export(task, model, args.out, variant=args.variant, batch=args.batch, height=args.height,
                        width=args.width, fp16=args.fp16, opset=args.opset, tolerance=args.tolerance)
    except ExportCheckError as e:
        print(format_report(e.report))
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a variant or size the task does not have
        raise config_lib.ConfigError(str(e)) from e
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
