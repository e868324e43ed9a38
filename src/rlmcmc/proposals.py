"""MCMC proposal kernels behind one interface.

Every proposal is a (possibly state-dependent) Gaussian ``q(θ'|θ) = N(m(θ, s), diag σ(θ, s)²)`` where
``s`` is the chain's first-level misfit at θ (used only by the RL proposal, see :mod:`rlmcmc.rl`).
Samplers call :meth:`GaussianProposal.sample` and :meth:`GaussianProposal.log_density`, and always
use the full Metropolis–Hastings ratio ``π(θ')q(θ|θ') / (π(θ)q(θ'|θ))`` (Hastings 1970), so a
non-symmetric proposal (pCN, the RL actors) keeps the chain exact.

* Random walk: ``θ' = θ + step ξ``.
* preconditioned Crank–Nicolson (Cotter, Roberts, Stuart & White, Stat. Sci. 2013):
  ``θ' = sqrt(1 - β²) θ + β ξ`` with β = ``step`` in (0, 1), reversible w.r.t. the N(0, I) prior.
"""

from __future__ import annotations

import copy

import numpy as np

LOG_2PI = np.log(2 * np.pi)


class GaussianProposal:
    """Base class: subclasses implement :meth:`mean_std` (mean and per-coordinate std at θ)."""

    name = "gaussian"

    def __init__(self, dim: int, step: float):
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = int(dim)
        self.step = float(step)
        self._check_step(self.step)

    def _check_step(self, step: float):
        if not step > 0:
            raise ValueError(f"{self.name} step must be positive, got {step}")

    def with_step(self, step: float) -> "GaussianProposal":
        """A copy with a different step size (used by burn-in tuning)."""
        new = copy.copy(self)
        new._check_step(float(step))
        new.step = float(step)
        return new

    def _check_theta(self, theta) -> np.ndarray:
        theta = np.asarray(theta, dtype=float)
        if theta.shape != (self.dim,):
            raise ValueError(f"theta must have shape ({self.dim},), got {theta.shape}")
        return theta

    def mean_std(self, theta: np.ndarray, misfit: float) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def sample(self, theta, misfit: float, rng: np.random.Generator) -> np.ndarray:
        """Draw θ' ~ q(·|θ)."""
        mean, std = self.mean_std(self._check_theta(theta), misfit)
        return mean + std * rng.standard_normal(self.dim)

    def log_density(self, theta_to, theta_from, misfit_from: float) -> float:
        """log q(θ_to | θ_from), with ``misfit_from`` the first-level misfit at θ_from."""
        mean, std = self.mean_std(self._check_theta(theta_from), misfit_from)
        z = (self._check_theta(theta_to) - mean) / std
        return float(-0.5 * np.sum(z * z) - np.sum(np.log(std)) - 0.5 * self.dim * LOG_2PI)

    def log_ratio(self, theta, theta_new, misfit: float, misfit_new: float) -> float:
        """log q(θ|θ') - log q(θ'|θ), the Hastings correction."""
        return self.log_density(theta, theta_new, misfit_new) - self.log_density(theta_new, theta, misfit)


class RandomWalkProposal(GaussianProposal):
    """Gaussian random walk ``θ' = θ + step ξ`` (symmetric, so the Hastings term cancels)."""

    name = "rw"

    def mean_std(self, theta, misfit):
        return theta, np.full(self.dim, self.step)


class PCNProposal(GaussianProposal):
    """pCN ``θ' = sqrt(1 - β²) θ + β ξ`` with β = ``step`` (Cotter et al. 2013)."""

    name = "pcn"

    def _check_step(self, step):
        if not 0 < step < 1:
            raise ValueError(f"pcn step beta must lie in (0, 1), got {step}")

    def mean_std(self, theta, misfit):
        return np.sqrt(1 - self.step**2) * theta, np.full(self.dim, self.step)


PROPOSALS = {"rw": RandomWalkProposal, "pcn": PCNProposal}


def make_proposal(name: str, dim: int, step: float) -> GaussianProposal:
    """Build a named fixed proposal ("rw" or "pcn"); unknown names raise ValueError listing the options."""
    if name not in PROPOSALS:
        raise ValueError(f"unknown proposal {name!r}; choose one of {sorted(PROPOSALS)} (or load an RL checkpoint)")
    return PROPOSALS[name](dim, step)
