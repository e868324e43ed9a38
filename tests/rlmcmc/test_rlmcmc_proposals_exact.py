"""Exactness of the issue-14 proposals on a linear-Gaussian posterior with a closed form: moment tests
with Monte-Carlo standard errors, a stationarity test from exact posterior draws, a control without the
Hastings term and a mutant that evaluates the reverse density with the current state's features (both
must fail), and burn-in from a prior start."""

import numpy as np
import pytest
import torch
from scipy import stats

from rlmcmc.diagnostics import ess_rhat
from rlmcmc.marl import MARLConfig, MARLProposal, MultiAgentActors, Whitening
from rlmcmc.proposals import (AdaptiveMetropolisProposal, LinearGaussianProposal, MixtureProposal,
                              RandomWalkProposal, cholesky_of_draws)
from rlmcmc.sampling import LinearForward, Posterior, linear_gaussian_posterior, run_chain, run_chains

G = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, -0.7], [0.3, 0.0, 1.2], [1.0, 1.0, 1.0]])
Y = np.array([0.4, -0.3, 1.1, 0.8])
SIGMA = 0.5
MEAN, COV = linear_gaussian_posterior(G, Y, SIGMA)
CHOL = np.linalg.cholesky(COV)
BASE = 0.6
SAFE = 0.05


def _check_moments(draws, n_ess):
    sd = np.sqrt(np.diag(COV))
    np.testing.assert_array_less(np.abs(draws.mean(axis=0) - MEAN), 4.5 * sd / np.sqrt(n_ess))
    se = np.sqrt((np.outer(sd**2, sd**2) + COV**2) / n_ess)
    np.testing.assert_array_less(np.abs(np.cov(draws.T) - COV), 5 * se)


def _random_marl(seed=0, scale=1.0, safe_weight=0.2, bound=1.0, base="rw"):
    """Untrained but strongly state-dependent actors (random last layers; drift and log step bounded by
    ``bound``), whitening by a deliberately imperfect Gaussian fit, Jacobian G / σ (the linear model's
    exact scaled Jacobian)."""
    torch.manual_seed(seed)
    actors = MultiAgentActors(MARLConfig(dim=3, n_agents=2, base_step=0.8, safe_weight=safe_weight,
                                         delta_max=bound, log_scale_max=bound, base=base))
    with torch.no_grad():
        for a in actors.actors:
            a.net[-1].weight.normal_(0, scale)
            a.net[-1].bias.normal_(0, 0.3 * scale)
    white = Whitening(MEAN + 0.1, 1.3 * CHOL, G / SIGMA)
    return MARLProposal(actors.eval(), white)


def _switching_marl(base="rw"):
    """Hand-set actors whose block step factor switches with the sign of the block's first whitened
    coordinate: log c ≈ +1 for x > 0 and -1 for x < 0 (a drift of the same form on every coordinate).
    Crossing moves then have very different forward and reverse densities, so a wrong reverse density
    shows up clearly."""
    actors = MultiAgentActors(MARLConfig(dim=3, n_agents=2, base_step=BASE, safe_weight=SAFE, log_scale_max=1.0,
                                         delta_max=1.0, base=base))
    with torch.no_grad():
        for a in actors.actors:
            for m in a.net:
                if isinstance(m, torch.nn.Linear):
                    m.weight.zero_()
                    m.bias.zero_()
            a.net[0].weight[0, 0] = 2.0
            a.net[2].weight[0, 0] = 2.0
            a.net[4].weight[:, 0] = 3.0
    return MARLProposal(actors.eval(), Whitening(MEAN + 0.1, 1.3 * CHOL, G / SIGMA))


def _proposals():
    return {
        "rw-cov": LinearGaussianProposal(1.2 * CHOL, 1.0, kind="rw"),
        "gpcn": LinearGaussianProposal(1.5 * CHOL, 0.6, mean=MEAN - 0.2, kind="gpcn"),
        # nearly centred: reflected around a far-off centre it stays exact but sticks in a tail for long
        "gpcn-over": LinearGaussianProposal(1.1 * CHOL, 0.9, mean=MEAN - 0.05, kind="gpcn-over"),
        "independence": LinearGaussianProposal(1.4 * CHOL, 1.0, mean=MEAN + 0.1, kind="independence"),
        "am": AdaptiveMetropolisProposal(3, 1.4, chol=0.1 * np.eye(3)),
        "mixture": MixtureProposal([RandomWalkProposal(3, 0.4), LinearGaussianProposal(1.3 * CHOL, 1.0, mean=MEAN,
                                                                                      kind="independence")], [0.3, 0.7]),
        "marl": _random_marl(),
        "marl-gpcn": _random_marl(base="gpcn"),
    }


def _posteriors(levels):
    fine = Posterior(LinearForward(G), Y, SIGMA)
    coarse = Posterior(LinearForward(G * 1.1 + 0.05), Y, SIGMA) if levels == 2 else None
    return fine, coarse


@pytest.mark.parametrize("name", ["rw-cov", "gpcn", "gpcn-over", "independence", "am", "mixture", "marl",
                                  "marl-gpcn"])
@pytest.mark.parametrize("levels", [1, 2])
def test_moments_match_closed_form(name, levels):
    fine, coarse = _posteriors(levels)
    proposal = _proposals()[name]
    chains = run_chains(fine, proposal, 2, 4000, seed=11, coarse=coarse, n_burn=500, tune=name in ("rw-cov", "am"),
                        progress=False)
    draws = np.stack([c.samples for c in chains])
    ess, rhat = ess_rhat(draws)
    assert rhat.max() < 1.05
    _check_moments(draws.reshape(-1, 3), ess.min())


def _stationarity_z(proposal, n=2000, steps=15, levels=1, seed=0):
    """Start ``n`` chains at exact posterior draws and run ``steps`` steps each. An exact kernel leaves the
    posterior invariant, so the whitened end states z have E z = 0 and E z² = 1 per coordinate; returns the
    largest |z-score| of those 6 sample moments (standard errors 1/sqrt(n) and sqrt(2/n))."""
    rng = np.random.default_rng(seed)
    starts = rng.multivariate_normal(MEAN, COV, n)
    ends = np.empty_like(starts)
    for i, s in enumerate(starts):
        fine, coarse = _posteriors(levels)
        ends[i] = run_chain(fine, proposal, s, steps, rng, coarse=coarse).samples[-1]
    z = np.linalg.solve(CHOL, (ends - MEAN).T).T
    scores = np.concatenate([z.mean(0) * np.sqrt(n), ((z * z).mean(0) - 1) / np.sqrt(2 / n)])
    return float(np.abs(scores).max())


@pytest.mark.parametrize("base", ["rw", "gpcn"])
@pytest.mark.parametrize("levels", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_marl_leaves_exact_posterior_invariant(levels, base):
    assert _stationarity_z(_switching_marl(base), n=1500, steps=10, levels=levels) < 4.0
    assert _stationarity_z(_random_marl(seed=2, scale=2.0, base=base), n=1000, steps=5, levels=levels) < 4.0


class _NoHastings(MARLProposal):
    def log_ratio(self, theta, theta_new, misfit, misfit_new):
        return 0.0


class _ReverseWithCurrentFeatures(MARLProposal):
    """Mutant: the reverse density q(θ|θ') built from the actors' outputs at the *current* state's
    features (θ, r(θ)) instead of the proposed state's (θ', r(θ'))."""

    def log_ratio(self, theta, theta_new, misfit, misfit_new):
        delta, logc = self.actions(theta, misfit)  # the bug: current state's features
        rev_learned = self.log_density_given_actions(theta, theta_new, delta, logc)
        rev = np.logaddexp(np.log(self.weight_safe) + self.safe.log_density(theta, theta_new, misfit_new),
                           np.log1p(-self.weight_safe) + rev_learned)
        return rev - self.log_density(theta_new, theta, misfit)


def _mutant(cls, base="rw"):
    good = _switching_marl(base)
    bad = cls.__new__(cls)
    bad.__dict__.update(good.__dict__)
    return bad


@pytest.mark.parametrize("base", ["rw", "gpcn"])
def test_stationarity_control_without_hastings_term_fails(base):
    assert _stationarity_z(_mutant(_NoHastings, base), n=1000, steps=10) > 8.0


@pytest.mark.parametrize("base", ["rw", "gpcn"])
def test_stationarity_mutant_with_current_state_features_fails(base):
    assert _stationarity_z(_mutant(_ReverseWithCurrentFeatures, base)) > 5.5


@pytest.mark.slow
@pytest.mark.parametrize("base", ["rw", "gpcn"])
def test_moment_test_detects_both_mutants(base):
    for cls in (_NoHastings, _ReverseWithCurrentFeatures):
        fine, _ = _posteriors(1)
        chains = run_chains(fine, _mutant(cls, base), 2, 8000, seed=3, n_burn=500, progress=False)
        draws = np.stack([c.samples for c in chains])
        ess, _ = ess_rhat(draws)
        with pytest.raises(AssertionError):
            _check_moments(draws.reshape(-1, 3), ess.min())


@pytest.mark.parametrize("name", ["marl", "marl-gpcn", "mixture"])
def test_burn_in_from_prior_start_two_level(name):
    """Started from a prior draw in the tail (3 prior sd out), the two-level chain reaches the posterior
    bulk within burn-in: the safe random-walk component keeps it moving."""
    fine, coarse = _posteriors(2)
    start = np.array([3.0, -3.0, 3.0])
    res = run_chain(fine, _proposals()[name], start, 3000, np.random.default_rng(5), coarse=coarse, n_burn=1000)
    assert res.accept_stage1 > 0.05
    z = np.linalg.solve(CHOL, (res.samples - MEAN).T).T
    assert np.all(np.abs(z.mean(0)) < 0.5)


def test_marl_untrained_is_pilot_covariance_random_walk():
    """Zero last layers: every component is N(θ, s₀² C), so the mixture density equals the RW density."""
    actors = MultiAgentActors(MARLConfig(dim=3, n_agents=3, base_step=0.7))
    prop = MARLProposal(actors, Whitening(MEAN, CHOL, G / SIGMA))
    rw = LinearGaussianProposal(CHOL, 0.7, kind="rw")
    rng = np.random.default_rng(0)
    theta, to, res = rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal(4)
    assert prop.log_density(to, theta, res) == pytest.approx(rw.log_density(to, theta, 0.0), rel=1e-10)


def test_marl_gpcn_untrained_is_generalized_pcn():
    """Zero last layers with the gpcn base: both components are the generalized pCN around the pilot mean
    with β = s₀, so the mixture density equals the gpCN density (reversible w.r.t. N(m, C))."""
    actors = MultiAgentActors(MARLConfig(dim=3, n_agents=3, base_step=0.7, base="gpcn"))
    prop = MARLProposal(actors, Whitening(MEAN + 0.2, CHOL, G / SIGMA))
    gpcn = LinearGaussianProposal(CHOL, 0.7, mean=MEAN + 0.2, kind="gpcn")
    rng = np.random.default_rng(0)
    theta, to, res = rng.standard_normal(3), rng.standard_normal(3), rng.standard_normal(4)
    assert prop.log_density(to, theta, res) == pytest.approx(gpcn.log_density(to, theta, 0.0), rel=1e-10)
    with pytest.raises(ValueError, match="base_step"):
        MARLConfig(dim=3, base_step=1.2, base="gpcn")
    with pytest.raises(ValueError, match="base"):
        MARLConfig(dim=3, base="hmc")


@pytest.mark.parametrize("base", ["rw", "gpcn"])
def test_marl_sampler_draws_from_its_own_density(base):
    """The draws of :meth:`MARLProposal.sample` have the mean and covariance of the density the Hastings
    ratio uses (:meth:`log_density`), computed by importance sampling from a wide Gaussian."""
    prop = _random_marl(seed=5, scale=2.0, base=base)
    rng = np.random.default_rng(3)
    theta, res = MEAN + 0.3, rng.standard_normal(4)
    draws = np.array([prop.sample(theta, res, rng) for _ in range(8000)])
    wide = stats.multivariate_normal(theta, 16 * COV)
    xs = wide.rvs(30000, random_state=4)
    wts = np.exp([prop.log_density(x, theta, res) for x in xs] - wide.logpdf(xs))
    wts /= wts.sum()
    is_mean = wts @ xs
    se = np.sqrt(draws.var(0) / draws.shape[0] + (wts[:, None] ** 2 * (xs - is_mean) ** 2).sum(0))
    np.testing.assert_array_less(np.abs(draws.mean(0) - is_mean), 5 * se)


def test_marl_gpcn_numpy_density_matches_torch_actors():
    prop = _random_marl(seed=4, base="gpcn")
    rng = np.random.default_rng(1)
    theta, res, to = rng.standard_normal(3), rng.standard_normal(4), rng.standard_normal(3)
    feats = torch.as_tensor(prop.white.features(theta, res))
    actors = MultiAgentActors(prop.config)
    with torch.no_grad():
        for a, (_, _, layers) in zip(actors.actors, prop.layers):
            for m, (wt, b) in zip([m for m in a.net if isinstance(m, torch.nn.Linear)], layers):
                m.weight.copy_(torch.as_tensor(wt))
                m.bias.copy_(torch.as_tensor(b))
        x_to, x_from = (torch.as_tensor(prop.white.whiten(t)) for t in (to, theta))
        logq_t = float(actors.double().log_density_x(x_to, x_from, feats.double())[0])
    const = -np.log(np.diag(prop.white.chol)).sum() - 1.5 * np.log(2 * np.pi)
    assert prop.log_density_learned(to, theta, res) == pytest.approx(logq_t + const, rel=1e-9)


def test_marl_numpy_density_matches_torch_actors_and_is_normalized():
    prop = _random_marl(seed=4)
    rng = np.random.default_rng(1)
    theta, res = rng.standard_normal(3), rng.standard_normal(4)
    to = rng.standard_normal(3)
    feats = torch.as_tensor(prop.white.features(theta, res))
    w = prop.white.whiten_move(to, theta)[0] / prop.config.base_step
    actors = MultiAgentActors(prop.config)
    # Rebuild torch actors from the numpy copy's weights to compare the two evaluations.
    with torch.no_grad():
        for a, (_, _, layers) in zip(actors.actors, prop.layers):
            for m, (wt, b) in zip([m for m in a.net if isinstance(m, torch.nn.Linear)], layers):
                m.weight.copy_(torch.as_tensor(wt))
                m.bias.copy_(torch.as_tensor(b))
        logq_t = float(actors.double().log_density_white(torch.as_tensor(w)[None], feats.double())[0])
    const = -np.log(np.diag(prop.white.chol)).sum() - 3 * np.log(prop.config.base_step) - 1.5 * np.log(2 * np.pi)
    assert prop.log_density_learned(to, theta, res) == pytest.approx(logq_t + const, rel=1e-9)
    # Normalized: importance-sampling estimate of ∫ q(θ'|θ) dθ' under a wide Gaussian is 1.
    wide = stats.multivariate_normal(theta, 9 * COV)
    xs = wide.rvs(40000, random_state=2)
    vals = np.exp([prop.log_density(x, theta, res) for x in xs] - wide.logpdf(xs))
    assert vals.mean() == pytest.approx(1.0, abs=4 * vals.std() / np.sqrt(xs.shape[0]))


class _OverNoHastings(LinearGaussianProposal):
    def log_ratio(self, theta, theta_new, misfit, misfit_new):
        return 0.0


def test_over_relaxed_gpcn_is_exact_and_its_no_hastings_control_fails():
    """Over-relaxed gpCN around a deliberately wrong Gaussian (m - 0.2, 1.2² C): the full Hastings ratio
    keeps the exact posterior invariant; dropping it leaves N(m - 0.2, 1.44 C) invariant instead (fails)."""
    args = (1.2 * CHOL, 0.8)
    kw = dict(mean=MEAN - 0.2, kind="gpcn-over")
    assert _stationarity_z(LinearGaussianProposal(*args, **kw), n=1500, steps=10) < 4.0
    assert _stationarity_z(_OverNoHastings(*args, **kw), n=1500, steps=10) > 8.0
    # Its mean map reflects through the centre: ρ = -sqrt(1 - β²).
    prop = LinearGaussianProposal(*args, **kw)
    np.testing.assert_allclose(prop._mean(MEAN + 1.0), MEAN - 0.2 - 0.6 * (1.2 * np.ones(3)), atol=1e-12)


def test_am_adapts_in_burn_in_then_freezes():
    fine, _ = _posteriors(1)
    prop = AdaptiveMetropolisProposal(3, 2.38 / np.sqrt(3), chol=0.05 * np.eye(3))
    res = run_chain(fine, prop, MEAN, 200, np.random.default_rng(0), n_burn=3000)
    # The caller's object is untouched (each chain adapts a copy); the adapted covariance is near COV.
    assert np.allclose(prop.chol, 0.05 * np.eye(3))
    assert res.accept_stage1 > 0.1


def test_proposal_bad_inputs_raise():
    with pytest.raises(ValueError, match="lower triangular"):
        LinearGaussianProposal(np.ones((3, 3)), 1.0)
    with pytest.raises(ValueError, match="kind"):
        LinearGaussianProposal(np.eye(3), 1.0, kind="hmc")
    with pytest.raises(ValueError, match="gpcn"):
        LinearGaussianProposal(np.eye(3), 1.5, kind="gpcn")
    with pytest.raises(ValueError, match="weight"):
        MixtureProposal([RandomWalkProposal(3, 0.1)], [0.5, 0.5])
    with pytest.raises(ValueError, match="safe_weight"):
        MARLConfig(dim=3, n_agents=2, safe_weight=0.0)
    with pytest.raises(ValueError, match="n > d"):
        cholesky_of_draws(np.zeros((2, 3)))
