"""Tuned baselines vs the multi-agent actor-critic (issue 14 protocol, :mod:`rlmcmc.protocol`).

Rows (each single-level "-1" and two-level "-2"): pcn, rw-cov (pilot covariance), gpcn (generalized pCN
with the pilot Gaussian), am (adaptive Metropolis, frozen after burn-in), indep (Gaussian independence
proposal fitted on the RL training's coarse budget), marl (the multi-agent actor-critic); on every benchmark also the
two-level rows with the enhanced-error coarse model (pilot pairs, full covariance; rlmcmc.aem): gpcn+aem and
marl-gpcn+aem (the actor-critic on gpcn+aem's geometry). The tinyDA cross-check of pcn-2 is a separate
script (benchmarks/mcmc_tinyda_check.py, own venv); its JSON is added to the summary when present. Every unit (setup, sweep, training, method x replicate) is cached
as JSON under <out>/<benchmark>/units/, so rerunning the same command resumes. One process, one thread.

Schedule (default): kl8 two-level rows -> kl32-channels (two-level rows only) -> kl8 single-level rows ->
kl8-transient (every row, reduced size); --only BENCHMARK runs one of them (one process per benchmark may
run at the same time: each writes its own units). After each phase it writes <out>/summary.json (kl8 at top level, every benchmark under
"benchmarks", from every benchmark's cached units), <out>/summary.md and <out>/summary.png, and appends progress lines with an ETA to
<out>/progress.log.

    nice -n 19 python benchmarks/mcmc_compare.py --out results/mcmc      # the measured run (~3 CPU-h from scratch)
    python benchmarks/mcmc_compare.py --quick --out /tmp/mcmc_quick       # CI-sized, tiny steady + transient (~1 CPU-min)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # small dense/sparse ops: threads only add overhead

import argparse
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))  # uninstalled checkouts

from rlmcmc.protocol import run_comparison  # noqa: E402


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/mcmc")
    ap.add_argument("--quick", action="store_true", help="tiny problem, 2 replicates, short chains (CI)")
    ap.add_argument("--only", choices=("kl8", "kl32-channels", "kl8-transient"), help="run only this benchmark's phases")
    ap.add_argument("--summarize", action="store_true", help="only summarize the cached units")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    log_path = os.path.join(args.out, "progress.log")

    def log(line):
        stamped = f"{time.strftime('%H:%M:%S')} {line}"
        print(stamped, flush=True)
        with open(log_path, "a") as fh:
            fh.write(stamped + "\n")

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    run_comparison(args.out, quick=args.quick, only=args.only, summarize_only=args.summarize, log=log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
