"""Mask2Former (Swin-T, 19 classes) in segjax against transformers in PyTorch eager, same weights,
same images, in one run: the eval-mode forward, and the frozen fine-tuning step's forward and
backward (backbone and pixel decoder in inference mode without gradient, the transformer
decoder and class head trained with Mask2Former's loss; no optimizer update on either side).

  python tools/mask2former_speed.py [--size 384] [--batch 2] [--repeats 5]

--slide H,W instead: sliding-window evaluation of one H×W image (mmsegmentation's protocol,
segjax.engine.inference; Cityscapes' Mask2Former: 1024,2048 with --crop 512,1024 --stride 341,683),
segjax against the same loop on transformers' Mask2FormerForUniversalSegmentation (the same
weights through segjax.bridge), each side in its own process: time and peak memory (the process's
peak RSS, and the accelerator's peak where there is one), and how many pixels' classes agree.

Times are the minimum over the repeats after a warm-up (and XLA compile), float32 on both sides.
torch needs the `test` extra (transformers).
"""
import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segjax.bridge.hf_mask2former import save_hf_mask2former
from segjax.engine import inference
from segjax.engine import steps as steps_lib
from segjax.engine.evaluation import CropScorer
from segjax.losses import Mask2FormerLoss, semantic_targets
from segjax.models.layers import imagenet_normalize
from segjax.models.mask2former import MASK2FORMER_VARIANTS, Mask2Former, export_forward, semantic_scores

NUM_CLASSES = 19


def _min_time(fn, repeats: int) -> float:
    fn()  # warm-up / compile
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _inputs(batch: int, size: int):
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(batch, size, size, 3)).astype(np.float32)
    # Label maps with a few classes in horizontal bands, as road scenes have.
    labels = np.zeros((batch, size, size), np.int32)
    for b in range(batch):
        bands = np.sort(rng.choice(np.arange(1, size), 4, replace=False))
        for i, row in enumerate(bands):
            labels[b, row:] = rng.integers(NUM_CLASSES) if i < 3 else 255
    return images, labels


def segjax_times(model: Mask2Former, images, labels, repeats: int) -> dict:
    graphdef, trained, frozen = nnx.split(model, nnx.All(nnx.Param, nnx.PathContains("transformer")), ...)
    forward = steps_lib.inference_jit(lambda t, f, x: nnx.merge(graphdef, t, f)(x))  # as evaluate/predict
    criterion = Mask2FormerLoss()
    masks, classes, valid = semantic_targets(jnp.asarray(labels), NUM_CLASSES)

    @jax.jit
    def step(trained, frozen, x, key):
        def loss_fn(trained):
            m = nnx.merge(graphdef, trained, frozen)
            features = jax.lax.stop_gradient(m.features(x))
            out = m.decode(*features)
            sets = [(out["class_queries_logits"], out["masks_queries_logits"])] + [
                (a["class_queries_logits"], a["masks_queries_logits"]) for a in out["auxiliary_logits"]]
            return criterion(sets, masks, classes, valid, key)[0]
        return jax.value_and_grad(loss_fn)(trained)

    x, key = jnp.asarray(images), jax.random.key(0)
    return {"forward": _min_time(lambda: jax.block_until_ready(forward(trained, frozen, x)), repeats),
            "train_step": _min_time(lambda: jax.block_until_ready(step(trained, frozen, x, key)), repeats)}


def _torch():
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import torch

    return torch


def torch_times(model: Mask2Former, images, labels, repeats: int) -> dict:
    torch = _torch()
    from transformers import Mask2FormerForUniversalSegmentation
    with tempfile.TemporaryDirectory() as path:  # the same weights, through the bridge
        save_hf_mask2former(model, path)
        net = Mask2FormerForUniversalSegmentation.from_pretrained(path)
    pixels = torch.from_numpy(np.asarray(imagenet_normalize(images)).transpose(0, 3, 1, 2).copy())
    mask_labels, class_labels = [], []
    for label in labels:
        present = [c for c in np.unique(label) if c != 255]
        mask_labels.append(torch.from_numpy(np.stack([label == c for c in present]).astype(np.float32)))
        class_labels.append(torch.tensor(present, dtype=torch.int64))

    def forward():
        with torch.no_grad():
            net.eval()(pixel_values=pixels)

    def train_step():
        net.zero_grad(set_to_none=True)
        with torch.no_grad():  # frozen backbone and pixel decoder, inference mode
            features = net.model.pixel_level_module.eval()(pixels)
        decoder = net.model.transformer_module.train()
        out = decoder(features.decoder_hidden_states, features.decoder_last_hidden_state,
                      output_hidden_states=True)
        classes = [net.class_predictor(h.transpose(0, 1)) for h in out.intermediate_hidden_states]
        masks = out.masks_queries_logits
        aux = net.get_auxiliary_logits(classes, masks)
        losses = net.get_loss_dict(masks[-1], classes[-1], mask_labels, class_labels, aux)
        net.get_loss(losses).backward()

    return {"forward": _min_time(forward, repeats), "train_step": _min_time(train_step, repeats),
            "torch_threads": torch.get_num_threads()}


def _pair(text: str) -> tuple[int, int]:
    height, width = (int(v) for v in text.split(","))
    return height, width


def _peak_memory(accelerator: dict) -> dict:
    """This process's peak resident memory, and the accelerator's peak when there is one."""
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, **accelerator}


def slide_segjax(args, image: np.ndarray) -> tuple[float, np.ndarray, dict]:
    """segjax.engine.inference.segment in slide mode around the jitted Mask2Former per crop batch:
    transformers' semantic inference of each crop (its mask logits upsampled to the crop)."""
    model = Mask2Former(NUM_CLASSES, **MASK2FORMER_VARIANTS["full"], rngs=nnx.Rngs(0))  # the saved weights
    model.eval()
    graphdef, state = nnx.split(model)

    def scores(s, crops):
        classes, masks = export_forward(nnx.merge(graphdef, s), inference.images_nchw(crops, jnp))
        return jnp.moveaxis(semantic_scores(classes, masks, crops.shape[1:3]), -1, 1)

    protocol = inference.Protocol(resize=image.shape[:2], crop=args.crop, stride=args.stride, scales=(1.0,),
                                  flip=False, batch_size=args.batch, min_batch=1, logits=False)
    forward = CropScorer(steps_lib.inference_jit(scores), state)
    pred = inference.segment(image, protocol, forward)
    seconds = _min_time(lambda: inference.segment(image, protocol, forward), args.repeats)
    device = jax.local_devices()[0]
    stats = device.memory_stats() if device.platform != "cpu" else None
    return seconds, pred, {"device_peak_mib": stats["peak_bytes_in_use"] / 2**20} if stats else {}


def slide_torch(args, image: np.ndarray, hf_dir: str) -> tuple[float, np.ndarray, dict]:
    """mmseg's slide_inference loop (crops batched as segjax's) on transformers' Mask2Former, each
    crop's scores as its post_process_semantic_segmentation at the crop's size."""
    torch = _torch()
    from transformers import Mask2FormerForUniversalSegmentation

    F = torch.nn.functional
    cuda = torch.cuda.is_available()
    net = Mask2FormerForUniversalSegmentation.from_pretrained(hf_dir).eval().to("cuda" if cuda else "cpu")
    pixels = np.asarray(imagenet_normalize(image[None].astype(np.float32) / 255.0)).transpose(0, 3, 1, 2)
    x = torch.from_numpy(pixels.copy()).to(net.device)
    (crop_h, crop_w), (stride_h, stride_w) = args.crop, args.stride

    @torch.no_grad()
    def run():
        _, _, height, width = x.shape
        windows = []
        for i in range(max(height - crop_h + stride_h - 1, 0) // stride_h + 1):
            for j in range(max(width - crop_w + stride_w - 1, 0) // stride_w + 1):
                y2, x2 = min(i * stride_h + crop_h, height), min(j * stride_w + crop_w, width)
                windows.append((max(y2 - crop_h, 0), y2, max(x2 - crop_w, 0), x2))
        preds = x.new_zeros((1, NUM_CLASSES, height, width))
        count = x.new_zeros((1, 1, height, width))
        for start in range(0, len(windows), args.batch):
            chunk = windows[start:start + args.batch]
            out = net(pixel_values=torch.cat([x[:, :, y1:y2, x1:x2] for y1, y2, x1, x2 in chunk]))
            masks = F.interpolate(out.masks_queries_logits, size=args.crop, mode="bilinear", align_corners=False)
            probs = torch.einsum("bqc,bqhw->bchw", out.class_queries_logits.softmax(-1)[..., :-1], masks.sigmoid())
            for (y1, y2, x1, x2), p in zip(chunk, probs):
                preds[:, :, y1:y2, x1:x2] += p
                count[:, :, y1:y2, x1:x2] += 1
        pred = (preds / count).argmax(1)[0]
        if cuda:
            torch.cuda.synchronize()
        return pred

    pred = run().cpu().numpy()
    seconds = _min_time(run, args.repeats)
    return seconds, pred, {"device_peak_mib": torch.cuda.max_memory_allocated() / 2**20} if cuda else {}


def slide_main(args) -> int:
    """Runs each side in its own process (separate peak memory) and prints both as JSON."""
    if args.side:
        image = np.load(Path(args.workdir) / "image.npy")
        seconds, pred, accelerator = (slide_segjax(args, image) if args.side == "segjax"
                                      else slide_torch(args, image, str(Path(args.workdir) / "hf")))
        np.save(Path(args.workdir) / f"{args.side}.npy", pred)
        print(json.dumps({"seconds": seconds, **_peak_memory(accelerator)}))
        return 0
    with tempfile.TemporaryDirectory() as workdir:
        image = np.random.default_rng(0).integers(0, 256, (*args.slide, 3), np.uint8)
        np.save(Path(workdir) / "image.npy", image)
        model = Mask2Former(NUM_CLASSES, **MASK2FORMER_VARIANTS["full"], rngs=nnx.Rngs(0))
        save_hf_mask2former(model, Path(workdir) / "hf")
        rows = {}
        for side in ("segjax", "transformers"):
            cmd = [sys.executable, __file__, "--slide", ",".join(map(str, args.slide)), "--crop",
                   ",".join(map(str, args.crop)), "--stride", ",".join(map(str, args.stride)), "--batch",
                   str(args.batch), "--repeats", str(args.repeats), "--side", side, "--workdir", workdir]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                raise SystemExit(f"{side} failed:\n{proc.stderr[-3000:]}")
            rows[side] = json.loads(proc.stdout.strip().splitlines()[-1])
        agree = float((np.load(Path(workdir) / "segjax.npy") == np.load(Path(workdir) / "transformers.npy")).mean())
    windows = len(inference.crop_grid(*args.slide, args.crop, args.stride))
    ratio = rows["transformers"]["seconds"] / rows["segjax"]["seconds"]
    print(json.dumps({"image": args.slide, "crop": args.crop, "stride": args.stride, "windows": windows,
                      "batch": args.batch, "backend": jax.default_backend(), **rows, "pixels_agreeing": agree,
                      "time_ratio_transformers_over_segjax": ratio}, indent=2))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--slide", type=_pair, metavar="H,W", help="sliding-window evaluation of one H×W image")
    parser.add_argument("--crop", type=_pair, default=(512, 1024), metavar="H,W", help="--slide: window")
    parser.add_argument("--stride", type=_pair, default=(341, 683), metavar="H,W", help="--slide: window step")
    parser.add_argument("--side", choices=("segjax", "transformers"), help=argparse.SUPPRESS)
    parser.add_argument("--workdir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.slide:
        return slide_main(args)
    model = Mask2Former(NUM_CLASSES, **MASK2FORMER_VARIANTS["full"], rngs=nnx.Rngs(0))
    model.eval()
    images, labels = _inputs(args.batch, args.size)
    print(f"Mask2Former Swin-T, {args.batch}×{args.size}², float32, min of {args.repeats}", flush=True)
    ours = segjax_times(model, images, labels, args.repeats)
    print("  segjax: " + ", ".join(f"{k} {v * 1e3:.0f} ms" for k, v in ours.items()), flush=True)
    theirs = torch_times(model, images, labels, args.repeats)
    print(f"  (torch threads {theirs['torch_threads']}, jax {jax.default_backend()})")
    for name in ("forward", "train_step"):
        print(f"  {name:10s}  segjax {ours[name] * 1e3:8.0f} ms   transformers {theirs[name] * 1e3:8.0f} ms"
              f"   ratio {theirs[name] / ours[name]:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
