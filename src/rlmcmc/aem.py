"""Enhanced-error (approximation-error) model for the coarse level, calibrated near the posterior.

Kaipio & Somersalo, *Statistical inverse problems: discretization, model reduction and inverse crimes*,
J. Comput. Appl. Math. 198 (2007): write the fine observables as G_f(θ) = G_c(θ) + e(θ) and replace the
modelling error e by a Gaussian N(μ_e, Σ_e) independent of θ, so the corrected coarse likelihood is

    y | θ  ~  N(G_c(θ) + μ_e, σ² I + Σ_e).

μ_e and the *full* covariance Σ_e are estimated from ``n`` pilot pairs (G_f(θ_i), G_c(θ_i)) with θ_i drawn
near the (coarse) posterior, not from the prior: e(θ) varies over the prior much more than over the
posterior, so a prior-calibrated model leaves the coarse posterior offset from and wider than the fine
one. The ``n`` fine solves (and coarse solves) are an offline cost that callers report.

The corrected posterior only changes the *first level* of delayed acceptance; the second stage still uses
the exact fine posterior, so the chain stays exact whatever the error model is.
"""

from __future__ import annotations

import numpy as np
from scipy.linalg import solve_triangular

from .sampling import Posterior


def error_model_from_pairs(fine_forward, coarse_forward, thetas, shrinkage: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """(μ_e, Σ_e) of G_f(θ) - G_c(θ) over the rows of ``thetas`` (n x d; n fine and n coarse solves).

    Σ_e is the sample covariance shrunk towards its diagonal (weight ``shrinkage``; Ledoit–Wolf style) so
    that it stays positive definite with fewer pairs than observables."""
    thetas = np.atleast_2d(np.asarray(thetas, dtype=float))
    if thetas.shape[0] < 2:
        raise ValueError(f"need at least 2 pilot pairs, got {thetas.shape[0]}")
    if not 0 <= shrinkage <= 1:
        raise ValueError(f"shrinkage must lie in [0, 1], got {shrinkage}")
    diffs = np.array([fine_forward.observe(t) - coarse_forward.observe(t) for t in thetas])
    cov = np.atleast_2d(np.cov(diffs.T))
    cov = (1 - shrinkage) * cov + shrinkage * np.diag(np.diag(cov))
    return diffs.mean(axis=0), cov


class CorrelatedErrorPosterior(Posterior):
    """Posterior with N(0, I) prior and likelihood ``y ~ N(G(θ) + bias, σ² I + error_cov)``.

    ``last_residual`` is the residual whitened by the Cholesky factor of σ² I + Σ_e, so
    ``misfit = |last_residual|² / 2`` as in :class:`rlmcmc.sampling.Posterior`."""

    def __init__(self, forward, data, noise_std: float, bias, error_cov):
        super().__init__(forward, data, noise_std, bias=bias)
        error_cov = np.atleast_2d(np.asarray(error_cov, dtype=float))
        n = self.data.size
        if error_cov.shape != (n, n):
            raise ValueError(f"error_cov must have shape ({n}, {n}), got {error_cov.shape}")
        if not np.allclose(error_cov, error_cov.T):
            raise ValueError("error_cov must be symmetric")
        self.noise_chol = np.linalg.cholesky(self.noise_std**2 * np.eye(n) + error_cov)

    def misfit(self, theta) -> float:
        theta = np.asarray(theta, dtype=float)
        if theta.shape != (self.dim,):
            raise ValueError(f"theta must have shape ({self.dim},), got {theta.shape}")
        self.n_evals += 1
        r = solve_triangular(self.noise_chol, self.forward.observe(theta) + self.bias - self.data, lower=True)
        self.last_residual = r
        return 0.5 * float(r @ r)


__all__ = ["CorrelatedErrorPosterior", "error_model_from_pairs"]
