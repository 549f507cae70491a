"""Time and size the two forms of multi-scale deformable attention (segjax.ops.ms_deform_attn)
at the shapes of Mask2Former's Swin-T pixel decoder: 8 heads × 32, 3 levels (1/32, 1/16, 1/8 of
the input) × 4 points, every token a query.

  python tools/msda_benchmark.py [--sizes 384 768] [--batch 2] [--repeats 5] [--max_gb 4]

Per form and input size: forward, and forward + backward (gradients of values, locations and
weights), the minimum wall time over the repeats, and XLA's temporary buffer size of the
compiled program. A program whose temporaries exceed --max_gb is sized but not run.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from segjax.ops.ms_deform_attn import METHODS, ms_deform_attn

HEADS, HEAD_DIM, POINTS = 8, 32, 4


def _inputs(size: int, batch: int):
    shapes = [(size // s, size // s) for s in (32, 16, 8)]
    total = sum(h * w for h, w in shapes)
    rng = np.random.default_rng(0)
    value = jnp.asarray(rng.normal(size=(batch, total, HEADS, HEAD_DIM)), jnp.float32)
    locations = jnp.asarray(rng.uniform(size=(batch, total, HEADS, 3, POINTS, 2)), jnp.float32)
    weights = jnp.asarray(rng.uniform(size=(batch, total, HEADS, 3, POINTS)), jnp.float32)
    return shapes, (value, locations, weights)


def _min_time(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile and warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return min(times)


def measure(size: int, batch: int, repeats: int, max_gb: float) -> list[dict]:
    shapes, args = _inputs(size, batch)
    rows = []
    for method in METHODS:
        def forward(v, loc, w, method=method):
            return ms_deform_attn(v, shapes, loc, w, method=method)

        def backward(v, loc, w, forward=forward):
            return jax.grad(lambda *a: jnp.sum(forward(*a) ** 2), argnums=(0, 1, 2))(v, loc, w)

        for name, fn in (("forward", forward), ("forward+backward", backward)):
            compiled = jax.jit(fn).lower(*args).compile()
            temp_gb = compiled.memory_analysis().temp_size_in_bytes / 2**30
            seconds = _min_time(compiled, args, repeats) if temp_gb <= max_gb else None
            rows.append(dict(size=size, method=method, pass_=name, seconds=seconds, temp_gb=temp_gb))
            shown = "not run" if seconds is None else f"{seconds * 1e3:9.1f} ms"
            print(f"{size:4d}²  {method:6s}  {name:16s}  {shown:>12s}  temp {temp_gb:7.2f} GiB",
                  flush=True)
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[384, 768])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--max_gb", type=float, default=4.0)
    args = parser.parse_args(argv)
    print(f"backend {jax.default_backend()}, batch {args.batch}, min of {args.repeats}")
    for size in args.sizes:
        measure(size, args.batch, args.repeats, args.max_gb)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
