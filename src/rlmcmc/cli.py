"""``rlmcmc`` command line: forward | train | sample | compare (the issue-14 protocol). Thin: parse, call the library, write
JSON + PNG under --out. Method: Chung et al., *Multi-agent reinforcement learning accelerated MCMC on
multiscale inversion problems* (see docs/rlmcmc.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np


def _problem_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--n-fine", type=int, default=40, help="fine grid cells per side (inference)")
    p.add_argument("--n-coarse", type=int, default=8, help="GMsFEM coarse cells per side")
    p.add_argument("--n-basis", type=int, default=4, help="GMsFEM basis functions per neighborhood")
    p.add_argument("--dim", type=int, default=8, help="number of KL modes (unknowns)")
    p.add_argument("--kind", choices=("steady", "transient"), default="steady")
    p.add_argument("--noise", type=float, default=0.02, help="relative noise level")
    p.add_argument("--seed", type=int, default=1, help="seed of the synthetic truth and noise")
    p.add_argument("--out", default="results/rlmcmc", help="output folder")
    p.add_argument("--pilot-steps", type=int, default=4000, help="coarse pCN pilot: burn-in and kept steps")


def _build(args):
    from .problem import ProblemConfig, make_problem

    problem = make_problem(ProblemConfig(n_fine=args.n_fine, n_coarse=args.n_coarse, n_basis=args.n_basis,
                                         dim=args.dim, kind=args.kind, noise_level=args.noise, seed=args.seed))
    offline = problem.calibrate_error_model(20)
    return problem, offline


def _dump(obj, path):
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1, default=float)
    print(f"wrote {path}")


def cmd_forward(args) -> dict:
    """Timing (CPU seconds per solve) and accuracy of fine vs GMsFEM solves on prior samples, for
    several basis sizes."""
    from .forward import DarcyProblem, PermeabilityModel, observation_points
    from .gmsfem import GMsFEMProblem

    rng = np.random.default_rng(args.seed)
    thetas = rng.standard_normal((args.samples, args.dim))
    field = PermeabilityModel(dim=args.dim)
    report = {"n_fine": args.n_fine, "n_coarse": args.n_coarse, "samples": args.samples, "rows": []}
    for kind in ("steady", "transient"):
        fine = DarcyProblem(args.n_fine, field, observation_points(5), kind=kind)
        t0 = time.process_time()
        refs = [np.atleast_2d(fine.solve(t)) for t in thetas]
        t_fine = (time.process_time() - t0) / len(thetas)
        mass = fine.mesh.mass
        for n_basis in args.basis:
            t0 = time.process_time()
            coarse = GMsFEMProblem(fine, args.n_coarse, n_basis)
            t_off = time.process_time() - t0
            t0 = time.process_time()
            coefs = [coarse.solve_coarse(t) for t in thetas]
            t_coarse = (time.process_time() - t0) / len(thetas)
            errs = []
            for ref, c in zip(refs, coefs):
                e = np.atleast_2d(c) @ coarse.prolong.T - ref
                errs.append(np.sqrt(sum(x @ (mass @ x) for x in e) / sum(x @ (mass @ x) for x in ref)))
            row = {"kind": kind, "n_basis": n_basis, "coarse_dofs": coarse.n_dof, "offline_s": t_off,
                   "fine_solve_s": t_fine, "coarse_solve_s": t_coarse, "speedup": t_fine / t_coarse,
                   "rel_l2_error_mean": float(np.mean(errs)), "rel_l2_error_max": float(np.max(errs))}
            report["rows"].append(row)
            print(f"{kind:9s} basis={n_basis} dofs={coarse.n_dof:4d} fine={t_fine * 1e3:7.2f} ms "
                  f"coarse={t_coarse * 1e3:6.2f} ms speedup={row['speedup']:6.1f}x "
                  f"relL2={row['rel_l2_error_mean']:.4f}")
    _dump(report, os.path.join(args.out, "forward.json"))
    return report


def cmd_train(args):
    from .compare import pilot, train_rl

    problem, _ = _build(args)
    info = pilot(problem, args.chains, n_steps=args.pilot_steps)
    ckpt = os.path.join(args.out, "policy.pt")
    _, history = train_rl(problem, info, n_agents=args.agents, n_iters=args.iters,
                          delta_max=args.delta_max, reward=args.reward, coupled=not args.no_coupling,
                          checkpoint=ckpt)
    print(f"wrote {ckpt}")
    _dump({"problem": problem.describe(), "pilot_step": info["step"], "history": history},
          os.path.join(args.out, "train.json"))


def cmd_sample(args):
    from .compare import pilot, plot_results, run_methods
    from .rl import load_policy

    problem, _ = _build(args)
    info = pilot(problem, args.chains, n_steps=args.pilot_steps)
    policy = load_policy(args.policy) if args.proposal == "rl" else None
    method = f"{args.proposal}-{args.levels}"
    results = run_methods(problem, info, policy, methods=(method,), n_chains=args.chains,
                          n_samples=args.samples, n_burn=args.burn)
    s = results[method]
    print(f"{method}: min ESS {s['ess_min']:.1f}, R-hat {s['rhat_max']:.3f}, fine solves {s['fine_solves']}, "
          f"ESS/fine solve {s['ess_per_fine_solve']:.4f}")
    _dump({"problem": problem.describe(), "results": results}, os.path.join(args.out, f"sample_{method}.json"))
    plot_results(problem, results, os.path.join(args.out, f"sample_{method}.png"))


def cmd_compare(args):
    """The issue-14 protocol (rlmcmc.protocol): tuned baselines vs the multi-agent actor-critic, replicates,
    bootstrap CIs; resumable (cached units under --out)."""
    from .protocol import run_comparison

    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:  # pragma: no cover
        pass
    run_comparison(args.out, quick=args.quick, only=args.only, summarize_only=args.summarize)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="rlmcmc", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("forward", help="fine vs GMsFEM timing and error on prior samples")
    _problem_args(p)
    p.add_argument("--samples", type=int, default=5)
    p.add_argument("--basis", type=int, nargs="+", default=[1, 2, 3, 4])
    p.set_defaults(func=cmd_forward, n_fine=100, n_coarse=10, dim=16)
    p = sub.add_parser("compare", help="tuned baselines vs multi-agent actor-critic (replicates, CIs)")
    p.add_argument("--out", default="results/mcmc", help="output folder (cached units, summary.json/md/png)")
    p.add_argument("--quick", action="store_true", help="tiny problem, 2 replicates, short chains (~1 min)")
    p.add_argument("--only", choices=("kl8", "kl32-channels", "kl8-transient"), help="run only this benchmark")
    p.add_argument("--summarize", action="store_true", help="only summarize the cached units")
    p.set_defaults(func=cmd_compare)
    for name, func, helptext in (("train", cmd_train, "train the (PR 7) Gaussian multi-agent policy on the coarse posterior"),
                                 ("sample", cmd_sample, "run chains with one proposal")):
        p = sub.add_parser(name, help=helptext)
        _problem_args(p)
        p.add_argument("--chains", type=int, default=4)
        p.add_argument("--agents", type=int, default=4)
        p.add_argument("--iters", type=int, default=200, help="RL training iterations")
        p.add_argument("--delta-max", type=float, default=0.0,
                       help="bound of the actors' state-dependent drift in units of the step (0: no drift)")
        p.add_argument("--no-coupling", action="store_true",
                       help="block-diagonal step factor (agents do not share exploration noise)")
        p.add_argument("--reward", choices=("esjd", "min-block"), default="esjd", help="RL training reward")
        if name == "sample":
            p.add_argument("--samples", type=int, default=2000, help="kept draws per chain")
            p.add_argument("--burn", type=int, default=500, help="burn-in (tuning) steps per chain")
        if name == "sample":
            p.add_argument("--proposal", choices=("rw", "pcn", "rl"), default="pcn")
            p.add_argument("--levels", choices=("1", "2"), default="2")
            p.add_argument("--policy", default="results/rlmcmc/policy.pt", help="checkpoint for --proposal rl")
        p.set_defaults(func=func)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
