"""Cross-check of the pcn-2 row against tinyDA (Lykkegaard et al., tinyDA: delayed-acceptance MCMC).

tinyDA's two-level delayed acceptance with subchain length 1 and a pCN proposal is the same algorithm as
our pcn-2 row (Christen & Fox 2005 two-stage acceptance, pCN of Cotter et al. 2013), so on the same
posteriors, with the same fixed β and the same starting points, both must show the same stage-1 and
stage-2 acceptance rates (binomial standard errors) and posterior means within Monte-Carlo error. This
is a check of our sampler, not a competitor row.

tinyDA pins numpy<2, so this script runs in its own virtual environment, never the project's:

    python3.11 -m venv .venv-tinyda && .venv-tinyda/bin/pip install tinyda   # torch- and ray-free
    nice -n 19 .venv-tinyda/bin/python benchmarks/mcmc_tinyda_check.py --out results/mcmc

It reads the kl8 setup (error model, starting points) and the tuned pcn-2 β from <out>/kl8/units, runs
``--chains`` x ``--steps`` with each implementation and writes <out>/tinyda_check.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

import argparse
import json
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))

from rlmcmc.diagnostics import ess_rhat  # noqa: E402
from rlmcmc.problem import ProblemConfig, make_problem  # noqa: E402
from rlmcmc.proposals import PCNProposal  # noqa: E402
from rlmcmc.sampling import run_chain  # noqa: E402


def tinyda_chain(problem, beta, theta0, steps, seed):
    """One tinyDA delayed-acceptance chain (subchain length 1, pCN β); returns draws, stage-1 and stage-2
    acceptance rates."""
    import scipy.stats as stats
    import tinyDA as tda
    from tinyDA.chain import DAChain

    d = problem.fine.dim
    prior = stats.multivariate_normal(np.zeros(d), np.eye(d))
    sigma2 = problem.noise_std**2
    fine_like = tda.DiagonalGaussianLogLike(problem.data, sigma2 * np.eye(problem.data.size))
    coarse_like = tda.DiagonalGaussianLogLike(problem.data, np.diag(sigma2 + problem.error_var))
    fine_post = tda.Posterior(prior, fine_like, problem.fine.observe)
    bias = problem.error_bias
    coarse_post = tda.Posterior(prior, coarse_like, lambda t: problem.coarse.observe(t) + bias)
    np.random.seed(seed)
    chain = DAChain(coarse_post, fine_post, tda.CrankNicolson(scaling=beta), subchain_length=1,
                    initial_parameters=np.asarray(theta0, float))
    chain.sample(steps, progressbar=False)
    draws = np.array([link.parameters for link in chain.chain_fine[1:]])
    tried = len(chain.promoted_coarse)
    accepted = int(np.sum(chain.accepted_fine[1:]))
    return draws, tried / steps, accepted / max(tried, 1)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="results/mcmc")
    ap.add_argument("--chains", type=int, default=2)
    ap.add_argument("--steps", type=int, default=2500)
    args = ap.parse_args(argv)
    import tinyDA

    units = os.path.join(args.out, "kl8", "units")
    with open(os.path.join(units, "setup.json")) as fh:
        setup = json.load(fh)
    with open(os.path.join(units, "run", "pcn-2", "rep0.json")) as fh:
        beta = float(np.median(json.load(fh)["steps"]))
    fields = ProblemConfig.__dataclass_fields__
    problem = make_problem(ProblemConfig(**{k: v for k, v in setup["problem"].items() if k in fields}))
    problem.error_bias, problem.error_var = np.array(setup["error_bias"]), np.array(setup["error_var"])
    inits = np.array(setup["inits"])
    res = {}
    for impl in ("rlmcmc", "tinyDA"):
        t0 = time.process_time()
        draws, acc1, acc2 = [], [], []
        for c in range(args.chains):
            if impl == "tinyDA":
                x, a1, a2 = tinyda_chain(problem, beta, inits[c], args.steps, seed=300 + c)
            else:
                fine, coarse = problem.posteriors()
                r = run_chain(fine, PCNProposal(fine.dim, beta), inits[c], args.steps,
                              np.random.default_rng(300 + c), coarse=coarse)
                x, a1, a2 = r.samples, r.accept_stage1, r.accept_stage2
            draws.append(x)
            acc1.append(a1)
            acc2.append(a2)
        draws = np.stack(draws)
        ess, rhat = ess_rhat(draws)
        flat = draws.reshape(-1, draws.shape[-1])
        res[impl] = {"accept_stage1": float(np.mean(acc1)), "accept_stage2": float(np.nanmean(acc2)),
                     "mean": flat.mean(0).tolist(), "mcse": (flat.std(0) / np.sqrt(ess)).tolist(),
                     "ess_min": float(ess.min()), "max_rhat": float(rhat.max()), "cpu_s": time.process_time() - t0}
    a, b = res["rlmcmc"], res["tinyDA"]
    n1 = args.chains * args.steps
    se1 = np.sqrt(a["accept_stage1"] * (1 - a["accept_stage1"]) / n1 * 2)
    z_mean = (np.array(a["mean"]) - np.array(b["mean"])) / np.hypot(a["mcse"], b["mcse"])
    out = {"tinyDA_version": getattr(tinyDA, "__version__", "unknown"), "beta": beta, "chains": args.chains,
           "steps": args.steps, "results": res, "stage1_diff_over_se": (a["accept_stage1"] - b["accept_stage1"]) / se1,
           "max_abs_mean_z": float(np.abs(z_mean).max())}
    with open(os.path.join(args.out, "tinyda_check.json"), "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"pcn-2 cross-check, β = {beta:.4f}, {args.chains} chains x {args.steps} steps each")
    print("| implementation | acc. stage 1 | acc. stage 2 | min ESS | max R-hat | CPU s |")
    print("|---|---|---|---|---|---|")
    for k, r in res.items():
        print(f"| {k} | {r['accept_stage1']:.3f} | {r['accept_stage2']:.3f} | {r['ess_min']:.0f} | {r['max_rhat']:.3f} | "
              f"{r['cpu_s']:.0f} |")
    print(f"stage-1 difference / its standard error: {out['stage1_diff_over_se']:.2f}; "
          f"largest |posterior-mean difference| / MCSE: {out['max_abs_mean_z']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
