"""Multi-agent actor-critic proposals for MCMC (PyTorch).

Implements the idea of *Multi-agent reinforcement learning accelerated MCMC on multiscale inversion
problems* (Chung, Efendiev, Leung, Pun, Zhang): several agents each own a block of the KL coefficients θ;
agent k's actor maps the state to a Gaussian proposal for its block, and one centralized critic
Q(s, a_1, ..., a_K) sees the whole state and all actions (MADDPG, Lowe et al., NeurIPS 2017).

State ``s = (θ, log(1 + Φ_c(θ)) / 10)`` with Φ_c the first-level (coarse) misfit: the misfit tells the
actor whether the chain is still far from the posterior bulk (burn-in) or inside it.

Action of agent k (deterministic, MADDPG-style): raw outputs ``a_k = (u_k, v_k)`` for its block B_k, giving
the pCN-like proposal

    θ'_{B_k} = sqrt(1 - β_k²) θ_{B_k} + δ_k + β_k ξ,
    β_k = sigmoid(v_k + logit β₀),  δ_k = δ_max β_k tanh(u_k).

The last actor layer starts at zero, so an untrained policy *is* pCN with step β₀ (inductive bias around
the prior); training can then learn per-block, state-dependent step sizes and drifts.

Reward (coarse model only): the Rao–Blackwellized, whitened expected squared jump distance
``r = α_c(θ, θ') Σ_i ((θ'_i - θ_i) / s_i)² / d``, with α_c the first-stage acceptance probability
*including* the Hastings term of this proposal and s_i a per-coordinate scale (coarse-posterior std from
a pilot chain). It rewards large moves that are still accepted — the quantity that drives ESS — and,
unlike the indicator, has low variance. Without whitening (s_i = β₀) the agents learned to make huge
jumps in the weakly-informed block at the price of 4% acceptance (min-ESS fell), see docs/rlmcmc.md.
``TrainConfig.reward = "min-block"`` instead rewards the worst agent block's whitened jump.
The critic learns ``Q = E[r + γ Q'(s', μ(s'))]``
with target networks; actors ascend ``Q(s, μ_1(s), ..., μ_K(s))``.

After training the actors are frozen; :class:`RLProposal` evaluates both q(θ'|θ) and q(θ|θ') with
them, so the MH/DA chain stays exact.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .proposals import GaussianProposal


def misfit_feature(misfit):
    """Scaled log-misfit fed to the actors and critic."""
    return np.log1p(np.maximum(np.asarray(misfit, dtype=float), 0.0)) / 10.0


def agent_blocks(dim: int, n_agents: int) -> list[np.ndarray]:
    """Split KL indices 0..dim-1 (ordered by decreasing eigenvalue) into ``n_agents`` contiguous blocks."""
    if not 1 <= n_agents <= dim:
        raise ValueError(f"n_agents must be in 1..dim={dim}, got {n_agents}")
    return [np.asarray(b) for b in np.array_split(np.arange(dim), n_agents)]


def _mlp(n_in: int, hidden: int, n_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(n_in, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                         nn.Linear(hidden, n_out))


@dataclass
class AgentConfig:
    dim: int
    n_agents: int = 4
    hidden: int = 64
    beta0: float = 0.2
    delta_max: float = 0.5


class MultiAgentPolicy(nn.Module):
    """K actors, one per θ block; ``forward(state)`` returns raw actions (batch, 2·dim) ordered per block."""

    def __init__(self, config: AgentConfig):
        super().__init__()
        if not 0 < config.beta0 < 1:
            raise ValueError(f"beta0 must lie in (0, 1), got {config.beta0}")
        self.config = config
        self.blocks = agent_blocks(config.dim, config.n_agents)
        self.actors = nn.ModuleList(_mlp(config.dim + 1, config.hidden, 2 * len(b)) for b in self.blocks)
        for actor in self.actors:
            nn.init.zeros_(actor[-1].weight)
            nn.init.zeros_(actor[-1].bias)
        perm = np.concatenate(self.blocks)
        self.register_buffer("perm", torch.as_tensor(perm, dtype=torch.long))

    def forward(self, state: torch.Tensor) -> torch.Tensor:
        return torch.cat([actor(state) for actor in self.actors], dim=-1)

    def proposal_params(self, theta: torch.Tensor, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of q(·|θ) from raw actions; theta (batch, dim) in natural order."""
        d = self.config.dim
        u_parts, v_parts, sizes = [], [], [len(b) for b in self.blocks]
        offset = 0
        for size in sizes:
            u_parts.append(raw[..., offset:offset + size])
            v_parts.append(raw[..., offset + size:offset + 2 * size])
            offset += 2 * size
        u = torch.cat(u_parts, dim=-1)
        v = torch.cat(v_parts, dim=-1)
        # Block order -> natural order of θ.
        inv = torch.empty_like(self.perm)
        inv[self.perm] = torch.arange(d)
        u, v = u[..., inv], v[..., inv]
        beta = torch.sigmoid(v + math.log(self.config.beta0 / (1 - self.config.beta0)))
        delta = self.config.delta_max * beta * torch.tanh(u)  # drift in units of the step
        return torch.sqrt(1 - beta**2) * theta + delta, beta


class CentralCritic(nn.Module):
    """Centralized critic Q(s, a_1..a_K): sees the full state and every agent's action."""

    def __init__(self, dim: int, hidden: int = 128):
        super().__init__()
        self.net = _mlp(dim + 1 + 2 * dim, hidden, 1)

    def forward(self, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([state, action], dim=-1)).squeeze(-1)


def _state(theta: np.ndarray, misfit) -> torch.Tensor:
    theta = np.atleast_2d(theta)
    feat = np.atleast_1d(misfit_feature(misfit))[:, None]
    return torch.as_tensor(np.concatenate([theta, feat], axis=1), dtype=torch.float32)


class RLProposal(GaussianProposal):
    """Frozen multi-agent policy as an MH proposal; q is a state-dependent Gaussian (see module doc).

    The frozen actors are evaluated in float64 NumPy (weights copied once), which is ~50x cheaper than
    a torch call per MH step for these tiny MLPs; tests check it against :meth:`MultiAgentPolicy.proposal_params`.
    Forward and reverse densities use the same function, so the chain is exact.
    """

    name = "rl"

    def __init__(self, policy: MultiAgentPolicy):
        super().__init__(policy.config.dim, policy.config.beta0)
        self.policy = policy.eval()
        self.layers = [[(m.weight.detach().double().numpy().copy(), m.bias.detach().double().numpy().copy())
                        for m in actor if isinstance(m, nn.Linear)] for actor in policy.actors]
        cfg = policy.config
        self._logit0 = math.log(cfg.beta0 / (1 - cfg.beta0))
        self._delta_max = cfg.delta_max
        self._blocks = policy.blocks
        self._cache: dict = {}

    def _check_step(self, step):
        return None

    def with_step(self, step):
        # The RL proposal is not tuned by the sampler: its steps are what the actors learned.
        return self

    def _params(self, theta: np.ndarray, misfit: float) -> tuple[np.ndarray, np.ndarray]:
        state = np.concatenate([theta, [float(misfit_feature(misfit))]])
        u = np.empty(self.dim)
        v = np.empty(self.dim)
        for layers, block in zip(self.layers, self._blocks):
            h = state
            for k, (w, b) in enumerate(layers):
                h = w @ h + b
                if k < len(layers) - 1:
                    h = np.tanh(h)
            u[block], v[block] = h[: len(block)], h[len(block):]
        beta = 1.0 / (1.0 + np.exp(-(v + self._logit0)))
        return np.sqrt(1 - beta**2) * theta + self._delta_max * beta * np.tanh(u), beta

    def mean_std(self, theta, misfit):
        key = (theta.tobytes(), float(misfit))
        if key not in self._cache:
            if len(self._cache) > 4:  # the current state and the last proposals are all that recur
                self._cache.clear()
            self._cache[key] = self._params(theta, misfit)
        return self._cache[key]


@dataclass
class TrainConfig:
    n_envs: int = 32
    n_iters: int = 300
    updates_per_iter: int = 2
    batch_size: int = 256
    gamma: float = 0.5
    lr_actor: float = 1e-4
    lr_critic: float = 1e-3
    tau: float = 0.02
    explore_std: float = 0.2
    warmup_iters: int = 20
    reward: str = "esjd"  # "esjd": whitened ESJD over all of θ; "min-block": the worst agent's block ESJD
    seed: int = 0


def _log_q(theta_to, mean, std):
    z = (theta_to - mean) / std
    return (-0.5 * z * z - torch.log(std)).sum(-1)


def train_agents(coarse_posterior, config: AgentConfig, train: TrainConfig = TrainConfig(), init=None,
                 scale=None, progress: bool = True, checkpoint: str | None = None) -> tuple[MultiAgentPolicy, dict]:
    """Train the actors and the centralized critic on the coarse posterior only (MADDPG).

    ``init`` (n_envs, dim) are the starting states of the parallel training chains (default: prior draws).
    ``scale`` (dim,) whitens the jump in the reward (e.g. coarse-posterior std from a pilot chain);
    default ``beta0`` for every coordinate.
    Returns the trained policy and a history dict (mean reward, acceptance, mean β per block per iteration).
    """
    if coarse_posterior.dim != config.dim:
        raise ValueError(f"policy dim {config.dim} != posterior dim {coarse_posterior.dim}")
    if train.reward not in ("esjd", "min-block"):
        raise ValueError(f"reward must be 'esjd' or 'min-block', got {train.reward!r}")
    # Tiny MLPs: intra-op threads only add synchronization overhead (and are very slow on a busy host).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(coarse_posterior, config, train, init, scale, progress, checkpoint)
    finally:
        torch.set_num_threads(threads)


def _train(coarse_posterior, config, train, init, scale, progress, checkpoint):
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    policy = MultiAgentPolicy(config)
    critic = CentralCritic(config.dim)
    target_policy = MultiAgentPolicy(config)
    target_policy.load_state_dict(policy.state_dict())
    target_critic = CentralCritic(config.dim)
    target_critic.load_state_dict(critic.state_dict())
    opt_actor = torch.optim.Adam(policy.parameters(), lr=train.lr_actor)
    opt_critic = torch.optim.Adam(critic.parameters(), lr=train.lr_critic)
    d = config.dim
    whiten = np.full(d, config.beta0) if scale is None else np.asarray(scale, dtype=float)
    if whiten.shape != (d,) or np.any(whiten <= 0):
        raise ValueError(f"scale must be a positive array of shape ({d},)")
    theta = rng.standard_normal((train.n_envs, d)) if init is None else np.array(init, dtype=float)
    evals = [coarse_posterior.evaluate(t) for t in theta]
    logp = np.array([e[0] for e in evals])
    misfit = np.array([e[1] for e in evals])
    buf_cap = 50_000
    buffer = {k: np.zeros((buf_cap, n), np.float32) for k, n in
              (("s", d + 1), ("a", 2 * d), ("r", 1), ("s2", d + 1))}
    size = ptr = 0
    history = {"reward": [], "accept": [], "beta_mean": [], "critic_loss": []}
    t0 = time.process_time()
    bar = tqdm(range(train.n_iters), desc="train agents", disable=not progress)
    for it in bar:
        state = _state(theta, misfit)
        with torch.no_grad():
            raw = policy(state)
            raw = raw + train.explore_std * torch.randn_like(raw)
            mean, std = policy.proposal_params(state[:, :-1], raw)
            theta_t = torch.as_tensor(theta, dtype=torch.float32)
            prop = mean + std * torch.randn_like(mean)
            log_fwd = _log_q(prop, mean, std)
        prop_np = prop.double().numpy()
        evals = [coarse_posterior.evaluate(p) for p in prop_np]
        logp_new = np.array([e[0] for e in evals])
        misfit_new = np.array([e[1] for e in evals])
        with torch.no_grad():
            state_new = _state(prop_np, misfit_new)
            mean_r, std_r = policy.proposal_params(state_new[:, :-1], policy(state_new))
            log_rev = _log_q(theta_t, mean_r, std_r)
        log_alpha = logp_new - logp + (log_rev - log_fwd).double().numpy()
        alpha = np.exp(np.minimum(0.0, np.nan_to_num(log_alpha, nan=-np.inf)))
        sq = ((prop_np - theta) / whiten) ** 2
        if train.reward == "min-block":  # favours balanced mixing, i.e. the min-ESS the benchmark reports
            jump = np.min(np.stack([sq[:, b].mean(axis=1) for b in policy.blocks], axis=1), axis=1)
        else:
            jump = sq.mean(axis=1)
        reward = alpha * jump
        accept = rng.random(train.n_envs) < alpha
        theta = np.where(accept[:, None], prop_np, theta)
        logp = np.where(accept, logp_new, logp)
        misfit = np.where(accept, misfit_new, misfit)
        next_state = _state(theta, misfit)
        idx = (ptr + np.arange(train.n_envs)) % buf_cap
        buffer["s"][idx] = state.numpy()
        buffer["a"][idx] = raw.numpy()
        buffer["r"][idx, 0] = reward
        buffer["s2"][idx] = next_state.numpy()
        ptr = (ptr + train.n_envs) % buf_cap
        size = min(size + train.n_envs, buf_cap)
        closs = float("nan")
        for _ in range(train.updates_per_iter if size >= train.batch_size else 0):
            j = rng.integers(0, size, train.batch_size)
            s, a, r, s2 = (torch.as_tensor(buffer[k][j]) for k in ("s", "a", "r", "s2"))
            with torch.no_grad():
                target = r[:, 0] + train.gamma * target_critic(s2, target_policy(s2))
            loss_c = ((critic(s, a) - target) ** 2).mean()
            opt_critic.zero_grad()
            loss_c.backward()
            opt_critic.step()
            closs = float(loss_c.detach())
            if it >= train.warmup_iters:
                loss_a = -critic(s, policy(s)).mean()
                opt_actor.zero_grad()
                loss_a.backward()
                opt_actor.step()
            with torch.no_grad():
                for net, tgt in ((policy, target_policy), (critic, target_critic)):
                    for p, tp in zip(net.parameters(), tgt.parameters()):
                        tp.mul_(1 - train.tau).add_(train.tau * p)
        with torch.no_grad():
            _, beta_now = policy.proposal_params(state[:, :-1], policy(state))
        beta_blocks = [float(beta_now[:, b].mean()) for b in policy.blocks]
        history["reward"].append(float(reward.mean()))
        history["accept"].append(float(alpha.mean()))
        history["beta_mean"].append(beta_blocks)
        history["critic_loss"].append(closs)
        bar.set_postfix(reward=f"{reward.mean():.3g}", acc=f"{alpha.mean():.2f}")
    history["cpu_seconds"] = time.process_time() - t0
    history["coarse_solves"] = train.n_envs * (train.n_iters + 1)
    if checkpoint is not None:
        save_policy(policy, checkpoint, extra={"train": asdict(train), "history": history})
    return policy.eval(), history


def save_policy(policy: MultiAgentPolicy, path: str, extra: dict | None = None) -> None:
    """Checkpoint: actor weights + agent config (+ training metadata)."""
    torch.save({"config": asdict(policy.config), "state_dict": policy.state_dict(), "extra": extra or {}}, path)


def load_policy(path: str) -> MultiAgentPolicy:
    """Load a checkpoint written by :func:`save_policy` (weights only; no pickled code is executed)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    policy = MultiAgentPolicy(AgentConfig(**data["config"]))
    policy.load_state_dict(data["state_dict"])
    return policy.eval()
