"""One convolution's forward and forward+backward, JAX (XLA:CPU) against PyTorch: a minimal
reproduction of where XLA:CPU is slower, small enough to report upstream.

python tools/repro_conv_backward.py [--repeats N] [--cases name,...]

Each case is NHWC input [N, H, W, C] and a k×k kernel to O channels (stride, dilation, groups),
loss sum(y²); times are the minimum over `repeats` calls after one warm-up. JAX's grouped case is
`lax.conv_general_dilated(feature_group_count=C)`; `depthwise_shifted` is the same convolution
as segjax runs it (segjax.ops.depthwise). XLA_FLAGS apply as usual, e.g.
XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch
from jax import lax

from segjax.ops.depthwise import depthwise_conv2d

# name: (N, H, C, O, kernel, stride, dilation, groups)
CASES = {
    "conv3x3": (4, 56, 128, 128, 3, 1, 1, 1),
    "conv3x3_c64": (4, 56, 64, 64, 3, 1, 1, 1),
    "conv1x1": (4, 56, 256, 64, 1, 1, 1, 1),
    "conv3x3_stride2": (2, 64, 256, 256, 3, 2, 1, 1),
    "conv3x3_dilated12": (2, 64, 512, 256, 3, 1, 12, 1),
    "depthwise3x3": (2, 128, 384, 384, 3, 1, 1, 384),
    "depthwise3x3_stride2": (2, 128, 384, 384, 3, 2, 1, 384),
}


def best(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def jax_case(n, h, c, o, k, s, d, g, repeats, shifted=False):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((n, h, h, c), dtype=np.float32))
    w = jnp.asarray(rng.standard_normal((k, k, c // g, o), dtype=np.float32))
    pad = d * (k // 2)

    def conv(x, w):
        if shifted:
            return depthwise_conv2d(x, w, s, d, pad)
        return lax.conv_general_dilated(x, w, (s, s), [(pad, pad)] * 2, rhs_dilation=(d, d),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=g)

    forward = jax.jit(conv)
    backward = jax.jit(jax.grad(lambda x, w: (conv(x, w) ** 2).sum(), argnums=(0, 1)))
    return (best(lambda: jax.block_until_ready(forward(x, w)), repeats),
            best(lambda: jax.block_until_ready(backward(x, w)), repeats))


def torch_case(n, h, c, o, k, s, d, g, repeats):
    x = torch.randn(n, c, h, h, requires_grad=True)
    w = torch.randn(o, c // g, k, k, requires_grad=True)

    def conv():
        return torch.nn.functional.conv2d(x, w, stride=s, padding=d * (k // 2), dilation=d, groups=g)

    def backward():
        x.grad = w.grad = None
        (conv() ** 2).sum().backward()

    with torch.no_grad():
        forward_s = best(conv, repeats)
    return forward_s, best(backward, repeats)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cases", default=",".join(CASES))
    args = parser.parse_args()
    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); seconds, min of {args.repeats}")
    print("| case | N×H×W×C -> O | jax fwd | torch fwd | jax fwd+bwd | torch fwd+bwd | bwd ratio torch/jax |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for name in args.cases.split(","):
        n, h, c, o, k, s, d, g = CASES[name]
        variants = [("", False)] + ([(" (segjax shifted)", True)] if g == c == o else [])
        for suffix, shifted in variants:
            jf, jb = jax_case(n, h, c, o, k, s, d, g, args.repeats, shifted)
            tf, tb = torch_case(n, h, c, o, k, s, d, g, args.repeats)
            print(f"| {name}{suffix} | {n}×{h}×{h}×{c} -> {o} k{k} s{s} d{d} g{g} | {jf:.4f} | {tf:.4f} | "
                  f"{jb:.4f} | {tb:.4f} | {tb / jb:.2f} |", flush=True)


if __name__ == "__main__":
    main()
