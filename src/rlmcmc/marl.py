"""Multi-agent actor-critic proposals trained on the delayed-acceptance cost reward (issue 14).

After *Multi-agent reinforcement learning accelerated MCMC on multiscale inversion problems* (Chung,
Efendiev, Leung, Pun, Zhang), with a centralized critic trained by temporal differences as in MAPPO
(Yu et al., NeurIPS 2022 Datasets & Benchmarks) / MAA2C (centralized training, decentralized actors).

**Coordinates.** A pilot Gaussian fit (m, C = L Lᵀ) of the coarse posterior whitens θ: x = L⁻¹(θ - m).
The d whitened coordinates are split into K contiguous blocks B_k, one per agent.

**Local state of agent k** (all free: no extra forward solve):

* x_{B_k}, its block of the whitened state;
* g_{B_k}, its block of a whitened *misfit-gradient proxy* g = Lᵀ(-J₀ᵀ r(θ) - θ), where r(θ) is the
  scaled first-level data residual (already computed by the first-level solve) and J₀ the scaled
  Jacobian of the first-level forward map at m (finite differences, d + 1 coarse solves, counted offline):
  a Gauss–Newton gradient of log π with the current residual and a frozen Jacobian;
* φ = log(1 + Φ(θ)) / 10, the first-level misfit (shared scalar).

**Actors.** Agent k's MLP maps its local state to a bounded drift δ_{B_k} (|δ| ≤ ``delta_max``) and a
log step factor log c_k (|log c_k| ≤ ``log_scale_max``) for its block. The learned part of the proposal is

    θ' = θ + s₀ L (c ⊙ (δ + ξ)),  ξ ~ N(0, I_d),   i.e. q_RL(θ'|θ) = N(θ + s₀ L (c ⊙ δ), s₀² L diag(c²) Lᵀ),

with s₀ a base step (the tuned random-walk step). Agent k produces only its block of the whitened move.
An untrained policy (zero last layer) is exactly the pilot-covariance random walk with step s₀.

With ``base="gpcn"`` the learned part sits on the generalized pCN of the best baseline instead (Rudolf &
Sprungk, Found. Comput. Math. 18 (2018)), in whitened coordinates x = L⁻¹(θ - m):

    x' = sqrt(1 - β²) ⊙ x + β ⊙ (δ + ξ),   β = tanh(atanh(β₀) c) ∈ (0, 1) per block,

so an untrained policy is exactly the gpCN with step β₀ (reversible w.r.t. the pilot Gaussian N(m, C)), and
the actors learn per-block state-dependent step factors and drifts on top of it (see :func:`learned_kernel`).

**Safe component (robustness).** The proposal used in the chains and in training is the fixed-weight
mixture q = w · q_base + (1 - w) · q_RL (w = ``safe_weight``), q_base = N(θ, s₀² C) (``rw``) or the gpCN
with β₀ (``gpcn``), so the kernel dominates w times the base kernel whatever the actors learned.

**Reward** (aligned with the reported metric, ESS per fine-solve equivalent under delayed acceptance):

    r = 1[stage 1 accepts] · α₂ · |L⁻¹(θ' - θ)|² / d  /  (c_coarse + α₁ c_fine),

whose expectation over the stage-1 coin is α₁ α₂ J / (c_coarse + α₁ c_fine); c_fine = 1 and c_coarse the
measured coarse/fine cost ratio. The training environment is the delayed-acceptance chain itself, so α₂
and hence the coarse/fine offset are learned from real fine solves (counted and reported as offline cost).

**Centralized critic.** V(s) on the global state (x, g, φ), trained by TD(0) with discount γ > 0 on the
chains' transitions: V(s_t) ← r_t + γ V(s_{t+1}). It estimates the discounted long-term reward of the
chain from state s under the current joint policy. Every actor is updated by the policy gradient
A_t ∇ log q_RL(θ'_t | θ_t) with the shared TD advantage A_t = r_t + γ V(s_{t+1}) - V(s_t) (for
proposals drawn from the learned component; draws from the safe component carry no actor gradient).

**Exactness.** After training the actors are frozen (:class:`MARLProposal`); the MH / delayed-acceptance
ratio uses the full mixture density in both directions, the reverse one q(θ|θ') evaluated with the
*proposed* state's features (its residual from the first-level solve at θ').
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
from scipy.linalg import solve_triangular
from torch import nn
from tqdm.auto import tqdm

from .proposals import LOG_2PI, GaussianProposal, LinearGaussianProposal
from .sampling import mh_accept


@dataclass
class Whitening:
    """Frozen features shared by actors, critic and the numpy proposal: pilot fit (mean, chol) and the
    scaled first-level Jacobian at the pilot mean (``jac``: n_data x d, rows divided by the data scale)."""

    mean: np.ndarray
    chol: np.ndarray
    jac: np.ndarray

    def features(self, theta: np.ndarray, residual: np.ndarray) -> np.ndarray:
        """(batch, 2d + 1): whitened θ, whitened gradient proxy, misfit feature."""
        theta, residual = np.atleast_2d(theta), np.atleast_2d(residual)
        x = solve_triangular(self.chol, (theta - self.mean).T, lower=True).T
        grad = -residual @ self.jac - theta  # ∇ log π ≈ -J₀ᵀ r(θ) - θ
        g = grad @ self.chol  # Lᵀ ∇, as rows
        phi = np.log1p(0.5 * np.sum(residual * residual, axis=1)) / 10.0
        return np.concatenate([x, g, phi[:, None]], axis=1)

    def whiten_move(self, theta_to: np.ndarray, theta_from: np.ndarray) -> np.ndarray:
        return solve_triangular(self.chol, (np.atleast_2d(theta_to) - np.atleast_2d(theta_from)).T, lower=True).T

    def whiten(self, theta: np.ndarray) -> np.ndarray:
        """x = L⁻¹(θ - m) as rows."""
        return solve_triangular(self.chol, (np.atleast_2d(theta) - self.mean).T, lower=True).T


def jacobian_fd(posterior, theta0: np.ndarray, eps: float = 1e-3) -> np.ndarray:
    """Scaled Jacobian ∂r/∂θ of the posterior's data residual at θ₀ by forward differences
    (d + 1 forward solves, counted by the posterior)."""
    posterior.misfit(theta0)
    r0 = posterior.last_residual.copy()
    cols = []
    for i in range(posterior.dim):
        t = np.array(theta0, dtype=float)
        t[i] += eps
        posterior.misfit(t)
        cols.append((posterior.last_residual - r0) / eps)
    return np.stack(cols, axis=1)


@dataclass
class MARLConfig:
    dim: int
    n_agents: int = 4
    hidden: int = 32
    base_step: float = 0.5
    delta_max: float = 1.0
    log_scale_max: float = 1.0
    safe_weight: float = 0.2
    base: str = "rw"  # "rw": pilot-covariance random walk; "gpcn": generalized pCN around the pilot mean

    def __post_init__(self):
        if self.base not in ("rw", "gpcn"):
            raise ValueError(f"base must be 'rw' or 'gpcn', got {self.base!r}")
        if self.base == "gpcn" and not 0 < self.base_step < 1:
            raise ValueError(f"a gpcn base needs base_step (β₀) in (0, 1), got {self.base_step}")
        if not 1 <= self.n_agents <= self.dim:
            raise ValueError(f"n_agents must be in 1..dim={self.dim}, got {self.n_agents}")
        if not 0 < self.safe_weight < 1:
            raise ValueError(f"safe_weight must lie in (0, 1), got {self.safe_weight}")
        if not self.base_step > 0:
            raise ValueError(f"base_step must be positive, got {self.base_step}")


def blocks_of(dim: int, n_agents: int) -> list[tuple[int, int]]:
    """Contiguous (lo, hi) index blocks, one per agent."""
    return [(int(b[0]), int(b[-1]) + 1) for b in np.array_split(np.arange(dim), n_agents)]


def learned_kernel(x, delta, logc, base: str, s0: float, xp=np):
    """Mean and per-coordinate std of the learned component in whitened coordinates x = L⁻¹(θ - m),
    for actor outputs (δ, log c); ``xp`` is ``numpy`` or ``torch``.

    * ``rw``:   x' = x + s₀ c ⊙ (δ + ξ);
    * ``gpcn``: x' = sqrt(1 - β²) ⊙ x + β ⊙ (δ + ξ) with β = tanh(atanh(s₀) c) in (0, 1), so c = 1, δ = 0
      is exactly the generalized pCN with step β₀ = s₀ (reversible w.r.t. N(m, C))."""
    c = xp.exp(logc)
    if base == "rw":
        std = s0 * c
        return x + std * delta, std
    beta = xp.tanh(float(np.arctanh(s0)) * c)
    return xp.sqrt(1 - beta * beta) * x + beta * delta, beta


def safe_kernel(x, base: str, s0: float):
    """Mean and std (scalar) of the safe component in whitened coordinates: N(x, s₀²) (random walk with
    the pilot covariance) or N(sqrt(1 - s₀²) x, s₀²) (generalized pCN)."""
    return (x if base == "rw" else np.sqrt(1 - s0 * s0) * x), s0


class BlockActor(nn.Module):
    """Agent for whitened block [lo, hi): local state (x_B, g_B, φ) -> (drift δ_B, log step factor)."""

    def __init__(self, lo: int, hi: int, hidden: int):
        super().__init__()
        self.lo, self.hi = lo, hi
        n = hi - lo
        self.net = nn.Sequential(nn.Linear(2 * n + 1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, n + 1))
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def local_state(self, feats: torch.Tensor, dim: int) -> torch.Tensor:
        return torch.cat([feats[:, self.lo:self.hi], feats[:, dim + self.lo:dim + self.hi], feats[:, -1:]], dim=1)


class MultiAgentActors(nn.Module):
    """K block actors; ``forward(feats)`` -> (δ, log c) of shape (batch, d) each."""

    def __init__(self, config: MARLConfig):
        super().__init__()
        self.config = config
        self.actors = nn.ModuleList(BlockActor(lo, hi, config.hidden) for lo, hi in blocks_of(config.dim, config.n_agents))

    def forward(self, feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        deltas, logcs = [], []
        for a in self.actors:
            out = a.net(a.local_state(feats, self.config.dim))
            deltas.append(self.config.delta_max * torch.tanh(out[:, 1:]))
            logcs.append((self.config.log_scale_max * torch.tanh(out[:, :1])).expand(-1, a.hi - a.lo))
        return torch.cat(deltas, 1), torch.cat(logcs, 1)

    def log_density_white(self, w: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """log q_RL up to the θ-independent constant, for whitened moves w = L⁻¹(θ' - θ) / s₀."""
        delta, logc = self(feats)
        z = w * torch.exp(-logc) - delta
        return -0.5 * (z * z).sum(1) - logc.sum(1)


    def log_density_x(self, x_to: torch.Tensor, x_from: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        """log q_RL(x_to | x_from) in whitened coordinates, up to -½ d log 2π, for either base kernel
        (``feats`` are x_from's features)."""
        delta, logc = self(feats)
        mean, std = learned_kernel(x_from, delta, logc, self.config.base, self.config.base_step, xp=torch)
        z = (x_to - mean) / std
        return -0.5 * (z * z).sum(1) - torch.log(std).sum(1)


class CentralValue(nn.Module):
    """Centralized critic V(s) on the global state (x, g, φ) of all agents."""

    def __init__(self, dim: int, hidden: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(2 * dim + 1, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh(),
                                 nn.Linear(hidden, 1))

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        return self.net(feats).squeeze(-1)


class MARLProposal(GaussianProposal):
    """Frozen multi-agent proposal q = w q_safe + (1 - w) q_RL (float64 NumPy copy of the actors), with
    q_safe the base kernel (pilot-covariance random walk or generalized pCN, see :func:`safe_kernel`) and
    q_RL the learned one (:func:`learned_kernel`).

    Its state argument (``misfit`` in the base interface) is the first-level *scaled data residual*
    (``needs_residual``), from which the features are built.
    """

    name = "marl"
    needs_residual = True

    def __init__(self, actors: MultiAgentActors, whitening: Whitening):
        cfg = actors.config
        super().__init__(cfg.dim, cfg.base_step)
        self.config = cfg
        self.name = "marl" if cfg.base == "rw" else "marl-gpcn"
        self.white = whitening
        self.weight_safe = cfg.safe_weight
        self.safe = (LinearGaussianProposal(whitening.chol, cfg.base_step, kind="rw") if cfg.base == "rw" else
                     LinearGaussianProposal(whitening.chol, cfg.base_step, mean=whitening.mean, kind="gpcn"))
        with torch.no_grad():
            self.layers = [(a.lo, a.hi, [(m.weight.double().numpy().copy(), m.bias.double().numpy().copy())
                                         for m in a.net if isinstance(m, nn.Linear)]) for a in actors.actors]
        self._logdet = float(np.sum(np.log(np.diag(whitening.chol))))
        self._cache: dict = {}

    def with_step(self, step):
        return self

    def _check_step(self, step):
        return None

    def actions(self, theta: np.ndarray, residual) -> tuple[np.ndarray, np.ndarray]:
        """(δ, log c) of every whitened coordinate at θ with first-level residual ``residual`` (the current
        state and the last proposals recur within one MH step, so a few are cached)."""
        theta, residual = self._check_theta(theta), np.asarray(residual, float)
        key = (theta.tobytes(), residual.tobytes())
        if key not in self._cache:
            if len(self._cache) > 4:
                self._cache.clear()
            self._cache[key] = self._actions(theta, residual)
        return self._cache[key]

    def _actions(self, theta, residual):
        f = self.white.features(theta, residual)[0]
        d = self.dim
        delta, logc = np.empty(d), np.empty(d)
        for lo, hi, layers in self.layers:
            h = np.concatenate([f[lo:hi], f[d + lo:d + hi], f[-1:]])
            for k, (w, b) in enumerate(layers):
                h = w @ h + b
                if k < len(layers) - 1:
                    h = np.tanh(h)
            delta[lo:hi] = self.config.delta_max * np.tanh(h[1:])
            logc[lo:hi] = self.config.log_scale_max * np.tanh(h[0])
        return delta, logc

    def _learned_x(self, theta, delta, logc):
        """(mean, std) of the learned component in whitened coordinates, from θ's actions."""
        return learned_kernel(self.white.whiten(theta)[0], delta, logc, self.config.base, self.config.base_step)

    def mean_std(self, theta, misfit):
        mean_x, std_x = self._learned_x(self._check_theta(theta), *self.actions(theta, misfit))
        chol = self.white.chol
        return self.white.mean + chol @ mean_x, np.sqrt(((chol * std_x) ** 2).sum(1))

    def sample(self, theta, misfit, rng):
        theta = self._check_theta(theta)
        if rng.random() < self.weight_safe:
            return self.safe.sample(theta, misfit, rng)
        mean_x, std_x = self._learned_x(theta, *self.actions(theta, misfit))
        return self.white.mean + self.white.chol @ (mean_x + std_x * rng.standard_normal(self.dim))

    def log_density_learned(self, theta_to, theta_from, misfit_from) -> float:
        """log q_RL(θ_to | θ_from), the actors evaluated at θ_from's features."""
        return self.log_density_given_actions(theta_to, theta_from, *self.actions(theta_from, misfit_from))

    def log_density_given_actions(self, theta_to, theta_from, delta, logc) -> float:
        """log q_RL(θ_to | θ_from) for given actor outputs (δ, log c)."""
        mean_x, std_x = self._learned_x(self._check_theta(theta_from), delta, logc)
        z = (self.white.whiten(self._check_theta(theta_to))[0] - mean_x) / std_x
        return float(-0.5 * z @ z - np.log(std_x).sum() - self._logdet - 0.5 * self.dim * LOG_2PI)

    def log_density(self, theta_to, theta_from, misfit_from):
        a = np.log(self.weight_safe) + self.safe.log_density(theta_to, theta_from, misfit_from)
        b = np.log1p(-self.weight_safe) + self.log_density_learned(theta_to, theta_from, misfit_from)
        return float(np.logaddexp(a, b))


@dataclass
class MARLTrainConfig:
    n_envs: int = 32
    n_iters: int = 250
    gamma: float = 0.9
    lr_actor: float = 3e-3
    lr_critic: float = 3e-3
    critic_steps: int = 2
    cost_coarse: float = 0.13  # coarse solve cost in units of a fine solve (measured by the caller)
    seed: int = 0


def train_marl(fine, coarse, config: MARLConfig, whitening: Whitening, train: MARLTrainConfig, init,
               progress: bool = False) -> tuple[MultiAgentActors, dict]:
    """Train the actors and the centralized critic on ``n_envs`` parallel delayed-acceptance chains
    (coarse ``coarse`` then fine ``fine``), starting at ``init`` rows. Every coarse and fine solve is
    counted in the returned history (``coarse_solves``, ``fine_solves``, ``cpu_seconds``)."""
    init = np.atleast_2d(np.asarray(init, float))
    if init.shape != (train.n_envs, config.dim):
        raise ValueError(f"init must have shape ({train.n_envs}, {config.dim}), got {init.shape}")
    if not 0 < train.gamma < 1:
        raise ValueError(f"gamma must lie in (0, 1), got {train.gamma}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(fine, coarse, config, whitening, train, init, progress)
    finally:
        torch.set_num_threads(threads)


def _train(fine, coarse, config, white, train, init, progress):
    torch.manual_seed(train.seed)
    rng = np.random.default_rng(train.seed)
    d, n = config.dim, train.n_envs
    actors = MultiAgentActors(config)
    critic = CentralValue(d)
    opt_a = torch.optim.Adam(actors.parameters(), lr=train.lr_actor)
    opt_c = torch.optim.Adam(critic.parameters(), lr=train.lr_critic)
    f0, c0 = fine.n_evals, coarse.n_evals
    t0 = time.process_time()
    theta = init.copy()
    lpc, res = np.zeros(n), np.zeros((n, coarse.data.size))
    lpf = np.zeros(n)
    for i in range(n):
        lpc[i], _ = coarse.evaluate(theta[i])
        res[i] = coarse.last_residual
        lpf[i], _ = fine.evaluate(theta[i])
    s0, w_safe = config.base_step, config.safe_weight
    history = {"reward": [], "accept1": [], "accept2": [], "value": [], "log_c": [], "drift_norm": []}
    bar = tqdm(range(train.n_iters), desc="train MARL", disable=not progress)
    for _ in bar:
        feats = white.features(theta, res)
        ft = torch.as_tensor(feats, dtype=torch.float32)
        with torch.no_grad():
            delta, logc = actors(ft)
        delta, logc = delta.double().numpy(), logc.double().numpy()
        use_safe = rng.random(n) < w_safe
        xi = rng.standard_normal((n, d))
        x = white.whiten(theta)
        mean_l, std_l = learned_kernel(x, delta, logc, config.base, s0)
        mean_s, std_s = safe_kernel(x, config.base, s0)
        x_prop = np.where(use_safe[:, None], mean_s + std_s * xi, mean_l + std_l * xi)
        prop = white.mean + x_prop @ white.chol.T
        lpc_new, res_new = np.zeros(n), np.zeros_like(res)
        for i in range(n):
            lpc_new[i], _ = coarse.evaluate(prop[i])
            res_new[i] = coarse.last_residual
        feats_new = white.features(prop, res_new)
        with torch.no_grad():
            d_new, lc_new = actors(torch.as_tensor(feats_new, dtype=torch.float32))
        d_new, lc_new = d_new.double().numpy(), lc_new.double().numpy()

        def mix(x_to, x_from, dl, lc):  # log mixture density up to its θ-independent constant
            ms, ss = safe_kernel(x_from, config.base, s0)
            ml, sl = learned_kernel(x_from, dl, lc, config.base, s0)
            zs, zl = (x_to - ms) / ss, (x_to - ml) / sl
            return np.logaddexp(np.log(w_safe) - 0.5 * (zs * zs).sum(1) - d * np.log(ss),
                                np.log1p(-w_safe) - 0.5 * (zl * zl).sum(1) - np.log(sl).sum(1))

        x_new = white.whiten(prop)
        log_fwd, log_rev = mix(x_new, x, delta, logc), mix(x, x_new, d_new, lc_new)
        pass1, alpha1 = mh_accept(lpc_new - lpc + log_rev - log_fwd, rng)
        log_a2 = np.full(n, -np.inf)  # stage 2 runs where stage 1 passed; elsewhere α₂ = 0
        lpf_new = lpf.copy()
        for i in np.flatnonzero(pass1):
            lpf_new[i], _ = fine.evaluate(prop[i])
            log_a2[i] = lpf_new[i] - lpf[i] + lpc[i] - lpc_new[i]
        move, alpha2 = mh_accept(log_a2, rng)
        jump = ((x_new - x) ** 2).sum(1) / d  # whitened squared jump |L⁻¹(θ' - θ)|² / d
        reward = pass1 * alpha2 * jump / (train.cost_coarse + alpha1)
        theta = np.where(move[:, None], prop, theta)
        lpc = np.where(move, lpc_new, lpc)
        lpf = np.where(move, lpf_new, lpf)
        res = np.where(move[:, None], res_new, res)
        # --- centralized critic: TD(0) on V -----------------------------------------------------------
        ft_next = torch.as_tensor(white.features(theta, res), dtype=torch.float32)
        r_t = torch.as_tensor(reward, dtype=torch.float32)
        for _ in range(train.critic_steps):
            with torch.no_grad():
                target = r_t + train.gamma * critic(ft_next)
            loss_c = nn.functional.mse_loss(critic(ft), target)
            opt_c.zero_grad()
            loss_c.backward()
            opt_c.step()
        with torch.no_grad():
            adv = r_t + train.gamma * critic(ft_next) - critic(ft)
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        # --- actors: policy gradient with the shared TD advantage (learned-component draws only) ---------
        learned = torch.as_tensor(~use_safe)
        if learned.any():
            logq = actors.log_density_x(torch.as_tensor(x_new, dtype=torch.float32),
                                        torch.as_tensor(x, dtype=torch.float32), ft)
            loss_a = -(adv * logq)[learned].mean()
            opt_a.zero_grad()
            loss_a.backward()
            opt_a.step()
        history["reward"].append(float(reward.mean()))
        history["accept1"].append(float(alpha1.mean()))
        history["accept2"].append(float(alpha2[pass1].mean()) if pass1.any() else float("nan"))
        history["value"].append(float(critic(ft).mean().detach()))
        history["log_c"].append(float(logc.mean()))
        history["drift_norm"].append(float(np.sqrt((delta**2).sum(1)).mean()))
        bar.set_postfix(r=f"{reward.mean():.3g}", a1=f"{alpha1.mean():.2f}")
    history["cpu_seconds"] = time.process_time() - t0
    history["fine_solves"] = fine.n_evals - f0
    history["coarse_solves"] = coarse.n_evals - c0
    actors.eval()
    return actors, history


def save_marl(actors: MultiAgentActors, whitening: Whitening, path: str, extra: dict | None = None) -> None:
    """Checkpoint: actor weights, config and the frozen whitening (no pickled code)."""
    torch.save({"config": asdict(actors.config), "state_dict": actors.state_dict(),
                "whitening": {k: torch.as_tensor(v) for k, v in asdict(whitening).items()}, "extra": extra or {}}, path)


def load_marl(path: str) -> MARLProposal:
    data = torch.load(path, map_location="cpu", weights_only=True)
    actors = MultiAgentActors(MARLConfig(**data["config"]))
    actors.load_state_dict(data["state_dict"])
    white = Whitening(**{k: v.double().numpy() for k, v in data["whitening"].items()})
    return MARLProposal(actors.eval(), white)


__all__ = ["learned_kernel", "safe_kernel", "MARLConfig", "MARLProposal", "MARLTrainConfig", "MultiAgentActors", "CentralValue", "Whitening",
           "jacobian_fd", "train_marl", "save_marl", "load_marl", "blocks_of"]
