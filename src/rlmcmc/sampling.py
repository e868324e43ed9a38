"""Posteriors and Metropolis–Hastings samplers: single-level MH and two-level delayed acceptance.

Two-level MH is the delayed-acceptance scheme of Christen & Fox, *Markov chain Monte Carlo using an
approximation*, JCGS 14 (2005), used with a GMsFEM coarse posterior as the first level in *Multi-agent
reinforcement learning accelerated MCMC on multiscale inversion problems* (Chung et al.):

* stage 1 (coarse, cheap): ``α₁ = min(1, π_c(θ') q(θ|θ') / (π_c(θ) q(θ'|θ)))``;
* stage 2 (fine, only if stage 1 accepts): ``α₂ = min(1, π_f(θ') π_c(θ) / (π_f(θ) π_c(θ')))``.

The resulting chain is reversible with respect to the fine posterior π_f. Fine solves are counted
only where stage 2 runs, which is what makes ESS per fine solve the honest cost measure.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from .proposals import GaussianProposal


class Posterior:
    """Bayesian posterior with N(0, I) prior and Gaussian noise: ``log π(θ) = -Φ(θ) - |θ|²/2``.

    ``Φ(θ) = Σ_k (G_k(θ) + b_k - y_k)² / (2 (σ² + v_k))`` where ``forward.observe`` is G; b = 0, v = 0
    unless an approximation-error model is given. Counts forward evaluations.
    """

    def __init__(self, forward, data, noise_std: float, bias=0.0, extra_var=0.0):
        self.forward = forward
        self.data = np.asarray(data, dtype=float).ravel()
        if not noise_std > 0:
            raise ValueError(f"noise_std must be positive, got {noise_std}")
        self.noise_std = float(noise_std)
        # Approximation-error model (Kaipio & Somersalo 2007): G(θ) + bias, noise variance σ² + extra_var.
        self.bias = np.broadcast_to(np.asarray(bias, float), self.data.shape).copy()
        self.scale = np.sqrt(self.noise_std**2 + np.broadcast_to(np.asarray(extra_var, float), self.data.shape))
        self.dim = int(forward.dim)
        self.n_evals = 0
        self.last_residual = np.zeros_like(self.data)

    def misfit(self, theta) -> float:
        theta = np.asarray(theta, dtype=float)
        if theta.shape != (self.dim,):
            raise ValueError(f"theta must have shape ({self.dim},), got {theta.shape}")
        self.n_evals += 1
        r = (self.forward.observe(theta) + self.bias - self.data) / self.scale
        self.last_residual = r  # the scaled data residual of the last evaluation (proposal features)
        return 0.5 * float(r @ r)

    def evaluate(self, theta) -> tuple[float, float]:
        """Return (log posterior up to a constant, misfit Φ)."""
        phi = self.misfit(theta)
        return -phi - 0.5 * float(np.dot(theta, theta)), phi


class LinearForward:
    """Linear forward map ``G(θ) = G θ`` (for validation against the closed-form posterior)."""

    def __init__(self, matrix):
        self.matrix = np.atleast_2d(np.asarray(matrix, dtype=float))
        self.dim = self.matrix.shape[1]

    def observe(self, theta):
        return self.matrix @ theta


def linear_gaussian_posterior(matrix, data, noise_std: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact posterior mean and covariance for y = Gθ + N(0, σ²I), θ ~ N(0, I)."""
    g = np.atleast_2d(np.asarray(matrix, dtype=float))
    precision = g.T @ g / noise_std**2 + np.eye(g.shape[1])
    cov = np.linalg.inv(precision)
    return cov @ g.T @ np.asarray(data, float) / noise_std**2, cov


@dataclass
class ChainResult:
    """One chain's draws and counters. Acceptance rates are per proposal (stage 2: per stage-1 accept)."""

    samples: np.ndarray
    misfit: np.ndarray
    fine_solves: int
    coarse_solves: int
    cpu_seconds: float
    accept_stage1: float
    accept_stage2: float
    step: float = float("nan")
    extra: dict = field(default_factory=dict)


def mh_accept(log_ratio, rng: np.random.Generator):
    """The Metropolis–Hastings accept step (Metropolis et al. 1953; Hastings 1970), the one every sampler
    and training loop here uses: accept with probability ``α = min(1, exp(log_ratio))``.

    ``log_ratio`` is a float (one chain) or an array (one entry per chain). One uniform is drawn from
    ``rng`` per entry whatever the ratio, ``rng.random()`` for a float and ``rng.random(n)`` for n entries,
    and the move is accepted when ``u < α``; so the draws do not depend on the outcome and a seed gives the
    same stream as before this function existed. A NaN ratio counts as α = 0 (reject), +inf as α = 1.
    Returns ``(accept, α)``: a bool and a float, or bool and float64 arrays shaped like ``log_ratio``."""
    if np.ndim(log_ratio) == 0:
        log_ratio = float(log_ratio)
        prob = 0.0 if np.isnan(log_ratio) else float(np.exp(min(0.0, log_ratio)))
        return bool(rng.random() < prob), prob
    log_ratio = np.asarray(log_ratio, dtype=float)
    prob = np.exp(np.minimum(0.0, np.where(np.isnan(log_ratio), -np.inf, log_ratio)))
    return rng.random(log_ratio.shape) < prob, prob


def run_chain(fine: Posterior, proposal: GaussianProposal, theta0, n_samples: int, rng: np.random.Generator,
              coarse: Posterior | None = None, n_burn: int = 0, tune: bool = False,
              target_accept: float = 0.25, progress: bool = False, desc: str = "chain") -> ChainResult:
    """Run MH (``coarse=None``) or two-level delayed-acceptance MH for ``n_burn + n_samples`` steps.

    With ``tune=True`` the proposal step is adapted during burn-in by Robbins–Monro on log(step),
    towards ``target_accept`` stage-1 acceptance, then frozen; a proposal with an ``adapt(theta)`` method
    (adaptive Metropolis) is also updated with every burn-in state, then frozen. Only post-burn-in
    draws, solves and CPU time are reported, so the reported chain is an exact (non-adaptive) MH chain.
    """
    if n_samples <= 0 or n_burn < 0:
        raise ValueError(f"need n_samples > 0 and n_burn >= 0, got {n_samples}, {n_burn}")
    theta = np.asarray(theta0, dtype=float).copy()
    if theta.shape != (fine.dim,):
        raise ValueError(f"theta0 must have shape ({fine.dim},), got {theta.shape}")
    if coarse is not None and coarse.dim != fine.dim:
        raise ValueError("coarse and fine posteriors must share the parameter dimension")
    level1 = coarse if coarse is not None else fine
    if hasattr(proposal, "adapt"):  # adaptive Metropolis: every chain adapts its own copy
        proposal = copy.deepcopy(proposal)
    # A proposal that reads the first-level data residual (not just the misfit) gets it as its state.
    wants_residual = getattr(proposal, "needs_residual", False)
    lp1, m1 = level1.evaluate(theta)
    s1 = level1.last_residual.copy() if wants_residual else m1
    lpf, mf = (fine.evaluate(theta) if coarse is not None else (lp1, m1))
    log_step = np.log(proposal.step)
    samples = np.zeros((n_samples, fine.dim))
    misfits = np.zeros(n_samples)
    acc1 = acc2 = tried2 = 0
    f0 = c0 = 0
    t0 = 0.0
    total = n_burn + n_samples
    for it in tqdm(range(total), desc=desc, disable=not progress, leave=False):
        if it == n_burn:
            f0, c0 = fine.n_evals, (coarse.n_evals if coarse is not None else 0)
            t0 = time.process_time()
            acc1 = acc2 = tried2 = 0
        prop = proposal.sample(theta, s1, rng)
        lp1_new, m1_new = level1.evaluate(prop)
        s1_new = level1.last_residual.copy() if wants_residual else m1_new
        log_r1 = lp1_new - lp1 + proposal.log_ratio(theta, prop, s1, s1_new)
        ok, prob1 = mh_accept(log_r1, rng)
        if tune and it < n_burn:
            log_step += (prob1 - target_accept) / np.sqrt(it + 1.0)
            upper = getattr(proposal, "max_step", 0.999 if proposal.name == "pcn" else 10.0)
            proposal = proposal.with_step(float(np.clip(np.exp(log_step), 1e-4, upper)))
            log_step = np.log(proposal.step)
        if ok:
            acc1 += 1
            if coarse is None:
                theta, lp1, m1, s1, lpf, mf = prop, lp1_new, m1_new, s1_new, lp1_new, m1_new
            else:
                tried2 += 1
                lpf_new, mf_new = fine.evaluate(prop)
                ok2, _ = mh_accept(lpf_new - lpf + lp1 - lp1_new, rng)
                if ok2:
                    acc2 += 1
                    theta, lp1, m1, s1, lpf, mf = prop, lp1_new, m1_new, s1_new, lpf_new, mf_new
        if it < n_burn and hasattr(proposal, "adapt"):
            proposal = proposal.adapt(theta)
        if it >= n_burn:
            samples[it - n_burn] = theta
            misfits[it - n_burn] = mf
    cpu = time.process_time() - t0
    return ChainResult(
        samples=samples, misfit=misfits,
        fine_solves=fine.n_evals - f0, coarse_solves=(coarse.n_evals - c0) if coarse is not None else 0,
        cpu_seconds=cpu, accept_stage1=acc1 / n_samples,
        accept_stage2=(acc2 / tried2 if tried2 else float("nan")) if coarse is not None else float("nan"),
        step=proposal.step,
    )


def run_chains(fine: Posterior, proposal: GaussianProposal, n_chains: int, n_samples: int, seed: int = 0,
               coarse: Posterior | None = None, n_burn: int = 0, tune: bool = False,
               target_accept: float = 0.25, init=None, progress: bool = True, desc: str = "") -> list[ChainResult]:
    """Run ``n_chains`` independent chains (sequentially; seeds ``seed + c``), each from ``init[c]``
    (default: a prior draw), with per-chain burn-in tuning when ``tune``."""
    if n_chains <= 0:
        raise ValueError(f"n_chains must be positive, got {n_chains}")
    results = []
    bar = tqdm(range(n_chains), desc=desc or f"{proposal.name} chains", disable=not progress)
    for c in bar:
        rng = np.random.default_rng(seed + c)
        theta0 = rng.standard_normal(fine.dim) if init is None else np.asarray(init[c], float)
        results.append(run_chain(fine, proposal, theta0, n_samples, rng, coarse=coarse, n_burn=n_burn,
                                 tune=tune, target_accept=target_accept, progress=progress,
                                 desc=f"chain {c}"))
    return results
