"""Samplers against a linear-Gaussian posterior with a closed form; two-level vs single-level on Darcy."""

import numpy as np
import pytest
import torch

from rlmcmc.diagnostics import ess_rhat, summarize
from rlmcmc.proposals import PCNProposal, RandomWalkProposal, make_proposal
from rlmcmc.rl import AgentConfig, MultiAgentPolicy, RLProposal, misfit_feature
from rlmcmc.sampling import LinearForward, Posterior, linear_gaussian_posterior, mh_accept, run_chain, run_chains

G = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, -0.7], [0.3, 0.0, 1.2], [1.0, 1.0, 1.0]])
Y = np.array([0.4, -0.3, 1.1, 0.8])
SIGMA = 0.5


def _check_moments(draws, n_ess):
    mean, cov = linear_gaussian_posterior(G, Y, SIGMA)
    sd = np.sqrt(np.diag(cov))
    # Monte-Carlo standard error of the mean is sd / sqrt(ESS); allow 4.5 standard errors.
    np.testing.assert_array_less(np.abs(draws.mean(axis=0) - mean), 4.5 * sd / np.sqrt(n_ess))
    emp = np.cov(draws.T)
    # Covariance entries: standard error ≈ sqrt((Σii Σjj + Σij²) / ESS).
    se = np.sqrt((np.outer(sd**2, sd**2) + cov**2) / n_ess)
    np.testing.assert_array_less(np.abs(emp - cov), 5 * se)


def _random_policy(dim, seed=0):
    """Untrained but non-trivial, *state-dependent* actors: m ≠ 0, full lower-triangular S ≠ β I, per-block
    β, state-dependent step factor and drift, so the proposal is neither symmetric nor prior-reversible."""
    torch.manual_seed(seed)
    policy = MultiAgentPolicy(AgentConfig(dim=dim, n_agents=2, beta0=0.5, delta_max=0.5))
    with torch.no_grad():
        for actor in policy.actors:
            actor.mean_raw.normal_(0, 0.3)
            actor.log_diag.copy_(torch.log(torch.full_like(actor.log_diag, 0.4)) + 0.2 * torch.randn_like(actor.log_diag))
            actor.rows.normal_(0, 0.15)
            actor.beta_logit.add_(torch.randn(()))
            actor.net[-1].weight.normal_(0, 0.3)
            actor.net[-1].bias.normal_(0, 0.2)
    return policy


@pytest.mark.parametrize("kind", ["rw", "pcn", "rl"])
@pytest.mark.parametrize("levels", [1, 2])
def test_recovers_linear_gaussian_posterior(kind, levels):
    fine = Posterior(LinearForward(G), Y, SIGMA)
    # A deliberately wrong coarse model: delayed acceptance must still target the fine posterior.
    coarse = Posterior(LinearForward(G * 1.1 + 0.05), Y, SIGMA) if levels == 2 else None
    proposal = RLProposal(_random_policy(3)) if kind == "rl" else make_proposal(kind, 3, 0.5)
    chains = run_chains(fine, proposal, 2, 5000, seed=3, coarse=coarse, n_burn=500, tune=kind != "rl",
                        progress=False)
    draws = np.concatenate([c.samples for c in chains])
    ess, rhat = ess_rhat(np.stack([c.samples for c in chains]))
    assert rhat.max() < 1.05
    _check_moments(draws, ess.min())
    if levels == 2:
        assert all(c.fine_solves < c.coarse_solves for c in chains)
        assert all(0 < c.accept_stage2 < 1 for c in chains)


# ---- the one Metropolis–Hastings accept step ------------------------------------------------------
LOG_RATIOS = np.array([np.nan, -np.inf, np.inf, 0.0, np.log(0.3), 5.0, -2.0])
ALPHAS = np.array([0.0, 0.0, 1.0, 1.0, 0.3, 1.0, np.exp(-2.0)])


def test_mh_accept_is_u_below_min_one_exp_ratio():
    rng, ref = np.random.default_rng(4), np.random.default_rng(4)
    accept, alpha = mh_accept(LOG_RATIOS, rng)
    np.testing.assert_allclose(alpha, ALPHAS, rtol=1e-15)
    assert accept.dtype == bool and np.array_equal(accept, ref.random(len(LOG_RATIOS)) < alpha)
    assert rng.random() == ref.random()  # exactly one uniform per entry


def test_mh_accept_scalar_and_array_draw_the_same_stream():
    a, b = np.random.default_rng(9), np.random.default_rng(9)
    one_by_one = [mh_accept(x, a) for x in LOG_RATIOS]
    accept, alpha = mh_accept(LOG_RATIOS, b)
    assert [ok for ok, _ in one_by_one] == accept.tolist() and [p for _, p in one_by_one] == alpha.tolist()
    assert all(type(ok) is bool and type(p) is float for ok, p in one_by_one)
    assert a.random() == b.random()


def test_mh_accept_edges():
    rng = np.random.default_rng(0)
    # a zero-density current state (ratio +inf) is always left; a NaN ratio never accepted (it used to be
    # rejected in the scalar sampler but accepted at stage 2 of the MARL training loop)
    assert all(mh_accept(np.inf, rng) == (True, 1.0) for _ in range(100))
    assert all(mh_accept(np.nan, rng) == (False, 0.0) for _ in range(100))
    assert all(mh_accept(-np.inf, rng) == (False, 0.0) for _ in range(100))
    assert mh_accept(np.full((2, 3), 0.0), rng)[0].shape == (2, 3)


def test_mh_accept_frequency():
    accept, _ = mh_accept(np.full(40000, np.log(0.3)), np.random.default_rng(1))
    assert abs(accept.mean() - 0.3) < 4 * np.sqrt(0.3 * 0.7 / 40000)


def test_wrong_hastings_term_is_detected():
    """Control: dropping q(θ|θ')/q(θ'|θ) for the non-symmetric RL proposal gives a wrong posterior,
    so the moment check above can fail."""

    class NoHastings(RLProposal):
        def log_ratio(self, theta, theta_new, misfit, misfit_new):
            return 0.0

    fine = Posterior(LinearForward(G), Y, SIGMA)
    chains = run_chains(fine, NoHastings(_random_policy(3)), 2, 6000, seed=3, n_burn=500, progress=False)
    draws = np.concatenate([c.samples for c in chains])
    ess, _ = ess_rhat(np.stack([c.samples for c in chains]))
    with pytest.raises(AssertionError):
        _check_moments(draws, ess.min())


def test_proposal_densities_are_normalized_gaussians():
    rng = np.random.default_rng(0)
    theta, to = rng.standard_normal(3), rng.standard_normal(3)
    rw, pcn = RandomWalkProposal(3, 0.3), PCNProposal(3, 0.3)
    expect_rw = -0.5 * np.sum((to - theta) ** 2) / 0.09 - 3 * np.log(0.3) - 1.5 * np.log(2 * np.pi)
    assert rw.log_density(to, theta, 0.0) == pytest.approx(expect_rw)
    m = np.sqrt(1 - 0.09) * theta
    expect_pcn = -0.5 * np.sum((to - m) ** 2) / 0.09 - 3 * np.log(0.3) - 1.5 * np.log(2 * np.pi)
    assert pcn.log_density(to, theta, 0.0) == pytest.approx(expect_pcn)
    # pCN is reversible w.r.t. N(0, I): q(θ|θ')/q(θ'|θ) = N(θ')/N(θ)... i.e. prior ratio.
    assert pcn.log_ratio(theta, to, 0, 0) == pytest.approx(-0.5 * theta @ theta + 0.5 * to @ to)
    assert rw.log_ratio(theta, to, 0, 0) == pytest.approx(0.0)


def test_untrained_rl_policy_is_exactly_pcn():
    policy = MultiAgentPolicy(AgentConfig(dim=5, n_agents=2, beta0=0.3))
    rl, pcn = RLProposal(policy), PCNProposal(5, 0.3)
    rng = np.random.default_rng(1)
    theta, to = rng.standard_normal(5), rng.standard_normal(5)
    m_rl, s_rl = rl.mean_std(theta, 12.0)
    m_pc, s_pc = pcn.mean_std(theta, 12.0)
    np.testing.assert_allclose(m_rl, m_pc, rtol=1e-6)
    np.testing.assert_allclose(s_rl, s_pc, rtol=1e-6)
    assert rl.log_density(to, theta, 12.0) == pytest.approx(pcn.log_density(to, theta, 12.0), rel=1e-6)


def test_numpy_actor_matches_torch_policy():
    policy = _random_policy(6, seed=9).double()
    rl = RLProposal(policy)
    rng = np.random.default_rng(4)
    theta, to = rng.standard_normal(6), rng.standard_normal(6)
    state = torch.as_tensor(np.concatenate([theta, [misfit_feature(7.5)]]))[None]
    with torch.no_grad():
        mean_t, fac_t, _ = policy.proposal(state)
        logq_t = policy.log_density(torch.as_tensor(to)[None], state)
    mean, fac = rl.mean_factor(theta, 7.5)
    np.testing.assert_allclose(mean, mean_t[0].numpy(), rtol=1e-12)
    np.testing.assert_allclose(fac, fac_t[0].numpy(), rtol=1e-12)
    assert rl.log_density(to, theta, 7.5) == pytest.approx(float(logq_t[0]), rel=1e-10)


def test_rl_density_matches_full_covariance_gaussian():
    from scipy.stats import multivariate_normal

    policy = _random_policy(4, seed=5)
    rl = RLProposal(policy)
    rng = np.random.default_rng(2)
    theta, to = rng.standard_normal(4), rng.standard_normal(4)
    mean, fac = rl.mean_factor(theta, 3.0)
    cov = (fac[:, None] * rl.chol) @ (fac[:, None] * rl.chol).T
    assert np.abs(cov - np.diag(np.diag(cov))).max() > 1e-3  # genuinely correlated proposal
    assert rl.log_density(to, theta, 3.0) == pytest.approx(multivariate_normal(mean, cov).logpdf(to))
    # Sampling follows that covariance.
    draws = np.array([rl.sample(theta, 3.0, rng) for _ in range(20000)])
    np.testing.assert_allclose(np.cov(draws.T), cov, atol=0.05 * np.abs(cov).max())
    # State dependence: a different misfit feature changes the proposal.
    assert not np.allclose(rl.mean_factor(theta, 300.0)[0], mean)


def test_trained_policy_is_exact_two_level():
    """A policy trained on a (wrong) coarse linear model, used frozen in two-level MH, recovers the
    exact fine posterior."""
    from rlmcmc.rl import TrainConfig, train_agents

    fine = Posterior(LinearForward(G), Y, SIGMA)
    coarse = Posterior(LinearForward(G * 1.1 + 0.05), Y, SIGMA)
    policy, _ = train_agents(coarse, AgentConfig(dim=3, n_agents=2, beta0=0.3, hidden=16),
                             TrainConfig(n_envs=16, n_iters=60, actor_steps=5, critic_steps=5, batch_size=256, seed=1),
                             scale=np.full(3, 0.3), progress=False)
    rl = RLProposal(policy)
    assert not np.allclose(rl.chol, 0.3 * np.eye(3))  # training moved it away from pCN
    # Start in the bulk, from coarse-posterior draws, as the benchmark's pilot protocol does. (From a far
    # prior draw an independence-like DA chain can stay stuck: where π_f/π_c is much larger than in the
    # bulk, stage 2 rejects every jump into the bulk. Exact, but no burn-in.)
    m_c, c_c = linear_gaussian_posterior(G * 1.1 + 0.05, Y, SIGMA)
    init = np.random.default_rng(0).multivariate_normal(m_c, c_c, 4)
    chains = run_chains(fine, rl, 4, 4000, seed=4, coarse=coarse, n_burn=200, init=init, progress=False)
    draws = np.stack([c.samples for c in chains])
    ess, rhat = ess_rhat(draws)
    assert rhat.max() < 1.05
    _check_moments(draws.reshape(-1, 3), ess.min())


def test_tuning_reaches_target_acceptance():
    fine = Posterior(LinearForward(G), Y, SIGMA)
    res = run_chain(fine, make_proposal("rw", 3, 5.0), np.zeros(3), 4000, np.random.default_rng(0),
                    n_burn=3000, tune=True)
    assert 0.17 < res.accept_stage1 < 0.33
    assert res.step < 5.0


def test_summary_counts_solves_and_ess():
    fine = Posterior(LinearForward(G), Y, SIGMA)
    coarse = Posterior(LinearForward(G), Y, SIGMA)
    chains = run_chains(fine, make_proposal("pcn", 3, 0.4), 2, 500, coarse=coarse, progress=False)
    s = summarize(chains)
    # Identical coarse and fine models: stage 2 always accepts, one fine solve per stage-1 accept.
    assert s["accept_stage2"] == 1.0
    assert s["fine_solves"] == sum(round(c.accept_stage1 * 500) for c in chains)
    assert s["ess_per_fine_solve"] == pytest.approx(s["ess_min"] / s["fine_solves"])
    assert s["n_chains"] == 2 and s["n_draws"] == 500


def test_bad_inputs_raise():
    fine = Posterior(LinearForward(G), Y, SIGMA)
    with pytest.raises(ValueError, match="theta"):
        fine.evaluate(np.zeros(4))
    with pytest.raises(ValueError, match="noise_std"):
        Posterior(LinearForward(G), Y, 0.0)
    with pytest.raises(ValueError, match="pcn"):
        PCNProposal(3, 1.5)
    with pytest.raises(ValueError, match="unknown proposal"):
        make_proposal("hmc", 3, 0.1)
    with pytest.raises(ValueError, match="n_chains"):
        run_chains(fine, make_proposal("rw", 3, 0.1), 0, 10)
    with pytest.raises(ValueError, match="theta0"):
        run_chain(fine, make_proposal("rw", 3, 0.1), np.zeros(2), 10, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shape"):
        ess_rhat(np.zeros((10, 3)))


@pytest.mark.slow
def test_two_level_matches_single_level_on_small_darcy():
    """Acceptance 2: delayed acceptance (GMsFEM first stage) and plain MH agree within MC error."""
    from rlmcmc.problem import ProblemConfig, make_problem

    problem = make_problem(ProblemConfig(n_fine=32, n_coarse=4, n_basis=4, dim=4, noise_level=0.05, seed=2))
    problem.calibrate_error_model(10)
    out = {}
    for levels in (1, 2):
        fine, coarse = problem.posteriors()
        chains = run_chains(fine, make_proposal("pcn", 4, 0.2), 4, 3000, seed=7,
                            coarse=coarse if levels == 2 else None, n_burn=500, tune=True, progress=False)
        draws = np.stack([c.samples for c in chains])
        ess, rhat = ess_rhat(draws)
        assert rhat.max() < 1.05
        flat = draws.reshape(-1, 4)
        out[levels] = (flat.mean(0), flat.std(0), ess)
    (m1, s1, e1), (m2, s2, e2) = out[1], out[2]
    se = np.sqrt(s1**2 / e1 + s2**2 / e2)
    np.testing.assert_array_less(np.abs(m1 - m2), 4 * se)
    np.testing.assert_allclose(s1, s2, rtol=0.25)
