"""The issue-14 comparison protocol: bootstrap ratio, cached resumable units, summary schema, MARL
training bookkeeping, the channel-geometry benchmark field, and the quick CLI."""

import json
import os

import numpy as np
import pytest
import torch

from rlmcmc.forward import PermeabilityModel, Q1Mesh
from rlmcmc.marl import MARLConfig, MARLTrainConfig, MultiAgentActors, Whitening, jacobian_fd, train_marl
from rlmcmc.protocol import Protocol, Runner, bootstrap_ratio, write_outputs
from rlmcmc.sampling import LinearForward, Posterior, linear_gaussian_posterior

G = np.array([[1.0, 0.5, 0.0], [0.0, 1.0, -0.7], [0.3, 0.0, 1.2], [1.0, 1.0, 1.0]])
Y = np.array([0.4, -0.3, 1.1, 0.8])


def test_bootstrap_ratio_of_means():
    ratio, ci = bootstrap_ratio([2.0, 2.2, 1.8, 2.0, 2.0], [1.0, 1.1, 0.9, 1.0, 1.0])
    assert ratio == pytest.approx(2.0)
    assert ci[0] < 2.0 < ci[1] and ci[0] > 1.5
    _, ci_same = bootstrap_ratio([1.0, 1.2, 0.8], [1.0, 1.2, 0.8])
    assert ci_same[0] < 1.0 < ci_same[1]
    with pytest.raises(ValueError, match="2 replicates"):
        bootstrap_ratio([1.0], [1.0, 2.0])


def test_jacobian_fd_of_linear_model_is_exact():
    post = Posterior(LinearForward(G), Y, 0.5)
    np.testing.assert_allclose(jacobian_fd(post, np.zeros(3)), G / 0.5, atol=1e-8)
    assert post.n_evals == 4  # d + 1 solves, counted


def test_marl_training_counts_solves_and_trains_state_dependent_actors():
    fine = Posterior(LinearForward(G), Y, 0.5)
    coarse = Posterior(LinearForward(G * 1.1 + 0.05), Y, 0.5)
    mean, cov = linear_gaussian_posterior(G, Y, 0.5)
    cfg = MARLConfig(dim=3, n_agents=2, base_step=0.8)
    train = MARLTrainConfig(n_envs=8, n_iters=15, cost_coarse=0.1, seed=0)
    actors, hist = train_marl(fine, coarse, cfg, Whitening(mean, np.linalg.cholesky(cov), G / 0.5), train,
                              np.tile(mean, (8, 1)))
    assert hist["coarse_solves"] == 8 * 16  # one per env at the start, then one per env and iteration
    assert 8 <= hist["fine_solves"] <= 8 * 16
    assert len(hist["reward"]) == 15 and np.all(np.isfinite(hist["reward"]))
    # The state-dependent last layers moved away from their zero initialization.
    assert any(float(a.net[-1].weight.abs().sum()) > 0 for a in actors.actors)
    with pytest.raises(ValueError, match="gamma"):
        train_marl(fine, coarse, cfg, Whitening(mean, np.eye(3), G), MARLTrainConfig(n_envs=8, gamma=0.0),
                   np.zeros((8, 3)))


def test_actors_only_see_their_local_state():
    actors = MultiAgentActors(MARLConfig(dim=4, n_agents=2))
    with torch.no_grad():
        for a in actors.actors:
            a.net[-1].weight.normal_()
    feats = torch.randn(1, 9)
    base_delta, _ = actors(feats)
    moved = feats.clone()
    moved[0, 0] += 1.0  # agent 0's x; agent 1 (coordinates 2, 3) must not react
    delta, _ = actors(moved)
    assert not torch.allclose(delta[0, :2], base_delta[0, :2])
    assert torch.allclose(delta[0, 2:], base_delta[0, 2:])


def test_channel_geometry_unknowns_move_the_channels_continuously():
    model = PermeabilityModel(dim=4, geometry=True)
    assert model.n_unknowns == 6
    fmap = model.field_map(Q1Mesh(32))
    theta = np.zeros(6)
    base = fmap.log_kappa(theta)
    theta[4] = 1.0  # shift channel 0 by 0.05
    moved = fmap.log_kappa(theta)
    assert np.abs(moved - base).max() > 0.5 * np.log(model.contrast)
    theta[4] = 1e-4  # continuity in the shift
    assert np.abs(fmap.log_kappa(theta) - base).max() < 0.05
    # Without geometry the field is unchanged from the original channelized model.
    plain = PermeabilityModel(dim=4)
    assert plain.n_unknowns == 4 and set(np.unique(plain.background(Q1Mesh(8).centers))) <= {0.0, np.log(1e3)}


def _tiny_protocol(**kw):
    base = dict(benchmark="tiny", methods=("rw-cov", "indep", "marl"), levels=(2,), n_chains=2, n_samples=150,
                n_burn=50, n_replicates=2, targets=(0.2, 0.4), inflations=(1.2,), sweep_chains=2, sweep_samples=100,
                pilot_steps=300, train_iters=5, train_envs=4, n_agents=2)
    base.update(kw)
    return Protocol(**base)


def test_runner_caches_units_resumes_and_writes_summary(tmp_path):
    runner = Runner(_tiny_protocol(), str(tmp_path / "tiny"), log=lambda line: None)
    summary = runner.execute()
    unit = tmp_path / "tiny" / "units" / "run" / "marl-2" / "rep1.json"
    stamp = os.path.getmtime(unit)
    lines = []
    Runner(_tiny_protocol(), str(tmp_path / "tiny"), log=lines.append).execute()  # resumes: nothing recomputed
    assert os.path.getmtime(unit) == stamp and all("cached" in line for line in lines if "units" in line)
    assert summary["replicates"] == 2 and summary["complete"]
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"rw-cov-2", "indep-2", "marl-2"}
    for r in rows.values():
        assert len(r["ess_per_cost"]) == 2 and r["max_rhat"] > 0.9 and isinstance(r["tuned_for"], str)
        assert all(c >= 0 for c in r["ess_per_cost"])  # 0 where a chain never moved
    assert all(c > 0 for c in rows["rw-cov-2"]["ess_per_cost"] + rows["marl-2"]["ess_per_cost"])
    assert rows["marl-2"]["rl"] and not rows["rw-cov-2"]["rl"]
    # The swept setting is the best sweep entry by ESS per fine-solve equivalent.
    sweep = rows["rw-cov-2"]["sweep"]
    assert rows["rw-cov-2"]["setting"] == pytest.approx(float(max(sweep, key=sweep.get)))
    cmp = summary["rl_vs_best_baseline"]
    best = max((r for r in rows.values() if not r["rl"]), key=lambda r: np.mean(r["ess_per_cost"]))
    assert cmp["best_baseline"] == best["method"]
    assert cmp["ratio"] == pytest.approx(np.mean(rows["marl-2"]["ess_per_cost"]) / np.mean(best["ess_per_cost"]))
    write_outputs(str(tmp_path), {"tiny": summary})
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert {"replicates", "rows", "rl_vs_best_baseline"} <= set(saved)
    assert {"method", "rl", "tuned_for", "ess_per_cost", "max_rhat"} <= set(saved["rows"][0])
    assert (tmp_path / "summary.png").stat().st_size > 5000


def test_enhanced_error_rows_use_the_corrected_coarse_level_and_count_its_offline_cost(tmp_path):
    from rlmcmc.aem import CorrelatedErrorPosterior

    proto = _tiny_protocol(methods=("gpcn",), aem_methods=("gpcn+aem", "marl-gpcn+aem"), aem_pairs=10)
    runner = Runner(proto, str(tmp_path / "tiny"), log=lambda line: None)
    summary = runner.execute()
    rows = {r["method"]: r for r in summary["rows"]}
    assert set(rows) == {"gpcn-2", "gpcn+aem-2", "marl-gpcn+aem-2"}
    assert rows["gpcn+aem-2"]["enhanced_error_model"] and not rows["gpcn-2"]["enhanced_error_model"]
    assert rows["marl-gpcn+aem-2"]["rl"] and not rows["gpcn+aem-2"]["rl"]
    _, first = runner.posteriors("gpcn+aem")
    assert isinstance(first, CorrelatedErrorPosterior) and not isinstance(runner.posteriors("gpcn")[1],
                                                                          CorrelatedErrorPosterior)
    aem = json.loads((tmp_path / "tiny" / "units" / "aem.json").read_text())
    assert aem["fine_solves"] == 10
    off = summary["offline"]
    assert off["aem_fine_equiv"] == pytest.approx(runner.cost(10, aem["coarse_solves"]))
    assert off["marl_aem_training_fine_equiv"] > 0
    # The RL proposal is built on the tuned gpCN geometry: base kernel gpcn, β₀ = the tuned gpcn+aem-2 step.
    prop = runner.proposal("marl-gpcn+aem", float("nan"), 0)[0]
    assert prop.config.base == "gpcn"
    assert prop.config.base_step == pytest.approx(min(0.995, runner.best_setting("gpcn+aem-2")["step"]))
    np.testing.assert_allclose(prop.white.mean, aem["pilot_mean"])
    assert summary["rl_vs_best_baseline"]["method"] == "marl-gpcn+aem-2"
    # Amortized offline cost of a +aem row includes the error model's solves.
    r = rows["gpcn+aem-2"]
    assert all(a < b for a, b in zip(r["ess_per_cost_amortized"], r["ess_per_cost"]))


def test_transient_benchmark_runs_two_level_rows_on_the_transient_problem(tmp_path):
    proto = _tiny_protocol(benchmark="tiny-transient", methods=("rw-cov",), aem_methods=("gpcn+aem",),
                           aem_pairs=10)
    runner = Runner(proto, str(tmp_path / "tt"), log=lambda line: None)
    assert runner.problem.fine.kind == "transient" and runner.problem.coarse.kind == "transient"
    summary = runner.execute()
    assert summary["complete"] and {r["method"] for r in summary["rows"]} == {"rw-cov-2", "gpcn+aem-2"}
    assert all(c > 0 for r in summary["rows"] for c in r["ess_per_cost"])
    assert summary["offline"]["common_fine_equiv"] > 0 and summary["protocol"]["benchmark"] == "tiny-transient"


def test_cached_unit_of_another_chain_length_is_refused(tmp_path):
    """Regression: the kl32-channels units of a 600-draw run would have been read as units of the longer run."""
    Runner(_tiny_protocol(methods=("rw-cov",)), str(tmp_path / "t"), log=lambda line: None).execute()
    longer = Runner(_tiny_protocol(methods=("rw-cov",), n_samples=200), str(tmp_path / "t"), log=lambda line: None)
    with pytest.raises(ValueError, match="remove the stale units"):
        longer.run_unit("rw-cov-2", 0)
    with pytest.raises(ValueError, match="chains x draws"):
        Runner(_tiny_protocol(methods=("rw-cov",), sweep_samples=120), str(tmp_path / "t"),
               log=lambda line: None).sweep_unit("rw-cov-2", 0.2)


@pytest.mark.slow
def test_cli_compare_quick(tmp_path):
    from rlmcmc.cli import main

    main(["compare", "--quick", "--out", str(tmp_path)])
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert len(saved["rows"]) == 14 and saved["replicates"] == 2  # 6 methods x 2 levels + 2 enhanced-error rows
    # The transient benchmark runs in the same quick mode, with the same rows.
    assert set(saved["benchmarks"]) == {"tiny", "tiny-transient"}
    transient = saved["benchmarks"]["tiny-transient"]
    assert transient["protocol"]["benchmark"] == "tiny-transient" and transient["replicates"] == 2
    assert [r["method"] for r in transient["rows"]] == [r["method"] for r in saved["rows"]]
    assert "tiny-transient" in (tmp_path / "summary.md").read_text()


def test_summary_gives_zero_ess_to_a_chain_that_never_moved():
    """Regression: an independence proposal that never accepted got a finite ArviZ ESS and was picked as
    the best baseline on kl32-channels."""
    from rlmcmc.diagnostics import summarize
    from rlmcmc.sampling import ChainResult

    rng = np.random.default_rng(0)
    moving = ChainResult(rng.standard_normal((200, 2)), np.zeros(200), 10, 0, 1.0, 0.5, float("nan"))
    stuck = ChainResult(np.zeros((200, 2)), np.zeros(200), 10, 0, 1.0, 0.0, float("nan"))
    s = summarize([moving, stuck])
    assert s["stuck_chains"] == 1 and s["ess_min"] == 0.0 and s["tail_ess_min"] == 0.0
    assert summarize([moving, moving])["ess_min"] > 0
