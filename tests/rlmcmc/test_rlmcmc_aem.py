"""Enhanced-error model (rlmcmc.aem): the pilot-pair error statistics of a linear model in closed form,
the correlated-noise misfit against its closed form, and exactness of two-level chains whose first level
uses it (the second stage keeps the fine posterior exact whatever the error model)."""

import numpy as np
import pytest

from rlmcmc.aem import CorrelatedErrorPosterior, error_model_from_pairs
from rlmcmc.diagnostics import ess_rhat
from rlmcmc.proposals import LinearGaussianProposal
from rlmcmc.sampling import LinearForward, Posterior, linear_gaussian_posterior, run_chains

G = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, -0.7], [0.3, 0.0, 1.2], [1.0, 1.0, 1.0]])
Y = np.array([0.4, -0.3, 1.1, 0.8])
SIGMA = 0.5


class _Affine(LinearForward):
    def __init__(self, matrix, shift):
        super().__init__(matrix)
        self.shift = np.asarray(shift, float)

    def observe(self, theta):
        return self.matrix @ theta + self.shift


def test_error_model_of_linear_maps_is_the_pushforward_of_the_pilot_draws():
    """G_f - G_c = D θ + b is affine, so over draws θ_i the error mean is D mean(θ) + b and (shrinkage 0)
    its covariance is D Cov(θ) Dᵀ exactly."""
    coarse_matrix = G * 1.1 + 0.05
    thetas = np.random.default_rng(0).normal(size=(40, 3)) * [1.0, 0.3, 2.0]
    shift = np.array([0.1, -0.2, 0.0, 0.3])
    mean, cov = error_model_from_pairs(_Affine(G, shift), LinearForward(coarse_matrix), thetas, shrinkage=0.0)
    diff = G - coarse_matrix
    np.testing.assert_allclose(mean, diff @ thetas.mean(0) + shift, atol=1e-12)
    np.testing.assert_allclose(cov, diff @ np.cov(thetas.T) @ diff.T, atol=1e-12)
    _, shrunk = error_model_from_pairs(_Affine(G, shift), LinearForward(coarse_matrix), thetas, shrinkage=1.0)
    np.testing.assert_allclose(shrunk, np.diag(np.diag(cov)), atol=1e-12)
    with pytest.raises(ValueError, match="2 pilot pairs"):
        error_model_from_pairs(LinearForward(G), LinearForward(G), thetas[:1])
    with pytest.raises(ValueError, match="shrinkage"):
        error_model_from_pairs(LinearForward(G), LinearForward(G), thetas, shrinkage=1.5)


def test_correlated_misfit_matches_closed_form_and_reduces_to_posterior():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(4, 4))
    cov = a @ a.T * 0.05
    bias = rng.normal(size=4) * 0.1
    post = CorrelatedErrorPosterior(LinearForward(G), Y, SIGMA, bias, cov)
    theta = rng.normal(size=3)
    r = G @ theta + bias - Y
    expected = 0.5 * r @ np.linalg.solve(SIGMA**2 * np.eye(4) + cov, r)
    assert post.misfit(theta) == pytest.approx(expected, rel=1e-12)
    assert post.n_evals == 1
    plain = Posterior(LinearForward(G), Y, SIGMA, bias=bias)
    zero = CorrelatedErrorPosterior(LinearForward(G), Y, SIGMA, bias, np.zeros((4, 4)))
    assert zero.evaluate(theta)[0] == pytest.approx(plain.evaluate(theta)[0], rel=1e-12)
    with pytest.raises(ValueError, match="shape"):
        CorrelatedErrorPosterior(LinearForward(G), Y, SIGMA, bias, np.eye(3))
    with pytest.raises(ValueError, match="symmetric"):
        CorrelatedErrorPosterior(LinearForward(G), Y, SIGMA, bias, np.triu(np.ones((4, 4))))


def test_corrected_first_level_moves_the_coarse_posterior_onto_the_fine_one_and_stays_exact():
    """A coarse model with a constant offset: its posterior is far from the fine one; the error model from
    pilot pairs removes the offset (coarse posterior mean = fine posterior mean), and the two-level gpCN
    chain with that first level has the fine posterior's moments (within MCSE)."""
    offset = np.array([0.8, -0.5, 0.6, 0.4])
    fine_fwd, coarse_fwd = LinearForward(G), _Affine(G, offset)
    mean_f, cov_f = linear_gaussian_posterior(G, Y, SIGMA)
    mean_c, _ = linear_gaussian_posterior(G, Y - offset, SIGMA)
    assert np.abs(mean_c - mean_f).max() > 0.3
    thetas = np.random.default_rng(2).multivariate_normal(mean_c, cov_f, 20)
    bias, cov = error_model_from_pairs(fine_fwd, coarse_fwd, thetas)
    np.testing.assert_allclose(bias, -offset, atol=1e-12)  # the error of an offset is the offset itself
    corrected = CorrelatedErrorPosterior(coarse_fwd, Y, SIGMA, bias, cov)
    fine = Posterior(fine_fwd, Y, SIGMA)
    prop = LinearGaussianProposal(np.linalg.cholesky(cov_f), 0.6, mean=mean_f, kind="gpcn")
    chains = run_chains(fine, prop, 2, 4000, seed=4, coarse=corrected, n_burn=300, progress=False)
    draws = np.stack([c.samples for c in chains])
    ess, rhat = ess_rhat(draws)
    assert rhat.max() < 1.05
    flat = draws.reshape(-1, 3)
    sd = np.sqrt(np.diag(cov_f))
    np.testing.assert_array_less(np.abs(flat.mean(0) - mean_f), 4.5 * sd / np.sqrt(ess.min()))
    # With the offset removed, almost every stage-1 acceptance passes stage 2.
    assert min(c.accept_stage2 for c in chains) > 0.95
