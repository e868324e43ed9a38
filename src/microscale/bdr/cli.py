"""``microscale explore``: the BDR design-space sweep from the command line (registered in microscale.cli)."""

from __future__ import annotations

import argparse
import time

__all__ = ["add_explore_arguments", "run_explore"]


def add_explore_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="small sweep and sample (well under a minute)")
    p.add_argument("--out", default="results/explore", help="output directory (default results/explore)")
    p.add_argument("--vectors", type=int, default=None, metavar="N",
                   help="Gaussian vectors of 1024 to measure QSNR on (default 32 quick, 256 full)")
    p.add_argument("--seed", type=int, default=0, help="sample seed (default 0)")


def run_explore(args) -> int:
    from .explore import PAPER_FORMATS, explore, write_report

    t0 = time.perf_counter()
    result = explore(quick=args.quick, n_vectors=args.vectors, seed=args.seed)
    paths = write_report(result, args.out)
    by_name = {p.name: p for p in result["points"]}
    for n in PAPER_FORMATS:
        p = by_name[n]
        print(f"{n}: QSNR {p.qsnr:.2f} dB, cost {p.cost:.3f}, "
              f"{'on the frontier' if p.on_frontier else f'{p.gap_db:.2f} dB below the frontier'}")
    print(f"{len(result['points'])} formats, {len(result['frontier'])} on the frontier; wrote "
          f"{', '.join(str(v) for v in paths.values())} in {time.perf_counter() - t0:.1f} s")
    return 0
