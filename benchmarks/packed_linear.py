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
    python benchmarks/packed_linear.py --overhead      # per-call cost of small packed layers, 1 thread
    python benchmarks/packed_linear.py --x-dtype bfloat16 --threads 1 --clock cpu   # bf16 x vs BF16 F.linear

``--overhead`` times single calls at batch 1 on one thread (512x512 and 4096x4096 by default): the
dense ``F.linear``, ``F.linear`` on a ``PackedWeight`` (what a packed nn.Linear runs), ``ms.packed_linear``
on the MXTensor, and the fused GEMV kernel alone (its C entry point on pre-checked addresses), each as
microseconds per call of thread CPU time (immune to the time the thread spends descheduled on a shared
machine) and of wall time, best of ``--repeat`` interleaved rounds.
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


def per_call_us(fns: dict, calls: int, repeat: int) -> dict:
    """Best (over ``repeat`` interleaved rounds) per-call thread CPU time and wall time in µs of each
    callable, each round ``calls`` back-to-back calls."""
    for fn in fns.values():
        for _ in range(min(calls, 20)):
            fn()
    best = {name: [float("inf"), float("inf")] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            c0, t0 = time.thread_time(), time.perf_counter()
            for _ in range(calls):
                fn()
            c1, t1 = time.thread_time(), time.perf_counter()
            best[name][0] = min(best[name][0], (c1 - c0) / calls * 1e6)
            best[name][1] = min(best[name][1], (t1 - t0) / calls * 1e6)
    return best


def overhead(args) -> None:
    """Per-call cost of packed layers at batch 1 on one thread (see the module docstring)."""
    from microscale.nn.packed import PackedWeight
    torch.set_num_threads(1)
    lib = kernels._load()
    load = os.getloadavg()[0]
    print(f"# per-call overhead, batch 1, 1 thread, load average {load:.1f}; us per call: thread CPU time / wall")
    header = "| shape | format | F.linear | packed F.linear | ms.packed_linear | kernel alone | packed / F.linear |"
    lines = [header, "|" + "---|" * 7]
    print(header)
    print(lines[1])
    rows_out = []
    for shape in args.shapes:
        n_out, k_in = (int(v) for v in shape.lower().split("x"))
        g = torch.Generator().manual_seed(0)
        w = torch.randn(n_out, k_in, generator=g) * 0.02
        x, b = torch.randn(1, k_in, generator=g), torch.randn(n_out, generator=g)
        calls = max(5, int(2e8 // (n_out * k_in * 4 + 1e6)))
        for fmt in args.formats:
            pw = PackedWeight.from_dense(w, fmt)
            q = pw.mx
            plan = kernels.linear_plan(q)
            y = torch.empty(1, n_out)
            fns = {"dense": lambda: F.linear(x, w, b), "packed": lambda: F.linear(x, pw, b),
                   "verb": lambda: ms.packed_linear(x, q, b)}
            if plan is not None:
                fns["kernel"] = lambda: lib.gemm_gemv(x.data_ptr(), 1, plan.p_codes, plan.p_scales, n_out, plan.nb,
                                                      plan.k, plan.bits, plan.mode, *plan.p_tables, b.data_ptr(),
                                                      y.data_ptr(), 1)
            with torch.inference_mode():
                best = per_call_us(fns, calls, args.repeat)
            cell = {k: f"{v[0]:.1f} / {v[1]:.1f}" for k, v in best.items()}
            line = (f"| {shape} | {fmt} | {cell['dense']} | {cell['packed']} | {cell['verb']} | "
                    f"{cell.get('kernel', '-')} | {best['packed'][0] / best['dense'][0]:.2f}x |")
            lines.append(line)
            print(line, flush=True)
            rows_out.append({"shape": shape, "format": fmt, **{f"{k}_cpu_us": v[0] for k, v in best.items()},
                             **{f"{k}_wall_us": v[1] for k, v in best.items()}})
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out + "_overhead.json", "w") as f:
            json.dump({"threads": 1, "load_average": load, "torch": torch.__version__, "rows": rows_out}, f, indent=1)
        with open(args.out + "_overhead.md", "w") as f:
            f.write(f"Per-call cost of a packed layer at batch 1, 1 thread, best of {args.repeat} interleaved rounds, "
                    f"load average {load:.1f}; µs per call as thread CPU time / wall time. Regenerate: "
                    "`python benchmarks/packed_linear.py --overhead`.\n\n")
            f.write("\n".join(lines) + "\n")


def copy_bandwidth(nbytes: int, repeat: int, clock=time.perf_counter) -> float:
    """Bytes read + written per second (by ``clock``) by an fp32 ``dst.copy_(src)`` of ``nbytes``."""
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
    ap.add_argument("--quick", action="store_true", help="4096x4096, rows 1 and 128, 3 repeats")
    ap.add_argument("--x-dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of x for the packed calls (bfloat16: the bf16 GEMM path above 8 rows; compare "
                         "with the BF16 column) (default: %(default)s)")
    ap.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                    help="wall time, or the calling thread's CPU time (with --threads 1 only: every candidate then "
                         "runs on the calling thread, so time spent descheduled on a loaded machine is not counted) "
                         "(default: %(default)s)")
    ap.add_argument("--overhead", action="store_true",
                    help="per-call cost at batch 1 on 1 thread (default shapes 512x512 4096x4096, format mxfp4)")
    ap.add_argument("--out", default="results/bench/packed_linear",
                    help="write OUT.json and OUT.md (default: %(default)s; '' to skip)")
    args = ap.parse_args(argv)
    if args.quick:
        args.shapes, args.rows, args.repeat = ["4096x4096"], [1, 128], 3
    if args.overhead:
        if args.shapes == ap.get_default("shapes"):
            args.shapes = ["512x512", "4096x4096"]
        if args.formats == FORMATS:
            args.formats = ["mxfp4_e2m1"]
        overhead(args)
        return
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    if args.clock == "cpu" and threads != 1:
        ap.error(f"--clock cpu needs --threads 1 (other threads' CPU time is not the wall time), got {threads}")
    clock = time.thread_time if args.clock == "cpu" else time.perf_counter
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    info = kernels.info() if kernels.available() else None
    print(f"# torch {torch.__version__}, {threads} threads, kernels ISA "
          f"{info and kernels._load().gemm_info()['isa']}, load average {load:.1f} on {os.cpu_count()} CPUs, "
          f"{args.clock} time, packed x {args.x_dtype}")
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
                fns[fmt] = (lambda q=q: ms.packed_linear(xb if args.x_dtype == "bfloat16" else x, q))
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
            json.dump({"threads": threads, "clock": args.clock, "x_dtype": args.x_dtype, "load_average": load,
                       "torch": torch.__version__, "rows": rows_out}, f,
                      indent=1)
        with open(args.out + ".md", "w") as f:
            f.write(f"Fused packed linear (x {args.x_dtype}) vs F.linear; {threads} threads, {args.clock} time, "
                    f"best of {args.repeat} interleaved, load average {load:.1f}. Regenerate: "
                    f"`python benchmarks/packed_linear.py{''.join(' ' + a for a in (sys.argv[1:] if argv is None else argv))}`.\n\n")
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
