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


class LinearGaussianProposal(GaussianProposal):
    """Full-covariance Gaussian proposal with an affine mean: ``θ' = shift + ρ θ + step L ξ``.

    ``L`` is a lower-triangular factor (e.g. the Cholesky factor of a pilot chain's covariance C) and
    ``ρ = sqrt(1 - step²)`` when ``contracting`` (else 1, or 0 for ``independent``). Special cases:

    * random walk with covariance C: ``θ' = θ + step L ξ`` (Haario, Saksman & Tamminen 2001 use
      step = 2.38 / sqrt(d));
    * generalized pCN, reversible w.r.t. N(m, C) (Rudolf & Sprungk, Found. Comput. Math. 18 (2018)):
      ``θ' = m + sqrt(1 - β²) (θ - m) + β L ξ`` with β = step;
    * Gaussian independence proposal ``θ' = m + step L ξ`` (step = covariance inflation);
    * over-relaxed generalized pCN (``kind="gpcn-over"``): ``θ' = m - sqrt(1 - β²) (θ - m) + β L ξ``, the
      Gaussian AR(1) kernel with a *negative* coefficient, also reversible w.r.t. N(m, C) (Adler, Phys.
      Rev. D 23 (1981) over-relaxation; Neal, *Suppressing random walks in MCMC using ordered
      overrelaxation*, 1998): it proposes on the far side of m, so accepted moves are antithetic.

    The Hastings ratio is always evaluated from the exact densities (base class), so a target that is
    not N(m, C) is still sampled exactly.
    """

    def __init__(self, chol, step: float, mean=None, kind: str = "rw"):
        chol = np.atleast_2d(np.asarray(chol, dtype=float))
        if chol.ndim != 2 or chol.shape[0] != chol.shape[1]:
            raise ValueError(f"chol must be a square matrix, got shape {chol.shape}")
        if kind not in ("rw", "gpcn", "gpcn-over", "independence"):
            raise ValueError(f"kind must be 'rw', 'gpcn', 'gpcn-over' or 'independence', got {kind!r}")
        if np.any(np.diag(chol) <= 0) or not np.allclose(chol, np.tril(chol)):
            raise ValueError("chol must be lower triangular with a positive diagonal")
        self.kind = kind
        self.name = {"rw": "rw-cov", "gpcn": "gpcn", "gpcn-over": "gpcn-over", "independence": "independence"}[kind]
        super().__init__(chol.shape[0], step)
        self.chol = chol
        self.center = np.zeros(self.dim) if mean is None else np.asarray(mean, dtype=float).reshape(self.dim)
        self._logdet = float(np.sum(np.log(np.diag(chol))))

    @property
    def max_step(self) -> float:
        return 0.999 if self.kind in ("gpcn", "gpcn-over") else 10.0

    def _check_step(self, step):
        if self.kind in ("gpcn", "gpcn-over") and not 0 < step < 1:
            raise ValueError(f"{self.kind} step beta must lie in (0, 1), got {step}")
        if not step > 0:
            raise ValueError(f"{self.name} step must be positive, got {step}")

    def _mean(self, theta):
        if self.kind == "rw":
            return theta
        if self.kind == "gpcn":
            return self.center + np.sqrt(1 - self.step**2) * (theta - self.center)
        if self.kind == "gpcn-over":
            return self.center - np.sqrt(1 - self.step**2) * (theta - self.center)
        return self.center

    def mean_std(self, theta, misfit):
        return self._mean(theta), self.step * np.sqrt(np.sum(self.chol**2, axis=1))

    def sample(self, theta, misfit, rng):
        return self._mean(self._check_theta(theta)) + self.step * (self.chol @ rng.standard_normal(self.dim))

    def log_density(self, theta_to, theta_from, misfit_from):
        from scipy.linalg import solve_triangular

        r = self._check_theta(theta_to) - self._mean(self._check_theta(theta_from))
        z = solve_triangular(self.chol, r, lower=True) / self.step
        return float(-0.5 * z @ z - self._logdet - self.dim * np.log(self.step) - 0.5 * self.dim * LOG_2PI)


class AdaptiveMetropolisProposal(LinearGaussianProposal):
    """Adaptive Metropolis (Haario, Saksman & Tamminen, Bernoulli 7 (2001)): a random walk whose
    covariance is the chain's own running empirical covariance (+ ε I), updated by :meth:`adapt` during
    burn-in only. :func:`rlmcmc.sampling.run_chain` stops calling it after burn-in, so the kept draws come
    from a fixed (exact) random-walk kernel."""

    def __init__(self, dim: int, step: float, chol=None, eps: float = 1e-6, min_history: int = 100):
        super().__init__(np.eye(dim) if chol is None else chol, step, kind="rw")
        self.name = "am"
        self.eps = float(eps)
        self.min_history = int(min_history)
        self._n = 0
        self._mean_acc = np.zeros(dim)
        self._m2 = np.zeros((dim, dim))

    def adapt(self, theta) -> "AdaptiveMetropolisProposal":
        """Welford update of the chain's covariance with the current state; refreshes L once enough
        history exists. Returns self (the sampler keeps one object)."""
        theta = self._check_theta(theta)
        self._n += 1
        delta = theta - self._mean_acc
        self._mean_acc = self._mean_acc + delta / self._n
        self._m2 += np.outer(delta, theta - self._mean_acc)
        if self._n >= self.min_history and self._n % 10 == 0:
            cov = self._m2 / (self._n - 1) + self.eps * np.eye(self.dim)
            self.chol = np.linalg.cholesky(cov)
            self._logdet = float(np.sum(np.log(np.diag(self.chol))))
        return self


class MixtureProposal(GaussianProposal):
    """Fixed-weight mixture ``q = Σ_j w_j q_j`` of proposals (Tierney, Ann. Stat. 22 (1994), §2.3).

    Used to give a learned proposal a *safe* random-walk component (weight ``weights[0]``): the kernel
    then dominates that fraction of a random-walk kernel, whose tails dominate the target's, so a chain
    started far out still moves. The Hastings ratio uses the full mixture densities in both directions
    (each component's reverse density with the proposed state's first-level misfit)."""

    name = "mixture"

    def __init__(self, components, weights):
        weights = np.asarray(weights, dtype=float)
        if len(components) != weights.size or weights.size < 1 or np.any(weights <= 0):
            raise ValueError(f"need one positive weight per component, got {len(components)} components and "
                             f"weights {weights.tolist()}")
        dims = {c.dim for c in components}
        if len(dims) != 1:
            raise ValueError(f"mixture components must share dim, got {sorted(dims)}")
        self.components = list(components)
        self.weights = weights / weights.sum()
        self._log_w = np.log(self.weights)
        super().__init__(dims.pop(), 1.0)
        self.name = "+".join(c.name for c in self.components)

    def with_step(self, step):
        # Tuning scales the first (random-walk) component only; the learned one keeps its own steps.
        new = copy.copy(self)
        new.components = [self.components[0].with_step(step)] + self.components[1:]
        new.step = float(step)
        return new

    def sample(self, theta, misfit, rng):
        j = int(rng.choice(len(self.components), p=self.weights))
        return self.components[j].sample(theta, misfit, rng)

    def log_density(self, theta_to, theta_from, misfit_from):
        terms = self._log_w + np.array([c.log_density(theta_to, theta_from, misfit_from) for c in self.components])
        top = terms.max()
        return float(top + np.log(np.exp(terms - top).sum())) if np.isfinite(top) else float(top)


def cholesky_of_draws(draws, jitter: float = 1e-9) -> tuple[np.ndarray, np.ndarray]:
    """(mean, lower Cholesky factor of the covariance) of draws (n, d), with a small relative jitter."""
    draws = np.asarray(draws, dtype=float)
    if draws.ndim != 2 or draws.shape[0] <= draws.shape[1]:
        raise ValueError(f"need draws of shape (n, d) with n > d, got {draws.shape}")
    cov = np.cov(draws.T)
    cov = cov + jitter * np.trace(cov) / cov.shape[0] * np.eye(cov.shape[0])
    return draws.mean(axis=0), np.linalg.cholesky(cov)
