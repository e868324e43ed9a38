"""Chain diagnostics via ArviZ: bulk ESS and rank-normalized split R-hat (Vehtari et al., Bayesian
Analysis 2021), plus cost-normalized efficiency (ESS per fine solve and per CPU-second)."""

from __future__ import annotations

import numpy as np

from .sampling import ChainResult


def _arviz():
    try:
        import arviz
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError("rlmcmc diagnostics need arviz: pip install 'microscale[mcmc]'") from err
    return arviz


def ess_rhat(draws: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-parameter bulk ESS and R-hat for draws of shape (chains, draws, dim)."""
    draws = np.asarray(draws, dtype=float)
    if draws.ndim != 3:
        raise ValueError(f"draws must have shape (chains, draws, dim), got {draws.shape}")
    az = _arviz()
    data = az.convert_to_dataset({"theta": draws})
    ess = np.asarray(az.ess(data, method="bulk")["theta"].values)
    rhat = np.asarray(az.rhat(data)["theta"].values)
    return ess, rhat


def tail_ess(draws: np.ndarray) -> np.ndarray:
    """Per-parameter tail ESS (min of the 5% and 95% quantile ESS; Vehtari et al. 2021) for draws of
    shape (chains, draws, dim)."""
    draws = np.asarray(draws, dtype=float)
    if draws.ndim != 3:
        raise ValueError(f"draws must have shape (chains, draws, dim), got {draws.shape}")
    az = _arviz()
    return np.asarray(az.ess(az.convert_to_dataset({"theta": draws}), method="tail")["theta"].values)


def summarize(chains: list[ChainResult]) -> dict:
    """Summary over chains: min/median bulk ESS and min tail ESS over θ components (0 if any chain never
    moved), max R-hat, ESS per fine solve
    (min ESS / total fine solves) and per CPU-second, acceptance per stage, posterior mean."""
    draws = np.stack([c.samples for c in chains])
    ess, rhat = ess_rhat(draws)
    ess_tail = tail_ess(draws)
    # A chain that never moved carries no information; ArviZ still returns a finite ESS for it.
    stuck = int(sum(np.all(c.samples == c.samples[0]) for c in chains))
    if stuck:
        ess, ess_tail = np.zeros_like(ess), np.zeros_like(ess_tail)
    fine = sum(c.fine_solves for c in chains)
    cpu = sum(c.cpu_seconds for c in chains)
    min_ess = float(np.min(ess))
    return {
        "n_chains": len(chains),
        "n_draws": int(draws.shape[1]),
        "stuck_chains": stuck,
        "ess_min": min_ess,
        "ess_median": float(np.median(ess)),
        "tail_ess_min": float(np.min(ess_tail)),
        "rhat_max": float(np.max(rhat)),
        "fine_solves": int(fine),
        "coarse_solves": int(sum(c.coarse_solves for c in chains)),
        "cpu_seconds": float(cpu),
        "ess_per_fine_solve": min_ess / fine if fine else float("nan"),
        "ess_per_cpu_second": min_ess / cpu if cpu > 0 else float("nan"),
        "accept_stage1": float(np.mean([c.accept_stage1 for c in chains])),
        "accept_stage2": float(np.nanmean([c.accept_stage2 for c in chains]))
        if any(np.isfinite(c.accept_stage2) for c in chains) else float("nan"),
        "steps": [c.step for c in chains],
        "posterior_mean": draws.reshape(-1, draws.shape[2]).mean(axis=0).tolist(),
    }
