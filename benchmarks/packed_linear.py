"""Speed of the fused packed-weight linear (``ms.packed_linear``) against FP32 and BF16 ``F.linear``.

For each weight shape [out, K], number of rows of x and MX format, prints the best-of-N time of
``ms.packed_linear(x, Wq)`` (x fp32), of ``F.linear(x, W)`` in FP32 and of ``F.linear`` in BF16 (x and W
bf16), their ratios, and the effective bandwidth on the packed weight bytes (codes + scales) beside the
bandwidth of a plain fp32 ``dst.copy_(src)`` of the FP32 weight measured in the same run (bytes read +
written per second). All candidates of one (shape, rows) cell run interleaved, round-robin, so machine
noise hits them alike; each keeps its best time.

    python benchmarks/packed_linear.py                 # 16384x4096, 4096x4096, 4096x1024; rows 1..512
    python benchmarks/packed_linear.py --quick         # one shape, rows 1 and 128, few repeats
    python benchmarks/packed_linear.py --shapes 16384x4096 --rows 1 128 --repeat 15
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

import microscale as ms
from microscale import kernels

FORMATS = ["mxfp4_e2m1", "mxfp6_e3m2", "mxfp6_e2m3", "mxfp8_e4m3", "mxfp8_e5m2", "mxint8"]


def interleaved_best(fns: dict, repeat: int, clock=time.perf_counter) -> dict:
    """Best time of each callable by ``clock`` (wall time by default), the callables run round-robin
    ``repeat`` times (after one warm-up)."""
    for fn in fns.values():
        fn()
    best = {name: float("inf") for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = clock()
            fn()
            best[name] = min(best[name], clock() - t0)
    return best


def copy_bandwidth(nbytes: int, repeat: int, clock=time.perf_counter) -> float:
    """Bytes read + written per second by an fp32 ``dst.copy_(src)`` of ``nbytes``."""
    src = torch.rand(nbytes // 4)
    dst = torch.empty_like(src)
    t = interleaved_best({"copy": lambda: dst.copy_(src)}, repeat, clock)["copy"]
    return 2 * nbytes / t


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=["16384x4096", "4096x4096", "4096x1024"],
                    help="weight shapes OUTxK (default: %(default)s)")
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 32, 128, 512],
                    help="rows of x (default: %(default)s)")
    ap.add_argument("--formats", nargs="+", default=FORMATS, help="MX formats (default: all covered ones)")
    ap.add_argument("--repeat", type=int, default=9, help="interleaved repetitions, best kept (default: 9)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's); 1 avoids OpenMP team hand-offs, which cost "
                         "milliseconds each on an oversubscribed machine")
    ap.add_argument("--cpu-time", action="store_true",
                    help="time by the calling thread's CPU time instead of wall time (with --threads 1 only: every "
                         "candidate then runs on the calling thread, so time spent descheduled on a loaded machine "
                         "is not counted)")
    ap.add_argument("--quick", action="store_true", help="4096x4096, rows 1 and 128, 3 repeats")
    ap.add_argument("--out", default="results/bench/packed_linear",
                    help="write OUT.json and OUT.md (default: %(default)s; '' to skip)")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.rows, args.repeat = ["4096x4096"], [1, 128], 3
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.cpu_time and threads != 1:
        ap.error(f"--cpu-time needs --threads 1 (other threads' CPU time is not the wall time), got {threads}")
    clock = time.thread_time if args.cpu_time else time.perf_counter
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    info = kernels.info() if kernels.available() else None
    print(f"# torch {torch.__version__}, {threads} threads, kernels ISA "
          f"{info and kernels._load().gemm_info()['isa']}, load average {load:.1f} on {os.cpu_count()} CPUs")
    rows_out = []
    header = ("| shape | rows | format | packed ms | FP32 ms | BF16 ms | vs FP32 | vs BF16 | weight GB/s | "
              "% of copy |")
    lines = [header, "|" + "---|" * 10]
    print(header)
    print(lines[1])
    for shape in args.shapes:
        n_out, k_in = (int(v) for v in shape.lower().split("x"))
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n_out, k_in, generator=g) * 0.02
        wb = w.bfloat16()
        copy_bw = copy_bandwidth(w.numel() * 4, args.repeat, clock)
        print(f"# {shape}: fp32 copy {copy_bw / 1e9:.2f} GB/s (read + write)")
        packed = {fmt: ms.quantize(w, fmt, axis=1) for fmt in args.formats}
        for m in args.rows:
            x = torch.randn(m, k_in, generator=g)
            xb = x.bfloat16()
            fns = {"fp32": lambda: F.linear(x, w), "bf16": lambda: F.linear(xb, wb)}
            for fmt, q in packed.items():
                fns[fmt] = (lambda q=q: ms.packed_linear(x, q))
            best = interleaved_best(fns, args.repeat, clock)
            for fmt, q in packed.items():
                t = best[fmt]
                gbs = q.nbytes / t
                rec = {"shape": shape, "rows": m, "format": fmt, "ms": t * 1e3, "fp32_ms": best["fp32"] * 1e3,
                       "bf16_ms": best["bf16"] * 1e3, "speedup_fp32": best["fp32"] / t,
                       "speedup_bf16": best["bf16"] / t, "weight_gbs": gbs / 1e9,
                       "copy_gbs": copy_bw / 1e9, "frac_copy": gbs / copy_bw, "threads": threads}
                rows_out.append(rec)
                line = (f"| {shape} | {m} | {fmt} | {t * 1e3:.3f} | {best['fp32'] * 1e3:.3f} | "
                        f"{best['bf16'] * 1e3:.3f} | {best['fp32'] / t:.2f}x | {best['bf16'] / t:.2f}x | "
                        f"{gbs / 1e9:.2f} | {100 * gbs / copy_bw:.0f}% |")
                lines.append(line)
                print(line, flush=True)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + ".json", "w") as f:
            json.dump({"threads": threads, "load_average": load, "cpu_time": args.cpu_time, "torch": torch.__version__,
                       "rows": rows_out}, f,
                      indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(f"Fused packed linear vs F.linear; {threads} threads, best of {args.repeat} interleaved"
                    f"{' (thread CPU time)' if args.cpu_time else ''}, load average {load:.1f}. Regenerate: "
                    f"`python benchmarks/packed_linear.py{''.join(' ' + a for a in (sys.argv[1:] if argv is None else argv))}`.\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
