"""Write a trained segjax Mask2Former as a Hugging Face transformers directory.

python tools/export_hf_mask2former.py --experiment roadways_mask2former --checkpoint RUN --out DIR

RUN is a run directory, its checkpoint directory or one step (the best step is used, else the
latest), or a folder of runs (its newest run of the experiment). DIR receives `config.json`
(sizes from the model, class names from the task) and `model.safetensors` (float32);
`Mask2FormerForUniversalSegmentation.from_pretrained(DIR)` loads it without missing or unexpected
keys and computes what segjax computes. Exit status 2 for usage errors.
"""
from __future__ import annotations

import argparse
import sys

from flax import nnx

from segjax import cli
from segjax import config as config_lib
from segjax.bridge.hf_mask2former import save_hf_mask2former
from segjax.engine import setup
from segjax.engine.runlog import setup_console_logging
from segjax.errors import ArgumentParser, guarded
from segjax.models.mask2former import Mask2Former


@guarded
def main(argv: list[str] | None = None) -> int:
    setup_console_logging()
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="run dir, checkpoint dir, step dir or a folder of runs")
    parser.add_argument("--out", required=True, help="the directory to write")
    args = cli.parse(parser, argv, flags=False)
    experiment = config_lib.load_experiment(args.experiment).experiment
    restored = setup.restore_model(setup.locate(args.checkpoint, experiment), overrides=["train.precision=fp32"])
    model = nnx.merge(restored.graphdef, restored.state)
    if not isinstance(model, Mask2Former):
        raise config_lib.ConfigError(f"{args.checkpoint} holds a {type(model).__name__}, not a Mask2Former")
    print(save_hf_mask2former(model, args.out, list(restored.task.class_names)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
