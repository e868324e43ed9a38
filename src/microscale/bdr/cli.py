"""``microscale explore``: the BDR design-space sweep from the command line (registered in microscale.cli)."""

from __future__ import annotations

import argparse
import time

__all__ = ["add_explore_arguments", "run_explore"]


def add_explore_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sweep and sample (well under a minute)")
    p.add_argument("--out", default="results/explore", help="output directory (default results/explore)")
    p.add_argument("--vectors", type=int, default=None, metavar="N",
                   help="vectors of 1024 to measure QSNR on (default 32 quick, 256 full)")
    p.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")
    p.add_argument("--data", default="gaussian", metavar="NAME",
                   help="vectors to measure QSNR on: gaussian (the paper's setting, default), laplace, student_t, "
                        "or weights / activations / gradients / tensors captured from a GPT trained here")
    for key, what in (("m", "magnitude bits of sign + m elements"), ("k1", "block sizes"),
                      ("d1", "shared-exponent bits"), ("k2", "sub-block sizes"), ("d2", "microexponent bits")):
        p.add_argument(f"--{key}", type=int, nargs="+", default=None, metavar="N",
                       help=f"sweep these {what} instead of the default range")
    p.add_argument("--fp", nargs="+", default=None, metavar="ELEM",
                   help="small-float elements to sweep (e2m1 e2m3 e3m2 e4m3 e5m2)")


def run_explore(args) -> int:
    from .explore import PAPER_FORMATS, explore, write_report

    t0 = time.perf_counter()
    ranges = {k: getattr(args, k) for k in ("m", "k1", "d1", "k2", "d2", "fp")}
    result = explore(quick=args.quick, n_vectors=args.vectors, seed=args.seed, data=args.data, ranges=ranges)
    paths = write_report(result, args.out)
    by_name = {p.name: p for p in result["points"]}
    for n in PAPER_FORMATS:
        p = by_name[n]
        if p.on_frontier:
            where = "on the frontier"
        else:
            best = max((f for f in result["frontier"] if f.cost <= p.cost), key=lambda f: f.qsnr)
            where = (f"{p.gap_db:.2f} dB below the frontier ({best.name}: {best.qsnr:.2f} dB at cost "
                     f"{best.cost:.3f})")
        print(f"{n}: QSNR {p.qsnr:.2f} dB, cost {p.cost:.3f}, {where}")
    print(f"{len(result['points'])} formats, {len(result['frontier'])} on the frontier; wrote "
          f"{', '.join(str(v) for v in paths.values())} in {time.perf_counter() - t0:.1f} s")
    return 0
