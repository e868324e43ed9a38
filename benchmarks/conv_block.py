"""Time a depthwise-separable conv block (MobileNet style): FP32 vs an MX recipe, forward+backward and
forward only.

The block: 3x3 depthwise conv (groups = channels) -> BatchNorm -> ReLU6 -> 1x1 pointwise conv ->
BatchNorm -> ReLU6, on an [N, C, H, W] feature map (default 8 x 128 x 28 x 28, a MobileNetV1/V2 middle
stage). Each row is the median and minimum wall time of ``--steps`` runs after ``--warmup``, same model,
data and thread count, the rows' runs interleaved so all see the same machine load (the machine may be
shared: compare the "min" ratios, best of N, and the load average printed); "x FP32" divides by the FP32
row of the same run (median / median and min / min).

The MX rows run ``microscale.nn.quantize_model(block, recipe)``, whose reduction blocks for the depthwise
conv are each channel's kh·kw window (the recipe semantics of a grouped convolution, see docs/nn.md), the
pointwise conv one quantized GEMM. "fused" is this version: the depthwise conv without im2col columns
(microscale.kernels.conv: windows quantized in the kernel, fused wgrad, dgrad as a transposed
convolution); "im2col (before)" the same model with ``microscale.nn.modules.fused_grouped_conv = False``:
im2col + one batched quantized GEMM over the channels, as before the fused kernels.

    python benchmarks/conv_block.py
    python benchmarks/conv_block.py --recipe mxfp8 --channels 256 --size 14
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

from microscale import nn as mnn
from microscale.nn import modules as mmod


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--recipe", default="mxfp6", help="MX recipe (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--channels", type=int, default=128, help="input channels of the block")
    p.add_argument("--out-channels", type=int, default=None, help="pointwise output channels (default: --channels)")
    p.add_argument("--size", type=int, default=28, help="feature map height = width")
    p.add_argument("--steps", type=int, default=7, help="timed runs per row")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    return p.parse_args(argv)


def block(c_in: int, c_out: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(c_in, c_in, 3, padding=1, groups=c_in, bias=False), nn.BatchNorm2d(c_in), nn.ReLU6(),
        nn.Conv2d(c_in, c_out, 1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU6())


def timed_round_robin(fns, warmup: int, steps: int) -> list[list[float]]:
    """Wall times of each of ``fns``, run in turn (so all see the same load on a shared machine), after
    ``warmup`` rounds."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for _ in range(steps):
        for fn, ts in zip(fns, times):
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
    return times


def loadavg() -> str:
    try:
        with open("/proc/loadavg") as f:
            return " ".join(f.read().split()[:3])
    except OSError:
        return "n/a"


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    c_out = args.out_channels or args.channels
    fp32 = block(args.channels, c_out).train()
    mx = mnn.quantize_model(copy.deepcopy(fp32), args.recipe)
    x = torch.randn(args.batch, args.channels, args.size, args.size)

    def fused(model, on: bool):
        def run(inner):
            def call():
                before = mmod.fused_grouped_conv
                mmod.fused_grouped_conv = on
                try:
                    inner()
                finally:
                    mmod.fused_grouped_conv = before
            return call
        return run

    def fwd_bwd(model):
        def run():
            xi = x.clone().requires_grad_()
            model(xi).sum().backward()
        return run

    def fwd(model):
        def run():
            with torch.no_grad():
                model(x)
        return run

    models = [("fp32", fp32, True), (f"{args.recipe} fused (this version)", mx, True),
              (f"{args.recipe} im2col (before)", mx, False)]
    load_before = loadavg()
    rows = []
    for label, make in (("forward+backward", fwd_bwd), ("forward only", fwd)):
        times = timed_round_robin([fused(m, on)(make(m)) for _, m, on in models], args.warmup, args.steps)
        base = (statistics.median(times[0]), min(times[0]))
        for (name, _, _), ts in zip(models, times):
            med, mn = statistics.median(ts), min(ts)
            rows.append((label, name, med, mn, med / base[0], mn / base[1]))
    print(f"depthwise-separable block: N={args.batch} C={args.channels}->{c_out} {args.size}x{args.size}, "
          f"3x3 depthwise + 1x1 pointwise + BN + ReLU6, train mode, {args.threads} thread(s), torch {torch.__version__}; "
          f"{args.steps} interleaved runs per row; loadavg {load_before} -> {loadavg()}")
    print()
    print("| pass | model | median ms | min ms | x FP32 (median) | x FP32 (min) |")
    print("|---|---|---:|---:|---:|---:|")
    for label, name, med, mn, r_med, r_min in rows:
        print(f"| {label} | {name} | {1e3 * med:.2f} | {1e3 * mn:.2f} | {r_med:.2f}x | {r_min:.2f}x |")


if __name__ == "__main__":
    main()
