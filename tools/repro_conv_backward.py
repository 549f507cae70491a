"""One convolution's forward and forward+backward, JAX (XLA:CPU) against PyTorch: a minimal
reproduction of where XLA:CPU is slower, small enough to report upstream.

python tools/repro_conv_backward.py [--repeats N] [--cases name,...]

Each case is NHWC input [N, H, W, C] and a k×k kernel to O channels (stride, dilation, groups),
loss sum(y²); times are the minimum over `repeats` calls after one warm-up. GFLOP: the analytic
forward count 2·N·H'·W'·K·K·(C/G)·O, and XLA's counts of the forward and forward+backward programs
(against_torch.step_flops: padding taps left out; the `lax` convolution's for every variant),
which give both frameworks' GFLOP/s, with their
share of the CPU's fp32 peak (machine_peak.py) in brackets. JAX's grouped case is
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
from against_torch import step_flops  # tools/ is on sys.path: this file runs as a script
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
            best(lambda: jax.block_until_ready(backward(x, w)), repeats),
            step_flops(forward, x, w), step_flops(backward, x, w))


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
    from machine_peak import machine_peak  # tools/ is on sys.path: this file runs as a script

    peak = machine_peak()
    print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
          f"({torch.get_num_threads()} threads); seconds, min of {args.repeats}; GFLOP/s (% of the fp32 "
          f"peak: {peak['gflops'] or 0:.1f} GFLOP/s = {peak['source']})")
    print("| case | N×H×W×C -> O | analytic fwd GFLOP | XLA fwd GFLOP | jax fwd | torch fwd | jax fwd GFLOP/s | "
          "torch fwd GFLOP/s | XLA fwd+bwd GFLOP | jax fwd+bwd | torch fwd+bwd | jax fwd+bwd GFLOP/s | "
          "torch fwd+bwd GFLOP/s | bwd ratio torch/jax |")
    print("|---|---|" + "---:|" * 12)

    def rate(flops, seconds):
        gflops = flops / seconds / 1e9
        return f"{gflops:.1f}" + (f" ({gflops / peak['gflops']:.0%})" if peak["gflops"] else "")

    for name in args.cases.split(","):
        n, h, c, o, k, s, d, g = CASES[name]
        out = -(-h // s)  # "same" padding: ceil(H / stride) per side
        analytic = 2 * n * out * out * k * k * (c // g) * o
        variants = [("", False)] + ([(" (segjax shifted)", True)] if g == c == o else [])
        conv_flops = None  # the plain convolution's counts, for each variant: one arithmetic
        for suffix, shifted in variants:
            jf, jb, *flops = jax_case(n, h, c, o, k, s, d, g, args.repeats, shifted)
            ff, fb = conv_flops = conv_flops or flops
            tf, tb = torch_case(n, h, c, o, k, s, d, g, args.repeats)
            print(f"| {name}{suffix} | {n}×{h}×{h}×{c} -> {o} k{k} s{s} d{d} g{g} | {analytic / 1e9:.3f} | "
                  f"{ff / 1e9:.3f} | {jf:.4f} | {tf:.4f} | {rate(ff, jf)} | {rate(ff, tf)} | {fb / 1e9:.3f} | "
                  f"{jb:.4f} | {tb:.4f} | {rate(fb, jb)} | {rate(fb, tb)} | {tb / jb:.2f} |", flush=True)


if __name__ == "__main__":
    main()
