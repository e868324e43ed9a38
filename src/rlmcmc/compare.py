"""The issue-7 pipeline behind ``rlmcmc train`` / ``rlmcmc sample``: pilot run, training of the issue-7
Gaussian policy (:mod:`rlmcmc.rl`), RW / pCN / RL chains at one and two levels, summaries and plots.
Superseded for comparisons by :mod:`rlmcmc.protocol` (``rlmcmc compare``), which tunes every baseline
for the reported metric and runs replicates.

Protocol (the same for every method, so ESS per fine solve is comparable):

1. A coarse-only pCN pilot chain (burn-in tuned) gives the chains' starting points (spread along the
   pilot chain), a per-coordinate scale for the RL reward, and the RL agents' initial β₀. Pilot and
   training costs are coarse solves only and are reported separately.
2. Every chain does ``n_burn`` burn-in steps (RW/pCN step tuned there by Robbins–Monro, then frozen)
   and ``n_samples`` kept steps; fine solves and CPU seconds are counted on the kept part only.
"""

from __future__ import annotations

import time

import numpy as np

from .diagnostics import summarize
from .problem import InverseProblem
from .proposals import make_proposal
from .rl import AgentConfig, RLProposal, TrainConfig, coarse_esjd, train_agents
from .sampling import run_chains

METHODS = ("rw-1", "pcn-1", "rl-1", "rw-2", "pcn-2", "rl-2")


def pilot(problem: InverseProblem, n_chains: int, n_steps: int = 4000, seed: int = 10_000) -> dict:
    """Coarse pCN pilot chain: tuned step, chain starting points, coarse-posterior std per coordinate."""
    _, coarse = problem.posteriors()
    run = run_chains(coarse, make_proposal("pcn", problem.fine.dim, 0.2), 1, n_steps, seed=seed,
                     n_burn=n_steps, tune=True, progress=False)[0]
    idx = np.linspace(n_steps // 4, n_steps - 1, n_chains).astype(int)
    return {"step": run.step, "inits": run.samples[idx], "scale": run.samples.std(axis=0) + 1e-6,
            "coarse_solves": coarse.n_evals}


def train_rl(problem: InverseProblem, pilot_info: dict, n_agents: int = 4, n_iters: int = 200,
             delta_max: float = 0.0, reward: str = "esjd", coupled: bool = True, seed: int = 0,
             checkpoint: str | None = None, progress: bool = True):
    """Train the multi-agent policy on the coarse posterior, starting from pCN with the pilot's step.

    The training chains start at the pilot's chain starting points (repeated); the reward is whitened by
    the pilot's coarse-posterior std. Returns (policy, history); the history also holds the coarse ESJD
    of the pCN initialization and of the trained policy (exact MH on the coarse posterior, same seeds).
    """
    _, coarse = problem.posteriors()
    train = TrainConfig(n_iters=n_iters, reward=reward, seed=seed)
    inits = np.repeat(pilot_info["inits"], int(np.ceil(train.n_envs / len(pilot_info["inits"]))), axis=0)
    config = AgentConfig(dim=problem.fine.dim, n_agents=n_agents, beta0=float(pilot_info["step"]),
                         delta_max=delta_max, coupled=coupled)
    policy, history = train_agents(coarse, config, train, init=inits[: train.n_envs], scale=pilot_info["scale"],
                                   progress=progress, checkpoint=checkpoint)
    _, coarse = problem.posteriors()
    for name, prop in (("pcn_init", make_proposal("pcn", problem.fine.dim, float(pilot_info["step"]))),
                       ("trained", RLProposal(policy))):
        history[f"coarse_esjd_{name}"] = coarse_esjd(coarse, prop, pilot_info["inits"], 250, pilot_info["scale"],
                                                     seed=seed + 1)
    return policy, history


def run_methods(problem: InverseProblem, pilot_info: dict, policy, methods=METHODS, n_chains: int = 4,
                n_samples: int = 2000, n_burn: int = 500, seed: int = 0, progress: bool = True) -> dict:
    """Run each method ("<proposal>-<levels>") on the same posterior and summarize it."""
    out = {}
    dim = problem.fine.dim
    for method in methods:
        name, _, levels = method.partition("-")
        if levels not in ("1", "2") or name not in ("rw", "pcn", "rl"):
            raise ValueError(f"unknown method {method!r}; use one of {METHODS}")
        fine, coarse = problem.posteriors()
        if name == "rl":
            if policy is None:
                raise ValueError("method rl-* needs a trained policy")
            proposal, tune = RLProposal(policy), False
        else:
            proposal, tune = make_proposal(name, dim, float(pilot_info["step"])), True
        t0 = time.perf_counter()
        chains = run_chains(fine, proposal, n_chains, n_samples, seed=seed, coarse=coarse if levels == "2" else None,
                            n_burn=n_burn, tune=tune, init=pilot_info["inits"], progress=progress, desc=method)
        summary = summarize(chains)
        summary["wall_seconds"] = time.perf_counter() - t0
        # Chain 0 only (the plots use it); all chains would make the JSON tens of MB.
        summary["misfit_trace"] = [np.round(chains[0].misfit, 4).tolist()]
        summary["trace_theta0"] = [np.round(chains[0].samples[:, 0], 5).tolist()]
        out[method] = summary
    return out


def markdown_table(results: dict, reference: str = "pcn-2") -> str:
    """Markdown table of the summaries; the last column is ESS/fine-solve relative to ``reference``."""
    ref = results.get(reference, {}).get("ess_per_fine_solve", float("nan"))
    lines = ["| method | chains x draws | min ESS | max R-hat | fine solves | coarse solves | acc. stage 1 | "
             "acc. stage 2 | ESS / fine solve | ESS / CPU s | vs " + reference + " |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, s in results.items():
        lines.append(
            f"| {method} | {s['n_chains']}x{s['n_draws']} | {s['ess_min']:.1f} | {s['rhat_max']:.3f} | "
            f"{s['fine_solves']} | {s['coarse_solves']} | {s['accept_stage1']:.3f} | {s['accept_stage2']:.3f} | "
            f"{s['ess_per_fine_solve']:.4f} | {s['ess_per_cpu_second']:.2f} | {s['ess_per_fine_solve'] / ref:.2f}x |")
    return "\n".join(lines)


def plot_results(problem: InverseProblem, results: dict, path: str, history: dict | None = None) -> None:
    """PNG: true vs posterior-mean log κ, θ₀ and misfit traces, ESS per fine solve, acceptance by stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(15, 9))
    mesh, fields = problem.fine.mesh, problem.fine.fields
    n = mesh.n
    best = max(results, key=lambda m: results[m]["ess_per_fine_solve"])
    for ax, theta, title in ((axes[0, 0], problem.theta_true, "true log κ"),
                             (axes[0, 1], np.array(results[best]["posterior_mean"]),
                              f"posterior mean log κ ({best})")):
        im = ax.imshow(fields.log_kappa(theta).reshape(n, n), origin="lower", extent=(0, 1, 0, 1), cmap="viridis")
        ax.plot(problem.fine.points[:, 0], problem.fine.points[:, 1], "w.", ms=4)
        ax.set_title(title)
        fig.colorbar(im, ax=ax)
    ax = axes[0, 2]
    for method, s in results.items():
        ax.plot(s["trace_theta0"][0], lw=0.6, label=method)
    ax.axhline(problem.theta_true[0], color="k", ls="--", label="truth")
    ax.set_title("trace of θ₀ (chain 0)")
    ax.legend(fontsize=7)
    ax = axes[1, 0]
    for method, s in results.items():
        ax.semilogy(s["misfit_trace"][0], lw=0.6, label=method)
    ax.set_title("fine misfit trace (chain 0)")
    ax.legend(fontsize=7)
    names = list(results)
    ax = axes[1, 1]
    ax.bar(names, [results[m]["ess_per_fine_solve"] for m in names], color="C0")
    ax.set_title("min-ESS per fine solve")
    ax.tick_params(axis="x", rotation=45)
    ax = axes[1, 2]
    x = np.arange(len(names))
    ax.bar(x - 0.2, [results[m]["accept_stage1"] for m in names], 0.4, label="stage 1 (or MH)")
    ax.bar(x + 0.2, [np.nan_to_num(results[m]["accept_stage2"]) for m in names], 0.4, label="stage 2")
    ax.set_xticks(x, names, rotation=45)
    ax.set_title("acceptance by stage")
    ax.legend(fontsize=7)
    if history is not None:
        inset = axes[1, 0].inset_axes([0.55, 0.55, 0.4, 0.4])
        inset.plot(np.convolve(history["reward"], np.ones(10) / 10, mode="valid"), lw=0.8)
        inset.set_title("RL reward (train)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
