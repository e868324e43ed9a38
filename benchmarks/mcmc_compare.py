"""Compare RW, pCN and multi-agent RL proposals, single- and two-level (delayed acceptance) MCMC, on
the same multiscale Darcy posterior, plus tinyDA's delayed-acceptance sampler with pCN as an outside
reference (optional: skipped with a message if tinyDA is not importable).

Writes <out>/mcmc_compare.json, mcmc_compare.md (table of ESS per fine solve and per CPU second) and
mcmc_compare.png (and <out>/policy.pt when an RL method runs). The measured run of docs/rlmcmc.md, as
parallel processes on a shared 2-core machine, then merged (training is deterministic, so every part
trains the same policy):

    python benchmarks/mcmc_compare.py --methods rl-2 pcn-2 --samples 15000 --burn 1000 --no-tinyda --out results/mcmc/v2_a &
    python benchmarks/mcmc_compare.py --methods rw-2 --samples 15000 --burn 1000 --out results/mcmc/v2_b
    python benchmarks/mcmc_compare.py --methods rl-1 --samples 5000 --burn 500 --no-tinyda --out results/mcmc/v2_c
    python benchmarks/mcmc_compare.py --merge results/mcmc/part1 results/mcmc/v2_a results/mcmc/v2_b \
        results/mcmc/v2_c --out results/mcmc/v2
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # small dense/sparse ops: threads only add overhead

import argparse
import json
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src"))  # uninstalled checkouts

from rlmcmc.compare import METHODS, markdown_table, pilot, plot_results, run_methods, train_rl  # noqa: E402
from rlmcmc.diagnostics import ess_rhat  # noqa: E402
from rlmcmc.problem import ProblemConfig, make_problem  # noqa: E402


def run_tinyda(problem, info, n_chains, n_samples, n_burn):
    """tinyDA (Lykkegaard et al.) delayed acceptance with its CrankNicolson (pCN) proposal, same
    posterior (coarse level with the same approximation-error model), same starting points."""
    try:
        import tinyDA as tda
        from scipy import stats
    except Exception as err:  # ImportError, or a missing dependency such as ray
        print(f"tinyDA not installed ({type(err).__name__}: {err}); skipping its row")
        return None
    fine_post, coarse_post = problem.posteriors()
    dim = problem.fine.dim
    prior = stats.multivariate_normal(np.zeros(dim), np.eye(dim))
    counts = {"fine": 0}

    def fine_model(theta):
        counts["fine"] += 1
        return problem.fine.observe(np.asarray(theta, float))

    def coarse_model(theta):
        return problem.coarse.observe(np.asarray(theta, float)) + coarse_post.bias

    like_f = tda.GaussianLogLike(problem.data, np.diag(fine_post.scale**2))
    like_c = tda.GaussianLogLike(problem.data, np.diag(coarse_post.scale**2))
    posts = [tda.Posterior(prior, like_c, coarse_model), tda.Posterior(prior, like_f, fine_model)]
    proposal = tda.CrankNicolson(scaling=float(info["step"]), adaptive=False)
    np.random.seed(12345)  # tinyDA draws from NumPy's global generator
    t0 = time.process_time()
    chain = tda.sample(posts, proposal, iterations=n_samples + n_burn, n_chains=n_chains,
                       initial_parameters=list(info["inits"]), force_sequential=True)
    cpu = time.process_time() - t0
    samples = tda.get_samples(chain, burnin=n_burn)
    draws = np.stack([samples[f"chain_{i}"] for i in range(n_chains)])
    ess, rhat = ess_rhat(draws)
    frac = n_samples / (n_samples + n_burn)  # fine solves in the kept part, pro rata
    fine = counts["fine"] * frac
    return {"n_chains": n_chains, "n_draws": n_samples, "ess_min": float(ess.min()), "rhat_max": float(rhat.max()),
            "fine_solves": int(round(fine)), "coarse_solves": -1, "accept_stage1": float("nan"),
            "accept_stage2": float("nan"), "ess_per_fine_solve": float(ess.min() / fine),
            "ess_per_cpu_second": float(ess.min() / (cpu * frac)), "cpu_seconds": cpu * frac,
            "note": "fixed pCN scaling = pilot step (not tuned on its own burn-in); solves pro rata"}


def write_outputs(out, problem, results, meta, history=None):
    table = markdown_table(results)
    print(table)
    with open(os.path.join(out, "mcmc_compare.json"), "w") as fh:
        json.dump({"meta": meta, "results": results}, fh, default=float)  # compact: traces are long
    with open(os.path.join(out, "mcmc_compare.md"), "w") as fh:
        fh.write(table + "\n")
    traced = {k: v for k, v in results.items() if "trace_theta0" in v}
    if traced:
        plot_results(problem, traced, os.path.join(out, "mcmc_compare.png"), history)
    print(f"wrote {out}/mcmc_compare.{{json,md{',png' if traced else ''}}}")


def merge(dirs, out):
    """Combine runs of the same problem (e.g. one- and two-level methods run as parallel processes)."""
    results, metas = {}, []
    for d in dirs:
        with open(os.path.join(d, "mcmc_compare.json")) as fh:
            part = json.load(fh)
        metas.append(part["meta"])
        results.update(part["results"])
    if len({json.dumps(m["problem"], sort_keys=True) for m in metas}) != 1:
        raise ValueError("runs to merge must share the same problem")
    a = metas[0]["args"]
    problem = make_problem(ProblemConfig(n_fine=a["n_fine"], n_coarse=a["n_coarse"], n_basis=a["n_basis"],
                                         dim=a["dim"], noise_level=a["noise"], seed=a["seed"]))
    order = [m for m in list(METHODS) + ["tinyda-pcn-2"] if m in results]
    write_outputs(out, problem, {m: results[m] for m in order}, {"parts": metas})


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-fine", type=int, default=40)
    ap.add_argument("--n-coarse", type=int, default=8)
    ap.add_argument("--n-basis", type=int, default=4)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--noise", type=float, default=0.02)
    ap.add_argument("--chains", type=int, default=4)
    ap.add_argument("--samples", type=int, default=5000, help="kept draws per chain")
    ap.add_argument("--burn", type=int, default=500)
    ap.add_argument("--agents", type=int, default=4)
    ap.add_argument("--iters", type=int, default=200, help="RL training iterations (x64 parallel coarse chains)")
    ap.add_argument("--no-coupling", action="store_true",
                    help="block-diagonal step factor S (agents do not share exploration noise)")
    ap.add_argument("--delta-max", type=float, default=0.0,
                    help="bound of the actors' state-dependent drift in units of the step (0: no drift)")
    ap.add_argument("--reward", choices=("esjd", "min-block"), default="esjd",
                    help="RL training reward: whitened ESJD, or the smallest per-agent-block whitened ESJD")
    ap.add_argument("--methods", nargs="*", default=list(METHODS),
                    help="subset of %s (none: only the tinyDA row)" % ", ".join(METHODS))
    ap.add_argument("--no-tinyda", action="store_true")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", default="results/mcmc")
    ap.add_argument("--merge", nargs="+", metavar="DIR",
                    help="only merge mcmc_compare.json files of runs split by --methods into --out")
    args = ap.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    if args.merge:
        return merge(args.merge, args.out)
    t_start = time.perf_counter()
    problem = make_problem(ProblemConfig(n_fine=args.n_fine, n_coarse=args.n_coarse, n_basis=args.n_basis,
                                         dim=args.dim, noise_level=args.noise, seed=args.seed))
    offline = problem.calibrate_error_model(20)
    info = pilot(problem, args.chains)
    policy = history = None
    if any(m.startswith("rl") for m in args.methods):
        policy, history = train_rl(problem, info, n_agents=args.agents, n_iters=args.iters,
                                   delta_max=args.delta_max, reward=args.reward, coupled=not args.no_coupling,
                                   checkpoint=os.path.join(args.out, "policy.pt"))
        print("RL training: coarse ESJD pCN init %.4f -> trained %.4f (%.0f CPU s, %d coarse solves)" % (
            history["coarse_esjd_pcn_init"]["esjd"], history["coarse_esjd_trained"]["esjd"],
            history["cpu_seconds"], history["coarse_solves"]))
    results = run_methods(problem, info, policy, methods=args.methods, n_chains=args.chains,
                          n_samples=args.samples, n_burn=args.burn)
    if not args.no_tinyda:
        row = run_tinyda(problem, info, args.chains, args.samples, args.burn)
        if row is not None:
            results["tinyda-pcn-2"] = row
    meta = {"args": vars(args), "problem": problem.describe(), "offline_fine_solves": offline,
            "pilot_step": info["step"], "pilot_coarse_solves": info["coarse_solves"],
            "train": None if history is None else {k: history[k] for k in (
                "cpu_seconds", "coarse_solves", "coarse_esjd_pcn_init", "coarse_esjd_trained")},
            "wall_seconds": time.perf_counter() - t_start}
    write_outputs(args.out, problem, results, meta, history)
    print(f"total {meta['wall_seconds']:.0f} s")

if __name__ == "__main__":
    main()
