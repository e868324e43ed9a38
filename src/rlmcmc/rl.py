"""Multi-agent actor-critic proposals for MCMC (PyTorch) — the issue-7 design, superseded by
:mod:`rlmcmc.marl` (kept for ``rlmcmc train`` / ``rlmcmc sample --proposal rl``). As trained by default it
is in effect a moment-matched Gaussian independence proposal for the coarse posterior: its state-dependent
MLP is frozen and its critic is a one-step (γ = 0) regression of Δ log π_c (issue 14).

Implements the idea of *Multi-agent reinforcement learning accelerated MCMC on multiscale inversion
problems* (Chung, Efendiev, Leung, Pun, Zhang): K agents each own a contiguous block B_k of the KL
coefficients θ; agent k's actor maps the state to a Gaussian proposal for its block, and one centralized
critic Q(s, a_1, ..., a_K) sees the whole state and all agents' actions (MADDPG, Lowe et al., NeurIPS 2017).

State ``s = (θ, log(1 + Φ_c(θ)) / 10)`` with Φ_c the first-level (coarse) misfit.

**Actors (generalized pCN).** Agent k's action is the proposed block ``a_k = θ'_{B_k}``:

    θ'_{B_k} = m_k + sqrt(1 - β_k²) (θ_{B_k} - m_k) + δ_k(s) + c_k(s) (S ξ)_{B_k},   ξ ~ N(0, I_d),

with learned block mean m_k, learned mean-reversion β_k, learned rows ``S_{B_k,:}`` of a lower-triangular
step factor S (positive diagonal; the posterior-shaped preconditioner), and a small MLP of the state
giving a state-dependent log step factor log c_k(s) and a bounded drift δ_k(s) (``δ_max`` x c x diag S
x tanh(·); off when δ_max = 0). Agent k only ever outputs its own block. With ``coupled=True`` (default)
agent k's rows of S may also weight the noise of the agents before it (block-lower-triangular S: the
agents share their exploration noise, so the joint proposal can follow posterior correlations *between*
blocks); with ``coupled=False`` S is block-diagonal and the actors are independent given the state.

The parameters start at m = 0, β = β₀, S = β₀ I and a zero last MLP layer (c = 1, δ = 0), so **an
untrained policy is exactly pCN with step β₀** and training starts from pCN quality. S is learned
separately from β (S = β L with L the preconditioner of generalized pCN, which is reversible w.r.t.
N(m, LLᵀ) when c ≡ 1): in this parameterization raising β at fixed S only adds mean reversion towards
m, a smooth path from a preconditioned random walk to an independence-type proposal. The proposal is no
longer prior-reversible, so the Metropolis–Hastings ratio uses the exact Gaussian densities
q(θ'|θ) = N(mean(s), diag(c(s)) S Sᵀ diag(c(s))) both ways (:class:`RLProposal`), no approximation.

**Reward** (coarse model only): the Rao–Blackwellized Mahalanobis expected squared jump distance
``r = α_c(θ, θ') Σ_i ((θ'_i - θ_i) / s_i)² / d``, α_c the first-stage acceptance probability including
the Hastings term, s_i the coarse-posterior std from a pilot chain (``"min-block"``: the worst agent
block's mean instead of the mean over all of θ).

**Centralized critic.** The reward is one step (ESJD is a per-transition objective, γ = 0), and
``r = min(1, exp(D + h)) J(θ' - θ)`` where J and the Hastings term h = log q(θ|θ') - log q(θ'|θ) are known
in closed form while D = log π_c(θ') - log π_c(θ) needs a coarse solve (a black box without gradients).
The critic is therefore the structured action value

    Q(s, a_1..a_K) = min(1, exp(f_ψ(θ') - f_ψ(θ) + h)) · J(θ' - θ),    θ' = (a_1, ..., a_K),

with f_ψ a learned surrogate of log π_c (a full quadratic in whitened θ plus an MLP residual), fitted to
the log-posterior differences observed along the training chains. Every agent's actor ascends
E_ξ Q(s, a_1(s, ξ), ..., a_K(s, ξ)) through its own action (deterministic policy gradient with
reparameterized noise, MADDPG/SVG(0)); per-agent credit is what flows through ∂Q/∂a_k.

After training the actors are frozen; :class:`RLProposal` evaluates both q(θ'|θ) and q(θ|θ') with
them, so the MH/DA chain stays exact.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.linalg import solve_triangular
from torch import nn
from tqdm.auto import tqdm

from .proposals import LOG_2PI, GaussianProposal
from .sampling import mh_accept


def misfit_feature(misfit):
    """Scaled log-misfit fed to the actors."""
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
    hidden: int = 32
    beta0: float = 0.2
    delta_max: float = 0.0
    coupled: bool = True


class Actor(nn.Module):
    """One agent: owns block ``block`` (contiguous indices); parameters m, rows of S, base β, and an MLP."""

    def __init__(self, dim: int, block: np.ndarray, hidden: int, beta0: float, coupled: bool):
        super().__init__()
        self.lo, self.hi = int(block[0]), int(block[-1]) + 1
        n = self.hi - self.lo
        # m and the off-diagonal part of S are stored in units of ``unit`` (prior scale, 1, by default).
        self.register_buffer("unit", torch.ones(n))
        self.mean_raw = nn.Parameter(torch.zeros(n))
        self.log_diag = nn.Parameter(torch.full((n,), math.log(beta0)))
        self.rows = nn.Parameter(torch.zeros(n, dim))  # strictly-lower part of S's rows for this block
        self.beta_logit = nn.Parameter(torch.tensor(math.log(beta0 / (1 - beta0))))
        self.net = _mlp(dim + 1, hidden, 1 + n)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)
        mask = torch.zeros(n, dim)
        first = 0 if coupled else self.lo
        for r in range(n):
            mask[r, first:self.lo + r] = 1.0  # lower triangular (within the allowed columns), no diagonal
        self.register_buffer("mask", mask)

    def chol_rows(self) -> torch.Tensor:
        """This block's rows of the lower-triangular step factor S (positive diagonal)."""
        n = self.hi - self.lo
        diag = torch.zeros(n, self.rows.shape[1], dtype=self.rows.dtype)
        diag[torch.arange(n), torch.arange(self.lo, self.hi)] = torch.exp(self.log_diag)
        return self.unit[:, None] * self.rows * self.mask + diag

    @property
    def mean(self) -> torch.Tensor:
        return self.unit * self.mean_raw

    def forward(self, state: torch.Tensor):
        """(log step factor g (batch,), raw drift (batch, n)) from the MLP; zero when the last layer is zero."""
        out = self.net(state)
        return out[:, 0], out[:, 1:]


class MultiAgentPolicy(nn.Module):
    """K actors, one per contiguous θ block. ``proposal(state)`` gives the joint Gaussian q(·|θ)."""

    def __init__(self, config: AgentConfig):
        super().__init__()
        if not 0 < config.beta0 < 1:
            raise ValueError(f"beta0 must lie in (0, 1), got {config.beta0}")
        self.config = config
        self.blocks = agent_blocks(config.dim, config.n_agents)
        self.actors = nn.ModuleList(Actor(config.dim, b, config.hidden, config.beta0, config.coupled)
                                    for b in self.blocks)

    def chol(self) -> torch.Tensor:
        """Full lower-triangular step factor S (dim, dim), stacked from the agents' rows."""
        return torch.cat([a.chol_rows() for a in self.actors], dim=0)

    def proposal(self, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean (batch, d), per-coordinate step factor c (batch, d) and S (d, d):
        q = N(mean, diag(c) S Sᵀ diag(c))."""
        theta = state[:, :-1]
        means, factors = [], []
        for actor in self.actors:
            g, raw = actor(state)
            n = actor.hi - actor.lo
            c = torch.exp(g)[:, None].expand(-1, n)
            beta = torch.sigmoid(actor.beta_logit)
            x = theta[:, actor.lo:actor.hi]
            drift = self.config.delta_max * c * torch.exp(actor.log_diag) * torch.tanh(raw)
            means.append(actor.mean + torch.sqrt(1 - beta**2) * (x - actor.mean) + drift)
            factors.append(c)
        return torch.cat(means, dim=-1), torch.cat(factors, dim=-1), self.chol()

    def betas(self) -> list[float]:
        """Mean-reversion β_k of every agent."""
        return [float(torch.sigmoid(a.beta_logit.detach())) for a in self.actors]

    def sample(self, state: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Reparameterized joint action θ' = mean + c ⊙ (S ξ); agent k's part is its block."""
        mean, fac, chol = self.proposal(state)
        return mean + fac * (noise @ chol.T)

    def log_density(self, to: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
        """log q(to | state), exact Gaussian density (batch,)."""
        mean, fac, chol = self.proposal(state)
        z = torch.linalg.solve_triangular(chol, ((to - mean) / fac).T, upper=False).T
        logdet = torch.log(fac).sum(-1) + torch.log(torch.diagonal(chol)).sum()
        return -0.5 * (z * z).sum(-1) - logdet - 0.5 * chol.shape[0] * LOG_2PI


class CentralCritic(nn.Module):
    """Centralized critic Q(s, a_1..a_K) = min(1, exp(f(θ') - f(θ) + h)) · J(θ' - θ).

    f is a learned surrogate of the coarse log posterior: ``-|A x|²/2 + w·x + MLP(x)`` in whitened
    coordinates x = (θ - center) / scale. It sees the whole state and every agent's action (the joint θ').
    """

    def __init__(self, dim: int, hidden: int = 64, center=None, scale=None):
        super().__init__()
        self.register_buffer("center", torch.zeros(dim) if center is None else torch.as_tensor(center).float())
        self.register_buffer("scale", torch.ones(dim) if scale is None else torch.as_tensor(scale).float())
        self.quad = nn.Parameter(torch.eye(dim))
        self.lin = nn.Parameter(torch.zeros(dim))
        self.net = _mlp(dim, hidden, 1)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def surrogate(self, theta: torch.Tensor) -> torch.Tensor:
        x = (theta - self.center) / self.scale
        ax = x @ self.quad.T
        return -0.5 * (ax * ax).sum(-1) + x @ self.lin + self.net(x).squeeze(-1)

    def log_ratio(self, theta: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Predicted log π_c(θ') - log π_c(θ)."""
        return self.surrogate(action) - self.surrogate(theta)

    def forward(self, state: torch.Tensor, action: torch.Tensor, log_hastings=0.0,
                blocks=None) -> torch.Tensor:
        theta = state[:, :-1]
        alpha = torch.exp(torch.clamp(self.log_ratio(theta, action) + log_hastings, max=0.0))
        return alpha * _jump(action - theta, self.scale, blocks)


def _jump(delta: torch.Tensor, scale: torch.Tensor, blocks=None) -> torch.Tensor:
    sq = (delta / scale) ** 2
    if blocks is None:
        return sq.mean(-1)
    return torch.stack([sq[:, b].mean(-1) for b in blocks], dim=-1).min(-1).values


def _state(theta: np.ndarray, misfit, dtype=torch.float32) -> torch.Tensor:
    theta = np.atleast_2d(theta)
    feat = np.atleast_1d(misfit_feature(misfit))[:, None]
    return torch.as_tensor(np.concatenate([theta, feat], axis=1), dtype=dtype)


class RLProposal(GaussianProposal):
    """Frozen multi-agent policy as an MH proposal: q(·|θ) = N(mean(s), diag(c(s)) S Sᵀ diag(c(s))).

    The frozen actors are evaluated in float64 NumPy (weights copied once), which is much cheaper than a
    torch call per MH step for these tiny MLPs; tests check it against :class:`MultiAgentPolicy`.
    Forward and reverse densities use the same function, so the chain is exact.
    """

    name = "rl"

    def __init__(self, policy: MultiAgentPolicy):
        super().__init__(policy.config.dim, policy.config.beta0)
        self.policy = policy.eval()
        with torch.no_grad():
            self.chol = policy.chol().double().numpy().copy()
            self.actors = []
            for a in policy.actors:
                layers = [(m.weight.double().numpy().copy(), m.bias.double().numpy().copy())
                          for m in a.net if isinstance(m, nn.Linear)]
                self.actors.append((a.lo, a.hi, a.mean.double().numpy().copy(), float(a.beta_logit),
                                    np.exp(a.log_diag.double().numpy()), layers))
        self._delta_max = policy.config.delta_max
        self._logdet_chol = float(np.sum(np.log(np.diag(self.chol))))
        self._cache: dict = {}

    def _check_step(self, step):
        return None

    def with_step(self, step):
        # The RL proposal is not tuned by the sampler: its steps are what the actors learned.
        return self

    def _params(self, theta: np.ndarray, misfit: float) -> tuple[np.ndarray, np.ndarray]:
        state = np.concatenate([theta, [float(misfit_feature(misfit))]])
        mean = np.empty(self.dim)
        fac = np.empty(self.dim)
        for lo, hi, m, logit, diag, layers in self.actors:
            h = state
            for k, (w, b) in enumerate(layers):
                h = w @ h + b
                if k < len(layers) - 1:
                    h = np.tanh(h)
            c = np.exp(h[0])
            beta = 1.0 / (1.0 + np.exp(-logit))
            fac[lo:hi] = c
            mean[lo:hi] = m + np.sqrt(1 - beta**2) * (theta[lo:hi] - m) + self._delta_max * c * diag * np.tanh(h[1:])
        return mean, fac

    def mean_factor(self, theta, misfit):
        key = (theta.tobytes(), float(misfit))
        if key not in self._cache:
            if len(self._cache) > 4:  # the current state and the last proposals are all that recur
                self._cache.clear()
            self._cache[key] = self._params(theta, misfit)
        return self._cache[key]

    def mean_std(self, theta, misfit):
        """Mean and marginal per-coordinate std of q(·|θ)."""
        mean, fac = self.mean_factor(self._check_theta(theta), misfit)
        return mean, fac * np.sqrt(np.sum(self.chol**2, axis=1))

    def sample(self, theta, misfit, rng):
        mean, fac = self.mean_factor(self._check_theta(theta), misfit)
        return mean + fac * (self.chol @ rng.standard_normal(self.dim))

    def log_density(self, theta_to, theta_from, misfit_from):
        mean, fac = self.mean_factor(self._check_theta(theta_from), misfit_from)
        z = solve_triangular(self.chol, (self._check_theta(theta_to) - mean) / fac, lower=True)
        return float(-0.5 * z @ z - np.sum(np.log(fac)) - self._logdet_chol - 0.5 * self.dim * LOG_2PI)


@dataclass
class TrainConfig:
    n_envs: int = 64
    n_iters: int = 200
    critic_steps: int = 20  # cheap (no coarse solves): keep the surrogate ahead of the actors
    actor_steps: int = 10  # the critic is cheap to query: several actor steps per environment step
    batch_size: int = 1024
    lr_actor: float = 2e-2  # m, S, base β
    # The actors' state-dependent MLPs (step factor c(s), drift). 0 = frozen at their zero init (c = 1, no
    # drift): on the benchmark a learned c(s) reached the same coarse ESJD but ~4.6x lower ESS (sticky chains).
    lr_actor_net: float = 0.0
    lr_critic: float = 3e-3
    warmup_iters: int = 20
    buffer: int = 20_000
    reward: str = "esjd"  # "esjd": whitened ESJD over all of θ; "min-block": the worst agent's block ESJD
    seed: int = 0


def train_agents(coarse_posterior, config: AgentConfig, train: TrainConfig = TrainConfig(), init=None,
                 scale=None, progress: bool = True, checkpoint: str | None = None) -> tuple[MultiAgentPolicy, dict]:
    """Train the actors and the centralized critic on the coarse posterior only.

    ``init`` (n_envs, dim) are the starting states of the parallel training chains (default: prior draws).
    ``scale`` (dim,) whitens the jump in the reward (e.g. coarse-posterior std from a pilot chain);
    default: ``beta0`` for every coordinate.
    Returns the trained policy and a history dict (true mean reward and acceptance of the training
    chains, critic loss, mean β per block per iteration).
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


def _evaluate(posterior, thetas):
    evals = [posterior.evaluate(t) for t in thetas]
    return np.array([e[0] for e in evals]), np.array([e[1] for e in evals])


def _train(coarse_posterior, config, train, init, scale, progress, checkpoint):
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    d = config.dim
    whiten = np.full(d, config.beta0) if scale is None else np.asarray(scale, dtype=float)
    if whiten.shape != (d,) or np.any(whiten <= 0):
        raise ValueError(f"scale must be a positive array of shape ({d},)")
    theta = rng.standard_normal((train.n_envs, d)) if init is None else np.array(init, dtype=float)
    if theta.shape != (train.n_envs, d):
        raise ValueError(f"init must have shape ({train.n_envs}, {d}), got {theta.shape}")
    policy = MultiAgentPolicy(config)
    critic = CentralCritic(d, center=theta.mean(axis=0), scale=whiten)
    blocks = None if train.reward == "esjd" else [torch.as_tensor(b) for b in policy.blocks]
    structured = [p for a in policy.actors for p in (a.mean_raw, a.log_diag, a.rows, a.beta_logit)]
    nets = [p for a in policy.actors for p in a.net.parameters()]
    opt_actor = torch.optim.Adam([{"params": structured, "lr": train.lr_actor},
                                  {"params": nets, "lr": train.lr_actor_net}])
    opt_critic = torch.optim.Adam(critic.parameters(), lr=train.lr_critic)
    # Actor learning rates: constant for the first half, then linear decay to 10% (no final jitter).
    half = train.actor_steps * max(1, (train.n_iters - train.warmup_iters) // 2)
    decay = torch.optim.lr_scheduler.LambdaLR(opt_actor, lambda k: 1.0 - 0.9 * min(1.0, max(0, k - half) / half))
    logp, misfit = _evaluate(coarse_posterior, theta)
    cap = train.buffer
    buf = {"s": np.zeros((cap, d + 1), np.float32), "a": np.zeros((cap, d), np.float32),
           "dlogp": np.zeros(cap, np.float32)}
    size = ptr = 0
    history = {"reward": [], "accept": [], "beta_mean": [], "step_mean": [], "critic_loss": []}
    whiten_t = torch.as_tensor(whiten, dtype=torch.float32)
    t0 = time.process_time()
    bar = tqdm(range(train.n_iters), desc="train agents", disable=not progress)
    for it in bar:
        # --- act in the coarse environment: one exact MH step of every training chain -------------
        state = _state(theta, misfit)
        with torch.no_grad():
            prop = policy.sample(state, torch.randn(train.n_envs, d))
            log_fwd = policy.log_density(prop, state)
        prop_np = prop.double().numpy()
        logp_new, misfit_new = _evaluate(coarse_posterior, prop_np)
        with torch.no_grad():
            log_rev = policy.log_density(torch.as_tensor(theta, dtype=torch.float32), _state(prop_np, misfit_new))
        accept, alpha = mh_accept(logp_new - logp + (log_rev - log_fwd).double().numpy(), rng)
        reward = alpha * _jump(torch.as_tensor(prop_np - theta, dtype=torch.float32), whiten_t, blocks).numpy()
        idx = (ptr + np.arange(train.n_envs)) % cap
        buf["s"][idx] = state.numpy()
        buf["a"][idx] = prop_np
        dlogp = logp_new - logp
        buf["dlogp"][idx] = np.clip(np.nan_to_num(dlogp, nan=-1e4, neginf=-1e4), -1e4, 1e4)
        ptr = (ptr + train.n_envs) % cap
        size = min(size + train.n_envs, cap)
        theta = np.where(accept[:, None], prop_np, theta)
        logp = np.where(accept, logp_new, logp)
        misfit = np.where(accept, misfit_new, misfit)
        # --- centralized critic: fit the log-posterior change of the observed joint actions --------
        closs = float("nan")
        for _ in range(train.critic_steps):
            j = torch.as_tensor(rng.integers(0, size, min(train.batch_size, size)))
            s, a, dl = (torch.as_tensor(buf[k][j]) for k in ("s", "a", "dlogp"))
            pred = critic.log_ratio(s[:, :-1], a)
            # Huber: far-out rejected proposals have huge |Δ log π| but matter little.
            loss_c = nn.functional.huber_loss(pred, dl, delta=5.0)
            opt_critic.zero_grad()
            loss_c.backward()
            opt_critic.step()
            closs = float(loss_c.detach())
        # --- actors: deterministic policy gradient through the centralized critic -----------------
        if it >= train.warmup_iters:
            for _ in range(train.actor_steps):
                j = torch.as_tensor(rng.integers(0, size, min(train.batch_size, size)))
                s = torch.as_tensor(buf["s"][j])
                act = policy.sample(s, torch.randn(len(j), d))
                # The reverse density needs the misfit feature at θ' (it enters the actors' MLPs): the
                # critic's surrogate predicts it, Φ(θ') ≈ Φ(θ) - [f(θ') - f(θ)] - (|θ'|² - |θ|²)/2.
                phi = torch.expm1(10 * s[:, -1])
                phi_new = phi - critic.log_ratio(s[:, :-1], act) - 0.5 * ((act**2).sum(-1) - (s[:, :-1] ** 2).sum(-1))
                s_new = torch.cat([act, (torch.log1p(torch.clamp(phi_new, min=0.0)) / 10)[:, None]], dim=-1)
                log_h = policy.log_density(s[:, :-1], s_new) - policy.log_density(act, s)
                loss_a = -critic(s, act, log_h, blocks).mean()
                opt_actor.zero_grad()
                loss_a.backward()
                opt_actor.step()
                decay.step()
        with torch.no_grad():
            _, fac_now, chol_now = policy.proposal(state)
            step_now = (fac_now * torch.sqrt((chol_now**2).sum(-1))).mean(0)  # marginal proposal std
        history["reward"].append(float(reward.mean()))
        history["accept"].append(float(alpha.mean()))
        history["beta_mean"].append(policy.betas())
        history["step_mean"].append([float(step_now[b].mean()) for b in policy.blocks])
        history["critic_loss"].append(closs)
        bar.set_postfix(reward=f"{reward.mean():.3g}", acc=f"{alpha.mean():.2f}")
    history["cpu_seconds"] = time.process_time() - t0
    history["coarse_solves"] = train.n_envs * (train.n_iters + 1)
    policy.eval()
    if checkpoint is not None:
        save_policy(policy, checkpoint, extra={"train": asdict(train), "history": history})
    return policy, history


def coarse_esjd(posterior, proposal: GaussianProposal, init, n_steps: int, scale, seed: int = 0) -> dict:
    """Evaluate a frozen proposal on ``posterior``: exact MH chains from each row of ``init`` for
    ``n_steps``; returns the mean Rao–Blackwellized whitened ESJD (α · mean((Δθ/scale)²)) and acceptance."""
    rng = np.random.default_rng(seed)
    scale = np.asarray(scale, float)
    rewards, accs = [], []
    for theta0 in np.atleast_2d(init):
        theta = np.array(theta0, float)
        lp, m = posterior.evaluate(theta)
        for _ in range(n_steps):
            prop = proposal.sample(theta, m, rng)
            lp_new, m_new = posterior.evaluate(prop)
            log_r = lp_new - lp + proposal.log_ratio(theta, prop, m, m_new)
            ok, a = mh_accept(log_r, rng)
            rewards.append(a * np.mean(((prop - theta) / scale) ** 2))
            accs.append(a)
            if ok:
                theta, lp, m = prop, lp_new, m_new
    return {"esjd": float(np.mean(rewards)), "accept": float(np.mean(accs))}


def save_policy(policy: MultiAgentPolicy, path: str, extra: dict | None = None) -> None:
    """Checkpoint: actor weights + agent config (+ training metadata)."""
    torch.save({"config": asdict(policy.config), "state_dict": policy.state_dict(), "extra": extra or {}}, path)


def load_policy(path: str) -> MultiAgentPolicy:
    """Load a checkpoint written by :func:`save_policy` (weights only; no pickled code is executed)."""
    data = torch.load(path, map_location="cpu", weights_only=True)
    policy = MultiAgentPolicy(AgentConfig(**data["config"]))
    policy.load_state_dict(data["state_dict"])
    return policy.eval()
