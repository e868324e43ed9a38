"""Multi-agent actor-critic: blocks, critic, training loop, checkpoint round trip."""

import numpy as np
import pytest
import torch

from rlmcmc.proposals import PCNProposal
from rlmcmc.rl import (AgentConfig, CentralCritic, MultiAgentPolicy, RLProposal, TrainConfig, agent_blocks,
                       coarse_esjd, load_policy, train_agents)
from rlmcmc.sampling import LinearForward, Posterior

G = np.array([[2.0, 0.0, 0.0, 0.0], [0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 3.0, 1.0]])


def test_blocks_partition_parameters():
    blocks = agent_blocks(10, 3)
    assert [b.tolist() for b in blocks] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]
    with pytest.raises(ValueError, match="n_agents"):
        agent_blocks(4, 5)


def test_critic_sees_all_agents_actions():
    critic = CentralCritic(4)
    state, action = torch.zeros(2, 5), torch.full((2, 4), 0.1)
    base = critic(state, action)
    action[:, 3] = 0.5  # the last agent's action alone changes Q
    assert base.shape == (2,)
    assert not torch.allclose(critic(state, action), base)


def test_each_actor_controls_only_its_block():
    policy = MultiAgentPolicy(AgentConfig(dim=6, n_agents=3, beta0=0.2))
    with torch.no_grad():
        policy.actors[1].net[-1].bias[0] = 1.0  # agent 1 owns θ[2:4]: log step factor +1
        policy.actors[1].mean_raw.fill_(0.7)
    rl = RLProposal(policy)
    mean, std = rl.mean_std(np.zeros(6), 1.0)
    assert np.allclose(std[[0, 1, 4, 5]], 0.2) and np.allclose(mean[[0, 1, 4, 5]], 0.0)
    assert np.allclose(std[2:4], 0.2 * np.e) and np.all(mean[2:4] > 0)


def test_coupling_controls_cross_block_rows():
    for coupled in (True, False):
        policy = MultiAgentPolicy(AgentConfig(dim=6, n_agents=3, beta0=0.2, coupled=coupled))
        with torch.no_grad():
            for a in policy.actors:
                a.rows.fill_(0.3)
            chol = policy.chol().numpy()
        assert np.allclose(np.triu(chol, 1), 0.0)  # always lower triangular
        assert (chol[2, 0] != 0) == coupled  # agent 1's row weights agent 0's noise only when coupled
        assert chol[1, 0] == pytest.approx(0.3)  # within a block: always free


def test_training_improves_coarse_esjd_over_pcn_init_and_checkpoint_round_trips(tmp_path):
    post = Posterior(LinearForward(G), np.array([0.3, -0.2, 1.0]), 0.1)
    ckpt = tmp_path / "policy.pt"
    init = np.random.default_rng(1).normal(0.0, 0.1, (16, 4))
    policy, hist = train_agents(post, AgentConfig(dim=4, n_agents=2, beta0=0.05, hidden=16),
                                TrainConfig(n_envs=16, n_iters=80, actor_steps=5, critic_steps=5, batch_size=256, seed=0),
                                init=init, scale=np.full(4, 0.2), progress=False, checkpoint=str(ckpt))
    assert len(hist["reward"]) == 80 and hist["coarse_solves"] == 16 * 81
    # β₀ = 0.05 pCN is far too timid for this posterior: the agents must learn to move further.
    assert np.mean(hist["reward"][-20:]) > 3 * np.mean(hist["reward"][:10])
    pcn = coarse_esjd(post, PCNProposal(4, 0.05), init[:4], 200, np.full(4, 0.2), seed=3)
    trained = coarse_esjd(post, RLProposal(policy), init[:4], 200, np.full(4, 0.2), seed=3)
    assert trained["esjd"] > 3 * pcn["esjd"]
    loaded = load_policy(str(ckpt))
    theta = np.array([0.1, -0.4, 0.3, 0.2])
    a, b = RLProposal(policy).mean_std(theta, 2.0), RLProposal(loaded).mean_std(theta, 2.0)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])


def test_bad_configuration_raises():
    with pytest.raises(ValueError, match="beta0"):
        MultiAgentPolicy(AgentConfig(dim=4, beta0=1.2))
    post = Posterior(LinearForward(G), np.zeros(3), 0.2)
    with pytest.raises(ValueError, match="dim"):
        train_agents(post, AgentConfig(dim=5, n_agents=2), progress=False)
    with pytest.raises(ValueError, match="scale"):
        train_agents(post, AgentConfig(dim=4, n_agents=2), TrainConfig(n_iters=1), scale=np.ones(3), progress=False)
    with pytest.raises(ValueError, match="reward"):
        train_agents(post, AgentConfig(dim=4, n_agents=2), TrainConfig(n_iters=1, reward="ess"), progress=False)
    with pytest.raises(ValueError, match="init"):
        train_agents(post, AgentConfig(dim=4, n_agents=2), TrainConfig(n_iters=1, n_envs=4), init=np.zeros((3, 4)),
                     progress=False)


def test_min_block_reward_is_the_worst_block():
    post = Posterior(LinearForward(G), np.array([0.3, -0.2, 1.0]), 0.2)
    rewards = {}
    for reward in ("esjd", "min-block"):
        _, hist = train_agents(post, AgentConfig(dim=4, n_agents=2, beta0=0.05, hidden=16),
                               TrainConfig(n_envs=8, n_iters=3, batch_size=64, reward=reward), progress=False)
        rewards[reward] = hist["reward"]
    # Same seed, so the first iteration proposes the same moves: the worst block's mean whitened jump is
    # below the all-coordinate mean (a weighted average of the block means).
    assert 0 < rewards["min-block"][0] < rewards["esjd"][0]
