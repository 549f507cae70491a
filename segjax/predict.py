"""python -m segjax.predict --checkpoint C --image X [--image Y ...]: segment images with a trained model.

Each image is letterboxed to the model's input size; the per-pixel score of the chosen class is
cropped back to the letterbox content, resized to the original size and thresholded. Written into
--out_dir: `<stem>_segmented.png` (the class kept, everything else black) and `<stem>_mask.png`
(0 / 255). `--timing` prints the median inference time of each model part (compile excluded).

--class_id counts classes from 1, as the original scripts do (0 would be the background):
1 = person for hybrid_p3m. A task plugs in by providing `export_signature()` (its input size),
`inference_stages()` ((name, fn(model, x)) pairs from float NHWC images in [0, 1] to its outputs)
and `class_scores(outputs, class_id, score_threshold)` (per-pixel scores [B, H, W] in [0, 1]);
for query models the score is the max over the queries of that class above --score_threshold of
sigmoid(mask) × class probability (segjax.tasks.query_masks.combine_queries).
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image

from segjax import cli
from segjax.config import ConfigError
from segjax.data.files import BadImage, read_rgb
from segjax.data.transforms import resize_letterbox
from segjax.engine.runlog import setup_console_logging
from segjax.engine.setup import restore_model


class Predictor:
    """Jitted inference of one restored model: whole (class scores) or stage by stage (timing)."""

    def __init__(self, task, graphdef: nnx.GraphDef, state: nnx.State):
        self.state = state
        stages = task.inference_stages()
        self.stages = [(name, jax.jit(lambda s, x, fn=fn: fn(nnx.merge(graphdef, s), x))) for name, fn in stages]
        _, shape = task.export_signature()[0][0]
        self.size = shape[-1]

        def scores(s, images, class_id, score_threshold):
            model = nnx.merge(graphdef, s)
            x = images.astype(jnp.float32) / 255.0
            for _, fn in stages:
                x = fn(model, x)
            return task.class_scores(x, class_id, score_threshold)

        self._scores = jax.jit(scores, static_argnums=(2,))

    def letterbox(self, image: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """The model input [1, S, S, 3] uint8 and the (height, width) of its content box."""
        boxed, scale = resize_letterbox(image, self.size)
        height, width = image.shape[:2]
        # The top-left box resize_letterbox fills (its rounding), the rest is padding.
        content = tuple(min(self.size, max(1, round(n * scale))) for n in (height, width))
        return boxed[None], content

    def mask(self, image: np.ndarray, class_id: int, score_threshold: float, mask_threshold: float) -> np.ndarray:
        """Boolean [H, W] mask of `class_id` at the image's own size."""
        boxed, (content_h, content_w) = self.letterbox(image)
        scores = np.asarray(self._scores(self.state, boxed, class_id, score_threshold))[0, :content_h, :content_w]
        height, width = image.shape[:2]
        # Scores resized (bilinearly) before thresholding give smoother edges than a resized mask.
        resized = Image.fromarray(scores.astype(np.float32)).resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(resized) > mask_threshold

    def time_stages(self, image: np.ndarray, repeats: int) -> dict[str, float]:
        """Median seconds of each stage on one letterboxed image; the first (compiling) call is not timed."""
        x = jnp.asarray(self.letterbox(image)[0], jnp.float32) / 255.0
        medians = {}
        for name, stage in self.stages:
            out = jax.block_until_ready(stage(self.state, x))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(stage(self.state, x))
                times.append(time.perf_counter() - start)
            medians[name] = statistics.median(times)
            x = out
        return medians


def save_outputs(image: np.ndarray, mask: np.ndarray, out_dir: Path, stem: str) -> tuple[Path, Path]:
    segmented = np.where(mask[..., None], image, 0).astype(np.uint8)
    paths = out_dir / f"{stem}_segmented.png", out_dir / f"{stem}_mask.png"
    Image.fromarray(segmented).save(paths[0])
    Image.fromarray(mask.astype(np.uint8) * 255).save(paths[1])
    return paths


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    setup_console_logging()
    parser = argparse.ArgumentParser(prog="python -m segjax.predict", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="run dir, checkpoints dir or step dir")
    parser.add_argument("--image", action="append", required=True, help="input image (repeatable)")
    parser.add_argument("--experiment", help="check that the checkpoint belongs to this experiment")
    parser.add_argument("--out_dir", default="predictions", help="where segmented images and masks go")
    parser.add_argument("--class_id", type=int, default=1, help="class to segment, counted from 1 (1 = person)")
    parser.add_argument("--score_threshold", type=float, default=0.5, help="queries less sure of the class are ignored")
    parser.add_argument("--mask_threshold", type=float, default=0.5, help="pixels scoring above this are the class")
    parser.add_argument("--timing", action="store_true", help="print median times of each model part")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per part with --timing")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    restored = restore_model(args.checkpoint)  # config from the checkpoint, weights on one device
    task = restored.task
    experiment = Path(task.cfg.experiment).stem
    if args.experiment and Path(args.experiment).stem != experiment:
        raise ConfigError(f"{args.checkpoint} is a checkpoint of {experiment!r}, not {args.experiment!r}")
    names = task.class_names
    if not 1 <= args.class_id < len(names):
        raise ConfigError(f"--class_id must be within 1..{len(names) - 1} ({', '.join(names[1:])}), "
                          f"got {args.class_id}")
    predictor = Predictor(task, restored.graphdef, restored.state)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed = 0
    first = None
    for path in args.image:
        try:
            image = read_rgb(path)
        except BadImage as e:  # the rest are still segmented
            print(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        first = image if first is None else first
        mask = predictor.mask(image, args.class_id, args.score_threshold, args.mask_threshold)
        segmented, mask_path = save_outputs(image, mask, out_dir, Path(path).stem)
        print(f"{path}: {names[args.class_id]} covers {mask.mean():.1%}; wrote {segmented} and {mask_path}")
    if args.timing and first is not None:
        medians = predictor.time_stages(first, args.repeats)
        print(f"median inference time over {args.repeats} runs, batch 1, {predictor.size}x{predictor.size}:")
        for name, seconds in medians.items():
            print(f"  {name:<10} {seconds * 1e3:10.3f} ms")
    return 2 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
