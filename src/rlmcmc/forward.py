"""Fine-scale forward models for the multiscale Darcy inverse problem.

Implements the forward problems of the paper *Multi-agent reinforcement learning accelerated MCMC on
multiscale inversion problems* (Chung, Efendiev, Leung, Pun, Zhang): flow in a heterogeneous medium on
the unit square Ω = (0, 1)², discretized by bilinear (Q1) finite elements on a uniform ``n x n`` grid.

* steady:     -div(κ ∇u) = f in Ω,  u = 0 on ∂Ω;
* transient:  c u_t - div(κ ∇u) = f in Ω × (0, T],  u = 0 on ∂Ω,  u(·, 0) = 0, with a constant storage
  coefficient c > 0 (parabolic Darcy flow; c = 1 by default), backward Euler in time:
  (c M + Δt A) uⁿ⁺¹ = c M uⁿ + Δt Fⁿ⁺¹, with one sparse LU of (c M + Δt A) per κ.

κ is piecewise constant on the fine cells (one value per element). Assembly is vectorized: every
element matrix is ``κ_e K_ref`` (in 2-D the Q1 stiffness of a square does not depend on h), so the
global sparse values are one precomputed linear map (a CSR "scatter" matrix) applied to κ.

The permeability field is ``log κ = b(x) + Σ_k sqrt(λ_k) φ_k(x) θ_k`` with a channelized
background ``b`` and a Karhunen–Loève (KL) expansion of a separable exponential covariance
``σ² exp(-|x1-y1|/ℓ - |x2-y2|/ℓ)``; the KL functions come from a Nyström discretization on a fixed
1-D quadrature, so the same θ gives the same field on any grid (data are made on a finer grid).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.linalg
import scipy.sparse as sp
import scipy.sparse.linalg as spla

# Q1 element matrices on the reference square, ordered (0,0), (1,0), (1,1), (0,1) counter-clockwise.
# Stiffness of a square element of any side h in 2-D (h cancels); mass is h^2/36 * MASS_REF.
STIFF_REF = np.array(
    [[4.0, -1.0, -2.0, -1.0], [-1.0, 4.0, -1.0, -2.0], [-2.0, -1.0, 4.0, -1.0], [-1.0, -2.0, -1.0, 4.0]]
) / 6.0
MASS_REF = np.array(
    [[4.0, 2.0, 1.0, 2.0], [2.0, 4.0, 2.0, 1.0], [1.0, 2.0, 4.0, 2.0], [2.0, 1.0, 2.0, 4.0]]
) / 36.0


def check_positive_int(value, name: str) -> int:
    """Return ``value`` as int, raising TypeError/ValueError that names ``name`` if it is not a positive int."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be a positive int, got {type(value).__name__} {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


class ScatterAssembler:
    """Sparse matrix whose values are linear in per-element coefficients: ``A(c) = Σ_e c_e E_e``.

    ``rows``/``cols``/``vals`` have shape (n_elements, k): element e contributes ``c_e * vals[e]`` at
    ``(rows[e], cols[e])``. The CSR pattern and the scatter map are computed once; ``matrix(c)`` is then
    one sparse mat-vec (no Python loop over elements).
    """

    def __init__(self, rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, shape: tuple[int, int]):
        n_el = rows.shape[0]
        keys = rows.astype(np.int64).ravel() * shape[1] + cols.astype(np.int64).ravel()
        uniq, inverse = np.unique(keys, return_inverse=True)
        self.shape = shape
        self.indices = (uniq % shape[1]).astype(np.int32)
        self.indptr = np.searchsorted(uniq // shape[1], np.arange(shape[0] + 1)).astype(np.int32)
        self.entry_rows = (uniq // shape[1]).astype(np.int64)
        element = np.repeat(np.arange(n_el), rows.shape[1])
        self.scatter = sp.csr_matrix((vals.ravel(), (inverse, element)), shape=(uniq.size, n_el))

    def matrix(self, coef: np.ndarray) -> sp.csr_matrix:
        """The assembled CSR matrix for per-element coefficients ``coef`` (shape (n_elements,))."""
        data = self.scatter @ np.asarray(coef, dtype=float)
        return sp.csr_matrix((data, self.indices.copy(), self.indptr.copy()), shape=self.shape)

    def dense(self, coef: np.ndarray) -> np.ndarray:
        """The assembled matrix as a dense array (for small coarse systems)."""
        out = np.zeros(self.shape)
        out[self.entry_rows, self.indices] = self.scatter @ np.asarray(coef, dtype=float)
        return out


@dataclass
class Q1Mesh:
    """Uniform ``n x n`` Q1 mesh of the unit square; nodes are numbered ``j * (n + 1) + i`` (x index i)."""

    n: int

    def __post_init__(self):
        self.n = check_positive_int(self.n, "n (fine grid cells per side)")
        n = self.n
        self.h = 1.0 / n
        self.n_nodes = (n + 1) ** 2
        self.n_elements = n * n
        ex, ey = np.meshgrid(np.arange(n), np.arange(n), indexing="xy")
        base = (ey * (n + 1) + ex).ravel()
        self.elements = np.stack([base, base + 1, base + n + 2, base + n + 1], axis=1)
        gx, gy = np.meshgrid(np.linspace(0, 1, n + 1), np.linspace(0, 1, n + 1), indexing="xy")
        self.nodes = np.stack([gx.ravel(), gy.ravel()], axis=1)
        cx = (np.arange(n) + 0.5) * self.h
        mx, my = np.meshgrid(cx, cx, indexing="xy")
        self.centers = np.stack([mx.ravel(), my.ravel()], axis=1)
        on_boundary = (
            np.isclose(self.nodes[:, 0], 0) | np.isclose(self.nodes[:, 0], 1)
            | np.isclose(self.nodes[:, 1], 0) | np.isclose(self.nodes[:, 1], 1)
        )
        self.boundary = np.flatnonzero(on_boundary)
        self.interior = np.flatnonzero(~on_boundary)
        rows = np.repeat(self.elements, 4, axis=1)
        cols = np.tile(self.elements, (1, 4))
        full = (self.n_nodes, self.n_nodes)
        self.stiffness_assembler = ScatterAssembler(rows, cols, np.tile(STIFF_REF.ravel(), (self.n_elements, 1)), full)
        self.mass_assembler = ScatterAssembler(
            rows, cols, np.tile(self.h**2 * MASS_REF.ravel(), (self.n_elements, 1)), full
        )
        self.mass = self.mass_assembler.matrix(np.ones(self.n_elements))

    def check_kappa(self, kappa: np.ndarray) -> np.ndarray:
        """Validate a per-element coefficient: shape (n*n,), finite and positive."""
        kappa = np.asarray(kappa, dtype=float)
        if kappa.shape != (self.n_elements,):
            raise ValueError(
                f"kappa must have one value per fine element, shape ({self.n_elements},), got {kappa.shape}")
        if not np.all(np.isfinite(kappa)) or np.any(kappa <= 0):
            raise ValueError("kappa must be finite and positive everywhere")
        return kappa

    def load_vector(self, source) -> np.ndarray:
        """Load vector ``F_i = ∫ f φ_i`` with f interpolated in the Q1 space (f callable (x, y) or a constant)."""
        if callable(source):
            values = np.asarray(source(self.nodes[:, 0], self.nodes[:, 1]), dtype=float) * np.ones(self.n_nodes)
        else:
            values = float(source) * np.ones(self.n_nodes)
        return self.mass @ values

    def observation_matrix(self, points: np.ndarray) -> sp.csr_matrix:
        """Sparse ``B`` with ``(B u)_k = u_h(points[k])`` by bilinear interpolation (points inside [0, 1]²)."""
        points = np.atleast_2d(np.asarray(points, dtype=float))
        if points.shape[1] != 2 or np.any(points < 0) or np.any(points > 1):
            raise ValueError("observation points must be an (m, 2) array inside the unit square")
        n = self.n
        ix = np.minimum((points[:, 0] * n).astype(int), n - 1)
        iy = np.minimum((points[:, 1] * n).astype(int), n - 1)
        sx = points[:, 0] * n - ix
        sy = points[:, 1] * n - iy
        e = iy * n + ix
        weights = np.stack([(1 - sx) * (1 - sy), sx * (1 - sy), sx * sy, (1 - sx) * sy], axis=1)
        m = points.shape[0]
        return sp.csr_matrix((weights.ravel(), (np.repeat(np.arange(m), 4), self.elements[e].ravel())),
                             shape=(m, self.n_nodes))


def solve_steady(mesh: Q1Mesh, kappa: np.ndarray, load: np.ndarray) -> np.ndarray:
    """Solve -div(κ∇u) = f, u = 0 on ∂Ω; ``load`` is the full nodal load vector. Returns all nodal values."""
    kappa = mesh.check_kappa(kappa)
    a = mesh.stiffness_assembler.matrix(kappa)
    inner = mesh.interior
    u = np.zeros(mesh.n_nodes)
    u[inner] = spla.spsolve(a[inner][:, inner].tocsc(), load[inner])
    return u


def check_storage(storage) -> float:
    """The storage coefficient c of c u_t - div(κ∇u) = f as a float, raising if it is not finite and > 0."""
    if isinstance(storage, bool) or not isinstance(storage, (int, float, np.integer, np.floating)):
        raise TypeError(f"storage must be a positive number, got {type(storage).__name__} {storage!r}")
    if not (np.isfinite(storage) and storage > 0):
        raise ValueError(f"storage must be finite and positive, got {storage}")
    return float(storage)


def solve_transient(mesh: Q1Mesh, kappa: np.ndarray, load: np.ndarray, t_final: float, n_steps: int,
                    save_steps=None, storage: float = 1.0) -> np.ndarray:
    """Backward Euler for c u_t - div(κ∇u) = f, u = 0 on ∂Ω, u(0) = 0 (c = ``storage``); one LU of
    (c M + Δt A) per κ.

    ``load`` is the full nodal load vector, or a callable ``t -> load vector`` for a time-dependent f
    (evaluated at t_{n+1}, as backward Euler requires). Returns the nodal solutions at ``save_steps``
    (1-based step indices; default all), shape (len, n_nodes).
    """
    kappa = mesh.check_kappa(kappa)
    n_steps = check_positive_int(n_steps, "n_steps")
    if not t_final > 0:
        raise ValueError(f"t_final must be positive, got {t_final}")
    save = np.arange(1, n_steps + 1) if save_steps is None else np.asarray(save_steps, dtype=int)
    dt = t_final / n_steps
    inner = mesh.interior
    a = mesh.stiffness_assembler.matrix(kappa)[inner][:, inner]
    m = check_storage(storage) * mesh.mass[inner][:, inner]
    lu = spla.splu((m + dt * a).tocsc())
    load_at = load if callable(load) else (lambda t: load)
    u = np.zeros(inner.size)
    out = np.zeros((save.size, mesh.n_nodes))
    wanted = {int(s): k for k, s in enumerate(save)}
    for step in range(1, n_steps + 1):
        u = lu.solve(m @ u + dt * load_at(step * dt)[inner])
        if step in wanted:
            out[wanted[step], inner] = u
    return out


def nystrom_1d(length_scale: float, n_quad: int = 256, n_modes: int = 16):
    """Eigenpairs of the 1-D exponential kernel exp(-|x-y|/ℓ) on [0, 1] by Nyström (midpoint rule).

    Returns (eigenvalues, nodes, node_values) with eigenvalues descending; functions are L²-normalized.
    """
    x = (np.arange(n_quad) + 0.5) / n_quad
    w = 1.0 / n_quad
    kernel = np.exp(-np.abs(x[:, None] - x[None, :]) / length_scale)
    lam, vec = scipy.linalg.eigh(w * kernel)
    order = np.argsort(lam)[::-1][:n_modes]
    return lam[order], x, vec[:, order] / np.sqrt(w)


@dataclass
class PermeabilityModel:
    """log κ = channelized background + KL expansion; θ ~ N(0, I_d) are the unknown KL coefficients.

    The background has ``n_channels`` sinuous high-permeability channels: log κ = log(contrast) inside,
    0 outside (so κ spans ``contrast`` before the KL perturbation). The KL part uses the separable
    exponential covariance ``sigma² exp(-|Δx|/ℓ - |Δy|/ℓ)``; its 2-D eigenpairs are products of 1-D
    Nyström eigenpairs, the ``dim`` largest kept.
    """

    dim: int = 16
    sigma: float = 1.0
    length_scale: float = 0.3
    contrast: float = 1.0e3
    n_channels: int = 2
    channel_width: float = 0.06
    # Channel geometry as unknowns: θ gets one extra N(0, 1) entry per channel (after the KL
    # coefficients) that shifts that channel's centre line by ``geometry_scale * θ_g``; the channel edge is
    # then a smooth logistic of width ``edge_width`` so that κ (and the likelihood) is continuous in θ_g.
    geometry: bool = False
    geometry_scale: float = 0.05
    edge_width: float = 0.01

    def __post_init__(self):
        self.dim = check_positive_int(self.dim, "dim (number of KL modes)")
        if not (self.sigma > 0 and self.length_scale > 0 and self.contrast >= 1):
            raise ValueError("need sigma > 0, length_scale > 0 and contrast >= 1")
        n1 = int(np.ceil(np.sqrt(self.dim))) + 4
        lam1, self._x1, phi1 = nystrom_1d(self.length_scale, n_modes=n1)
        lam2 = np.outer(lam1, lam1).ravel()
        order = np.argsort(lam2)[::-1][: self.dim]
        self.eigenvalues = self.sigma**2 * lam2[order]
        self._pairs = np.stack(np.unravel_index(order, (n1, n1)), axis=1)
        self._lam1 = lam1
        self._phi1 = phi1

    def _phi_1d(self, x: np.ndarray) -> np.ndarray:
        """Nyström interpolation of the 1-D eigenfunctions at points x: φ(x) = Σ_j w k(x, x_j) φ(x_j) / λ."""
        w = 1.0 / self._x1.size
        k = np.exp(-np.abs(x[:, None] - self._x1[None, :]) / self.length_scale)
        return (w * k @ self._phi1) / self._lam1

    @property
    def n_unknowns(self) -> int:
        """Length of θ: KL coefficients, then one channel shift per channel when ``geometry``."""
        return self.dim + (self.n_channels if self.geometry else 0)

    def background(self, points: np.ndarray, shifts=None) -> np.ndarray:
        """Channelized log κ background at (m, 2) points (channel centres moved by ``shifts`` when given;
        with ``geometry`` the channel indicator is smooth)."""
        x, y = points[:, 0], points[:, 1]
        shifts = np.zeros(self.n_channels) if shifts is None else np.asarray(shifts, float)
        if not self.geometry:
            inside = np.zeros(points.shape[0], dtype=bool)
            for c in range(self.n_channels):
                centre = (c + 1) / (self.n_channels + 1) + 0.08 * np.sin(2 * np.pi * (x + 0.3 * c))
                inside |= np.abs(y - centre) < self.channel_width
            return np.where(inside, np.log(self.contrast), 0.0)
        inside = np.zeros(points.shape[0])
        for c in range(self.n_channels):
            centre = (c + 1) / (self.n_channels + 1) + 0.08 * np.sin(2 * np.pi * (x + 0.3 * c)) + shifts[c]
            z = np.clip((self.channel_width - np.abs(y - centre)) / self.edge_width, -50, 50)
            inside = np.maximum(inside, 1.0 / (1.0 + np.exp(-z)))
        return np.log(self.contrast) * inside

    def kl_basis(self, points: np.ndarray) -> np.ndarray:
        """Matrix Φ (m, dim) with log κ = background + Φ θ at the points."""
        px = self._phi_1d(points[:, 0])
        py = self._phi_1d(points[:, 1])
        return px[:, self._pairs[:, 0]] * py[:, self._pairs[:, 1]] * np.sqrt(self.eigenvalues)

    def field_map(self, mesh: Q1Mesh) -> "FieldMap":
        """Precomputed map θ -> κ on the cells of ``mesh``."""
        return FieldMap(self.background(mesh.centers), self.kl_basis(mesh.centers), self.n_unknowns,
                        self if self.geometry else None, mesh.centers if self.geometry else None)


@dataclass
class FieldMap:
    """θ -> κ = exp(background + Φ θ_KL) on the cells of one mesh (background moved by the channel
    shifts θ_g when the model has geometry unknowns)."""

    background: np.ndarray
    basis: np.ndarray
    dim: int
    model: "PermeabilityModel | None" = None
    centers: np.ndarray | None = None

    def log_kappa(self, theta: np.ndarray) -> np.ndarray:
        theta = np.asarray(theta, dtype=float)
        if theta.shape != (self.dim,):
            raise ValueError(f"theta must have shape ({self.dim},), got {theta.shape}")
        n_kl = self.basis.shape[1]
        if self.model is None:
            return self.background + self.basis @ theta
        shifts = self.model.geometry_scale * theta[n_kl:]
        return self.model.background(self.centers, shifts) + self.basis @ theta[:n_kl]

    def kappa(self, theta: np.ndarray) -> np.ndarray:
        return np.exp(self.log_kappa(theta))


def observation_points(n_side: int, margin: float = 0.1) -> np.ndarray:
    """An ``n_side x n_side`` lattice of interior points in [margin, 1 - margin]²."""
    n_side = check_positive_int(n_side, "n_side")
    t = np.linspace(margin, 1 - margin, n_side)
    gx, gy = np.meshgrid(t, t, indexing="xy")
    return np.stack([gx.ravel(), gy.ravel()], axis=1)


@dataclass
class DarcyProblem:
    """A forward map θ -> observations on one fine mesh (steady or transient), source f = ``source``.

    ``kind`` is "steady" or "transient"; the transient problem is c u_t - div(κ∇u) = f with c =
    ``storage``, and its data are the solution at the observation points at ``obs_steps`` (1-based
    backward-Euler steps), flattened time-major.
    """

    n: int
    field: PermeabilityModel
    points: np.ndarray
    kind: str = "steady"
    source: float = 10.0
    t_final: float = 0.01
    n_steps: int = 20
    obs_steps: tuple = (5, 10, 20)
    storage: float = 1.0

    def __post_init__(self):
        if self.kind not in ("steady", "transient"):
            raise ValueError(f"kind must be 'steady' or 'transient', got {self.kind!r}")
        self.mesh = Q1Mesh(self.n)
        self.fields = self.field.field_map(self.mesh)
        self.load = self.mesh.load_vector(self.source)
        self.obs = self.mesh.observation_matrix(self.points)
        self.obs_steps = tuple(int(s) for s in self.obs_steps)
        self.storage = check_storage(self.storage)
        if self.kind == "transient" and (min(self.obs_steps) < 1 or max(self.obs_steps) > self.n_steps):
            raise ValueError(f"obs_steps must lie in 1..{self.n_steps}, got {self.obs_steps}")

    @property
    def dim(self) -> int:
        return self.field.n_unknowns

    def solve(self, theta: np.ndarray) -> np.ndarray:
        """Nodal solution(s): shape (n_nodes,) steady, (len(obs_steps), n_nodes) transient."""
        kappa = self.fields.kappa(theta)
        if self.kind == "steady":
            return solve_steady(self.mesh, kappa, self.load)
        return solve_transient(self.mesh, kappa, self.load, self.t_final, self.n_steps, self.obs_steps,
                               storage=self.storage)

    def observe(self, theta: np.ndarray) -> np.ndarray:
        """Predicted observations G(θ)."""
        u = self.solve(theta)
        return np.asarray(self.obs @ np.atleast_2d(u).T).T.ravel()
