"""The synthetic multiscale Darcy inverse problem: truth, data (made on a finer grid), fine and coarse
posteriors. Follows the setup of Chung et al., *Multi-agent reinforcement learning accelerated MCMC on
multiscale inversion problems*: θ ~ N(0, I) KL coefficients, pointwise pressure data with relative noise.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from .forward import DarcyProblem, PermeabilityModel, check_positive_int, observation_points
from .gmsfem import GMsFEMProblem
from .sampling import Posterior


@dataclass
class ProblemConfig:
    """Sizes and physics of one inverse problem (defaults: the issue's 100x100 fine, 10x10 coarse)."""

    n_fine: int = 100
    n_coarse: int = 10
    n_basis: int = 3
    data_refine: int = 2
    dim: int = 16
    n_obs_side: int = 5
    noise_level: float = 0.01
    kind: str = "steady"
    contrast: float = 1.0e3
    t_final: float = 0.01
    n_steps: int = 20
    storage: float = 1.0  # c in c u_t - div(κ∇u) = f (transient only)
    seed: int = 1
    geometry: bool = False  # channel shifts as extra unknowns (see PermeabilityModel.geometry)

    def __post_init__(self):
        for name in ("n_fine", "n_coarse", "n_basis", "data_refine", "dim", "n_obs_side", "n_steps"):
            check_positive_int(getattr(self, name), name)
        if not 0 < self.noise_level < 1:
            raise ValueError(f"noise_level must lie in (0, 1), got {self.noise_level}")


@dataclass
class InverseProblem:
    config: ProblemConfig
    field: PermeabilityModel
    fine: DarcyProblem
    coarse: GMsFEMProblem
    theta_true: np.ndarray
    data: np.ndarray
    noise_std: float

    error_bias: np.ndarray | None = None
    error_var: np.ndarray | None = None

    def calibrate_error_model(self, n_samples: int = 20, seed: int = 123) -> int:
        """Approximation-error model for the coarse level (Kaipio & Somersalo, J. Comput. Appl. Math.
        198 (2007)): mean and variance of G_fine(θ) - G_coarse(θ) over prior draws, computed offline
        with ``n_samples`` fine solves (returned, to be reported as an offline cost)."""
        rng = np.random.default_rng(seed)
        diffs = np.array([self.fine.observe(t) - self.coarse.observe(t)
                          for t in rng.standard_normal((check_positive_int(n_samples, "n_samples"), self.fine.dim))])
        self.error_bias, self.error_var = diffs.mean(axis=0), diffs.var(axis=0)
        return n_samples

    def posteriors(self) -> tuple[Posterior, Posterior]:
        """Fresh (fine, coarse) posteriors with zeroed solve counters; the coarse one uses the
        approximation-error model when it has been calibrated."""
        coarse_kw = {} if self.error_bias is None else {"bias": self.error_bias, "extra_var": self.error_var}
        return (Posterior(self.fine, self.data, self.noise_std),
                Posterior(self.coarse, self.data, self.noise_std, **coarse_kw))

    def describe(self) -> dict:
        return {**asdict(self.config), "theta_true": self.theta_true.tolist(), "noise_std": self.noise_std,
                "n_data": int(self.data.size), "coarse_dofs": int(self.coarse.n_dof)}


def make_problem(config: ProblemConfig = ProblemConfig()) -> InverseProblem:
    """Draw θ_true from the prior, solve on an ``data_refine``-times finer grid, add noise with
    std = noise_level x max|G(θ_true)|, and build the inference (fine, GMsFEM) forward maps."""
    rng = np.random.default_rng(config.seed)
    field = PermeabilityModel(dim=config.dim, contrast=config.contrast, geometry=config.geometry)
    points = observation_points(config.n_obs_side)
    physics = dict(kind=config.kind, t_final=config.t_final, n_steps=config.n_steps, storage=config.storage,
                   obs_steps=tuple(sorted({max(1, config.n_steps // 4), max(1, config.n_steps // 2), config.n_steps})))
    truth_model = DarcyProblem(config.n_fine * config.data_refine, field, points, **physics)
    fine = DarcyProblem(config.n_fine, field, points, **physics)
    coarse = GMsFEMProblem(fine, config.n_coarse, config.n_basis)
    theta_true = rng.standard_normal(field.n_unknowns)
    clean = truth_model.observe(theta_true)
    noise_std = config.noise_level * float(np.max(np.abs(clean)))
    data = clean + noise_std * rng.standard_normal(clean.size)
    return InverseProblem(config, field, fine, coarse, theta_true, data, noise_std)
