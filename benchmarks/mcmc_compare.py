"""Tuned baselines vs the multi-agent actor-critic (issue 14 protocol, :mod:`rlmcmc.protocol`).

Rows (each single-level "-1" and two-level "-2"): pcn, rw-cov (pilot covariance), gpcn (generalized pCN
with the pilot Gaussian), am (adaptive Metropolis, frozen after burn-in), indep (Gaussian independence
proposal fitted on the RL training's coarse budget), marl (the multi-agent actor-critic); plus a tinyDA
cross-check of pcn-2 when tinyDA imports. Every unit (setup, sweep, training, method x replicate) is cached
as JSON under <out>/<benchmark>/units/, so rerunning the same command resumes. One process, one thread.

Schedule (default): kl8 two-level rows -> kl32-channels (reduced: two-level rows only) -> kl8 single-level
rows. After each phase it writes <out>/summary.json (kl8 at top level, every benchmark under
"benchmarks"), <out>/summary.md and <out>/summary.png, and appends progress lines with an ETA to
<out>/progress.log.

    nice -n 19 python benchmarks/mcmc_compare.py --out results/mcmc      # the measured run (~70 CPU-min)
    python benchmarks/mcmc_compare.py --quick --out /tmp/mcmc_quick       # CI-sized, tiny problem (~1 min)
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # small dense/sparse ops: threads only add overhead

import argparse
import json
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))  # uninstalled checkouts

from rlmcmc.protocol import Protocol, Runner, markdown_table, plot_summary  # noqa: E402


def protocols(quick: bool) -> list[tuple[Protocol, tuple]]:
    """(protocol, levels) phases in execution order."""
    if quick:
        tiny = Protocol(benchmark="tiny", n_chains=2, n_samples=300, n_burn=100, n_replicates=2, targets=(0.1, 0.3),
                        inflations=(1.0, 1.5), sweep_chains=2, sweep_samples=200, pilot_steps=500, train_iters=30,
                        train_envs=8, n_agents=2)
        return [(tiny, (2, 1))]
    kl8 = Protocol(benchmark="kl8", n_chains=4, n_samples=3500, n_burn=500, n_replicates=5,
                   targets=(0.05, 0.1, 0.2, 0.35), sweep_chains=2, sweep_samples=1500, train_iters=400)
    kl32 = Protocol(benchmark="kl32-channels", levels=(2,), n_chains=4, n_samples=1000, n_burn=300, n_replicates=3,
                    targets=(0.1, 0.25), inflations=(1.0, 1.3), sweep_chains=2, sweep_samples=600, train_iters=300)
    return [(kl8, (2,)), (kl32, (2,)), (kl8, (1,))]


def write_summary(out: str, summaries: dict) -> None:
    main_name = "kl8" if "kl8" in summaries else next(iter(summaries))
    top = dict(summaries[main_name])
    top["benchmarks"] = summaries
    with open(os.path.join(out, "summary.json"), "w") as fh:
        json.dump(top, fh, indent=1, default=float)
    md = "\n\n".join(markdown_table(s) for s in summaries.values())
    with open(os.path.join(out, "summary.md"), "w") as fh:
        fh.write(md + "\n")
    plot_summary(list(summaries.values()), os.path.join(out, "summary.png"))
    print(md)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/mcmc")
    ap.add_argument("--quick", action="store_true", help="tiny problem, 2 replicates, short chains (CI)")
    ap.add_argument("--only", choices=("kl8", "kl32-channels"), help="run only this benchmark's phases")
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
    summaries = {}
    for protocol, levels in protocols(args.quick):
        if args.only and protocol.benchmark != args.only:
            continue
        runner = Runner(protocol, os.path.join(args.out, protocol.benchmark), log=log)
        if not args.summarize:
            runner.execute(levels)
        summary = runner.summary()
        if summary["rows"]:
            summaries[protocol.benchmark] = summary
            write_summary(args.out, summaries)
    return 0


if __name__ == "__main__":
    sys.exit(main())
