"""python -m segjax.predict (--checkpoint RUN | --onnx MODEL) (--image X ... | --input_dir DIR): segment images.

Every image is letterboxed to the model's input size (one compiled shape for any image size),
run through the task's export forward (`task.export_forward` of its `predict_variant`, in JAX
with float32 arithmetic) or through the same forward exported to ONNX (`--onnx`, onnxruntime),
and turned into a class per pixel at the image's own size by the task (`task.postprocess`). Both
paths share the pre- and post-processing. With the config's `eval` section set (`--set
eval.mode=slide --set eval.crop=H,W ...`, README "Evaluation protocol"), semantic models follow
mmsegmentation's test protocol instead (segjax.engine.inference: keep-ratio resize, sliding
window, test-time scales and flip), the exported graph run per crop with --onnx. An .onnx file
written by tools/export_onnx.py carries its config, so `--onnx` needs no checkpoint; with one, its
config is used.

Written into --out_dir, per image `<name>`: `<name>_mask.png`, the class indices as a palette PNG
(the task's colours), and `<name>_overlay.png`, the class colours blended at alpha 0.5 into the
image (classes named "background" left clear) with a legend of the classes present. Images of
--input_dir (recursively) keep their relative folders.

roi_human takes person boxes: `--boxes x1,y1,x2,y2` (repeatable, image pixels, for every image)
or `--detections results.json`, a COCO detection-results list ({image_id, category_id,
bbox [x, y, w, h], score}) of which the person entries (category 1) scoring at least
--score_threshold are used. An image's detections are those whose image_id is its file stem: the
number for digit stems (COCO's 000000471345.jpg is image 471345), else the stem text. Its mask
marks this person (1, red) and other people (2, blue), every box's prediction combined by the
maximum.

An unreadable image is reported and skipped; the exit status is then 1 (usage errors: 2).
`--timing` prints the median time of each model part (JAX; the whole model for tasks without
parts, and for --onnx), compile excluded.
"""
from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from segjax import config as config_lib
from segjax import tasks
from segjax.config import ConfigError
from segjax.data.errors import DataError
from segjax.data.files import IMAGE_SUFFIXES, BadImage, read_rgb
from segjax.engine import steps as steps_lib
from segjax.engine.evaluation import CropScorer, score_fn, task_protocol
from segjax.engine.inference import images_nchw, segment, uses_protocol
from segjax.engine.runlog import quiet_onnxruntime, setup_console_logging
from segjax.engine.setup import checkpoint_config, locate, restore_model
from segjax.errors import ArgumentParser, guarded
from segjax.tasks.base import blend

PERSON_CATEGORY = 1  # COCO's person category id in detection results
ALPHA = 0.5


class Runner:
    """The task's predict forward on inputs by name: `images` uint8 NHWC, made float NCHW in
    [0, 1] here, as the exported graph takes them. `size` is the model's input (height, width).
    `scores` is the evaluation protocol's forward (uint8 NHWC crops -> per-class scores NCHW, see
    segjax.engine.inference), None for tasks without one; `fixed_size` the only input size it takes
    (an ONNX graph's), None when any."""

    def __init__(self, names: list[str], size: tuple[int, int], forward: Callable, stages: list[tuple[str, Callable]],
                 scores: Callable | None = None, fixed_size: tuple[int, int] | None = None):
        self.names, self.size, self.forward, self.stages = names, size, forward, stages
        self.scores, self.fixed_size = scores, fixed_size

    def __call__(self, inputs: dict) -> list[np.ndarray]:
        return [np.asarray(x) for x in self.forward(*(inputs[name] for name in self.names))]

    def time(self, inputs: dict, repeats: int) -> dict[str, float]:
        """Median seconds of each stage, the first taking the float NHWC image (the whole forward
        when there are none); first calls are not timed."""
        if self.stages:
            x = [jnp.asarray(inputs["images"], jnp.float32) / 255.0]
        else:
            x = [inputs[name] for name in self.names]
        medians = {}
        for name, stage in self.stages or [("model", self.forward)]:
            out = jax.block_until_ready(stage(*x))
            times = []
            for _ in range(repeats):
                start = time.perf_counter()
                jax.block_until_ready(stage(*x))
                times.append(time.perf_counter() - start)
            medians[name] = statistics.median(times)
            x = [out]
        return medians


def _input_size(shape, source: str) -> tuple[int, int]:
    height, width = shape[-2:]
    if not (isinstance(height, int) and isinstance(width, int)):
        raise ConfigError(f"{source}: prediction needs a fixed image input size, got {height}x{width}")
    return height, width


def _signature(task):
    try:
        return task.export_signature(task.predict_variant)
    except ValueError as e:  # e.g. an ROI head on ONNX extractor features has no end-to-end variant
        raise ConfigError(f"cannot predict with this model: {e}") from e


def jax_runner(checkpoint: str, overrides: list[str] = ()):
    """(task, Runner) of a checkpoint, float32 arithmetic as exported; `overrides` are --set's."""
    restored = restore_model(checkpoint, overrides=["train.precision=fp32", *overrides])
    task, graphdef, state = restored.task, restored.graphdef, restored.state
    signature, _ = _signature(task)
    names = [name for name, _ in signature]

    def forward(s, images, *rest):
        return task.export_forward(nnx.merge(graphdef, s), images_nchw(images, jnp), *rest,
                                   variant=task.predict_variant)

    jitted = steps_lib.inference_jit(forward)
    stages = [(name, functools.partial(steps_lib.inference_jit(lambda s, x, fn=fn: fn(nnx.merge(graphdef, s), x)),
                                       state)) for name, fn in task.inference_stages()]
    size = _input_size(dict(signature)["images"], checkpoint)
    scores = CropScorer(steps_lib.inference_jit(score_fn(task, graphdef)), state) if task.eval_outputs else None
    return task, Runner(names, size, functools.partial(jitted, state), stages, scores)


def onnx_runner(path: str, checkpoint: str | None, providers: list[str], overrides: list[str] = ()):
    """(task, Runner) of an exported model; the task from `checkpoint`'s config, else the file's,
    with `overrides` (--set's)."""
    from segjax.export.runtime import make_session, read_metadata
    try:
        session = make_session(path, prefer=providers)
    except ValueError as e:
        raise ConfigError(str(e)) from e
    meta = read_metadata(session)
    if checkpoint:
        cfg = checkpoint_config(checkpoint)[0]
    elif isinstance(meta.get("config"), dict):
        cfg = config_lib.from_dict(meta["config"])
    else:
        raise ConfigError(f"{path} carries no segjax config in its metadata (exported by an older segjax); "
                          "give the run it came from with --checkpoint")
    task = tasks.build(tasks.resolve(config_lib.apply(cfg, config_lib.parse_set(overrides))))
    if meta.get("variant") != task.predict_variant or meta.get("experiment") != cfg.experiment:
        raise ConfigError(f"{path} is the {meta.get('variant')!r} variant of {meta.get('experiment')!r}; prediction "
                          f"with {cfg.experiment!r} runs variant {task.predict_variant!r}")
    if len(meta.get("class_names", ())) != len(task.class_names):
        raise ConfigError(f"{path} has {len(meta.get('class_names', ()))} classes, the config "
                          f"{len(task.class_names)}")
    inputs = {i.name: i.shape for i in session.get_inputs()}
    names = [name for name, _ in _signature(task)[0]]
    if sorted(inputs) != sorted(names):
        raise ConfigError(f"{path} takes inputs {sorted(inputs)}, the task {sorted(names)}")
    outputs = [o.name for o in session.get_outputs()]

    def forward(images, *rest):
        feed = {"images": images_nchw(images)} | dict(zip(names[1:], rest))
        return session.run(outputs, feed)

    crop_scores = jax.jit(task.crop_scores, static_argnums=1)

    def scores(crops):  # the graph per crop batch, then the task's scores as in JAX
        return np.asarray(crop_scores(tuple(forward(crops)), crops.shape[1:3]))

    size = _input_size(inputs["images"], path)
    return task, Runner(names, size, forward, [], scores if task.eval_outputs else None, size)


# ---------------------------------------------------------------- inputs


def parse_box(text: str) -> tuple[float, float, float, float]:
    try:
        x1, y1, x2, y2 = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected x1,y1,x2,y2, got {text!r}") from None
    if not (x2 > x1 and y2 > y1):
        raise argparse.ArgumentTypeError(f"a box needs x2 > x1 and y2 > y1, got {text!r}")
    return x1, y1, x2, y2


def image_key(path: Path) -> int | str:
    """What a COCO detection's image_id is matched against: the stem, as a number when digits."""
    return int(path.stem) if path.stem.isdigit() else path.stem


def read_detections(path: str, score_threshold: float) -> dict[int | str, np.ndarray]:
    """Person boxes [N, 4] (x1, y1, x2, y2) by image_id from a COCO detection-results JSON."""
    try:
        entries = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"cannot read detections {path}: {e}") from e
    if not isinstance(entries, list):
        raise DataError(f"{path}: a COCO detection-results file is a JSON list, got {type(entries).__name__}")
    boxes: dict[int | str, list] = {}
    for i, entry in enumerate(entries):
        try:
            if entry["category_id"] != PERSON_CATEGORY or entry.get("score", 1.0) < score_threshold:
                continue
            x, y, w, h = (float(v) for v in entry["bbox"])
            key = entry["image_id"]
        except (KeyError, TypeError, ValueError) as e:
            raise DataError(f"{path}: entry {i} is not a detection ({{image_id, category_id, bbox, score}}): "
                            f"{e!r}") from e
        if w > 0 and h > 0:
            boxes.setdefault(int(key) if str(key).isdigit() else key, []).append((x, y, x + w, y + h))
    return {key: np.asarray(value, np.float32) for key, value in boxes.items()}


def list_images(paths: list[str], input_dir: str | None) -> list[tuple[Path, Path]]:
    """(image, output name without suffix): --image by stem, --input_dir by relative path."""
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"--image {missing[0]} does not exist")
    found = [(Path(p), Path(Path(p).stem)) for p in paths]
    if input_dir:
        root = Path(input_dir)
        if not root.is_dir():
            raise DataError(f"--input_dir {root} " + ("is not a directory" if root.exists() else "does not exist"))
        found += [(p, p.relative_to(root).with_suffix("")) for p in sorted(root.rglob("*"))
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file() and not p.name.startswith(".")]
    names = [name for _, name in found]
    repeated = sorted({str(n) for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"several inputs would write the same outputs: {', '.join(repeated[:5])}")
    if not found:
        raise DataError(f"no images found in {input_dir}")
    return found


# ---------------------------------------------------------------- outputs


def overlay(image: np.ndarray, mask: np.ndarray, palette: np.ndarray, class_names) -> np.ndarray:
    """Class colours blended at ALPHA where the class is not named background, and a legend."""
    coloured = np.isin(mask, [i for i, name in enumerate(class_names) if name != "background"])
    picture = Image.fromarray(blend(image, mask, palette, coloured, ALPHA))
    present = [int(c) for c in np.unique(mask[coloured])]
    if present:
        draw = ImageDraw.Draw(picture)
        font = ImageFont.load_default(size=max(10, min(picture.size) // 30))
        line = font.size + 4
        width = max(draw.textlength(class_names[c], font=font) for c in present) + line + 12
        draw.rectangle((0, 0, width, line * len(present) + 6), fill=(0, 0, 0))
        for row, c in enumerate(present):
            top = 4 + row * line
            draw.rectangle((4, top, 4 + font.size, top + font.size), fill=tuple(int(v) for v in palette[c]))
            draw.text((8 + font.size, top), class_names[c], fill=(255, 255, 255), font=font)
    return np.asarray(picture)


def save(mask: np.ndarray, overlaid: np.ndarray, palette: np.ndarray, out_dir: Path, name: Path) -> None:
    (out_dir / name).parent.mkdir(parents=True, exist_ok=True)
    indices = Image.fromarray(mask, mode="L").convert("P")
    indices.putpalette(palette.reshape(-1).tolist())
    indices.save(out_dir / f"{name}_mask.png")
    Image.fromarray(overlaid).save(out_dir / f"{name}_overlay.png")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="python -m segjax.predict", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", help="run dir, checkpoints dir or step dir")
    parser.add_argument("--onnx", help="an exported model (tools/export_onnx.py) to run with onnxruntime")
    parser.add_argument("--provider", action="append", default=None,
                        help="onnxruntime provider, in order of preference (repeatable; default cpu)")
    parser.add_argument("--image", action="append", default=[], help="input image (repeatable)")
    parser.add_argument("--input_dir", help="every image under this folder")
    parser.add_argument("--experiment", help="check that the model belongs to this experiment")
    parser.add_argument("--out_dir", default="predictions", help="where masks and overlays go")
    parser.add_argument("--boxes", action="append", type=parse_box, default=[], metavar="x1,y1,x2,y2",
                        help="roi_human: a person box in image pixels, for every image (repeatable)")
    parser.add_argument("--detections", help="roi_human: COCO detection-results JSON with the person boxes")
    parser.add_argument("--score_threshold", type=float, default=0.5, help="--detections: minimum score")
    parser.add_argument("--verbose", action="store_true", help="show third-party warnings (orbax/absl, onnxruntime)")
    parser.add_argument("--timing", action="store_true", help="print median times of each model part")
    parser.add_argument("--repeats", type=int, default=20, help="timed runs per part with --timing")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set eval.mode=slide (README \"Evaluation protocol\")")
    args = parser.parse_args(argv)
    if not (args.checkpoint or args.onnx):
        parser.error("give --checkpoint RUN or --onnx MODEL")
    if not (args.image or args.input_dir):
        parser.error("give --image or --input_dir")
    if args.boxes and args.detections:
        parser.error("--boxes and --detections exclude each other")
    if args.repeats < 1:
        parser.error("--repeats must be >= 1")
    if args.provider and not args.onnx:
        parser.error("--provider applies to --onnx")
    return args


def task_options(task, args) -> Callable[[Path], dict]:
    """The task's predict options per image path (roi_human: its boxes)."""
    asked = "boxes" if args.boxes or args.detections else None
    if asked and asked not in task.predict_options:
        raise ConfigError(f"--boxes/--detections apply to ROI models; {Path(task.cfg.experiment).stem} takes none")
    if "boxes" not in task.predict_options:
        return lambda path: {}
    if not asked:
        raise ConfigError(f"{Path(task.cfg.experiment).stem} segments people in boxes: give --boxes or --detections")
    if args.boxes:
        boxes = np.asarray(args.boxes, np.float32)
        return lambda path: {"boxes": boxes}
    detections = read_detections(args.detections, args.score_threshold)
    return lambda path: {"boxes": detections.get(image_key(path), np.zeros((0, 4), np.float32))}


@guarded
def main(argv: list[str] | None = None) -> int:
    setup_console_logging()
    args = parse_args(argv)
    setup_console_logging(verbose=args.verbose)
    if args.onnx:
        quiet_onnxruntime(args.verbose)
    images = list_images(args.image, args.input_dir)  # before the model loads: a wrong path fails fast
    # The checkpoint forms of evaluate and export: run, checkpoint or step dir, a folder of runs, "latest".
    checkpoint = args.checkpoint and locate(args.checkpoint, args.experiment and
                                            config_lib.load_experiment(args.experiment).experiment)
    task, runner = (onnx_runner(args.onnx, checkpoint, args.provider or ["cpu"], args.set) if args.onnx
                    else jax_runner(checkpoint, args.set))
    experiment = Path(task.cfg.experiment).stem
    if args.experiment and Path(args.experiment).stem != experiment:
        raise ConfigError(f"{args.onnx or args.checkpoint} is a model of {experiment!r}, not {args.experiment!r}")
    options = task_options(task, args)
    protocol = None
    if uses_protocol(task.cfg.eval):
        protocol = task_protocol(task, fixed_size=runner.fixed_size)
        if args.timing:
            raise ConfigError("--timing times the fixed-size forward; leave eval.* at its defaults")
    out_dir = Path(args.out_dir)
    palette = task.palette()
    failed, timed = 0, None
    for path, name in tqdm(images, desc="predict", unit="image", dynamic_ncols=True, disable=len(images) < 2):
        try:
            image = read_rgb(path)
        except BadImage as e:  # the rest are still segmented
            tqdm.write(f"error: {e}", file=sys.stderr)
            failed += 1
            continue
        if protocol is not None:
            inputs, mask = None, segment(image, protocol, runner.scores)
        else:
            inputs, context = task.predict_inputs(image, size=runner.size, **options(path))
            mask = task.postprocess(runner(inputs), context)
        save(mask, overlay(image, mask, palette, task.class_names), palette, out_dir, name)
        timed = timed or inputs
    done = len(images) - failed
    print(f"{done} of {len(images)} images segmented into {out_dir}" + (f"; {failed} unreadable" if failed else ""))
    if args.timing and timed is not None:
        medians = runner.time(timed, args.repeats)
        print(f"median inference time over {args.repeats} runs, batch 1, {runner.size[0]}x{runner.size[1]}:")
        for name, seconds in medians.items():
            print(f"  {name:<10} {seconds * 1e3:10.3f} ms")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
