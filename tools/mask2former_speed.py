"""Mask2Former (Swin-T, 19 classes) in segjax against transformers in PyTorch eager, same weights,
same images, in one run: the eval-mode forward, and the frozen fine-tuning step's forward and
backward (backbone and pixel decoder in inference mode without gradient, the transformer
decoder and class head trained with Mask2Former's loss; no optimizer update on either side).

  python tools/mask2former_speed.py [--size 384] [--batch 2] [--repeats 5]

Times are the minimum over the repeats after a warm-up (and XLA compile), float32 on both sides.
torch needs the `test` extra (transformers).
"""
import argparse
import sys
import tempfile
import time
import types

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from segjax.bridge.hf_mask2former import save_hf_mask2former
from segjax.engine import steps as steps_lib
from segjax.losses import Mask2FormerLoss, semantic_targets
from segjax.models.layers import imagenet_normalize
from segjax.models.mask2former import MASK2FORMER_VARIANTS, Mask2Former

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


def torch_times(model: Mask2Former, images, labels, repeats: int) -> dict:
    sys.modules.setdefault("torchvision._meta_registrations",
                           types.ModuleType("torchvision._meta_registrations"))
    import torch
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
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
