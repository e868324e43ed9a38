"""Generalized Multiscale Finite Element Method (GMsFEM) coarse solver.

Follows Efendiev, Galvis & Hou, *Generalized multiscale finite element methods (GMsFEM)*,
J. Comput. Phys. 251 (2013), as used for the first MCMC level in *Multi-agent reinforcement learning
accelerated MCMC on multiscale inversion problems* (Chung, Efendiev, Leung, Pun, Zhang):

1. Coarse grid ``nc x nc`` over the fine ``n x n`` grid (``n`` divisible by ``nc``). Each interior coarse
   node ``x_i`` has the neighborhood ω_i (the ≤ 4 coarse cells sharing it).
2. Snapshot space on ω_i: κ-harmonic extensions ``-div(κ∇ψ) = 0`` in ω_i with a fine-grid delta as
   Dirichlet data on each fine node of ∂ω_i.
3. Local spectral problem in the snapshot space: ``A_ω φ = λ S_ω φ`` with the Neumann stiffness
   ``A_ω`` and the κ-weighted mass ``S_ω = Σ_e κ_e M_e``; keep the ``n_basis`` smallest eigenpairs.
4. Multiscale basis ``χ_i φ_k`` with χ_i the coarse bilinear partition of unity; the columns form the
   prolongation ``R`` (fine nodes x coarse dofs); the coarse system is ``Rᵀ A(κ) R``.

Choice (documented in docs/rlmcmc.md): the offline basis is built once from a reference κ (the prior
mean, θ = 0) and reused for every θ online. Only interior coarse nodes carry basis functions, and R's
rows at fine boundary nodes are zero, so coarse functions satisfy u = 0 on ∂Ω exactly. Because
``A(κ) = Σ_e κ_e K_e`` is linear in κ, the online ``Rᵀ A(κ) R = Σ_e κ_e (R_eᵀ K_ref R_e)`` is one
precomputed sparse map applied to κ — the online cost never touches a fine-grid matrix.
"""

from __future__ import annotations

import numpy as np
import scipy.linalg
from scipy.linalg.lapack import dpotrs

from .forward import MASS_REF, STIFF_REF, DarcyProblem, ScatterAssembler, check_positive_int


def neighborhood_basis(problem: DarcyProblem, kappa: np.ndarray, nc: int, n_basis: int):
    """Offline step: return the dense prolongation ``R`` (n_nodes x (nc-1)² n_basis) and eigenvalues.

    ``kappa`` is the per-fine-element coefficient the basis is built from.
    """
    mesh = problem.mesh
    n = mesh.n
    nc = check_positive_int(nc, "nc (coarse cells per side)")
    n_basis = check_positive_int(n_basis, "n_basis (basis functions per neighborhood)")
    if nc < 2 or n % nc:
        raise ValueError(f"coarse grid nc={nc} must be >= 2 and divide the fine grid n={n}")
    r = n // nc
    n_local_max = (2 * r + 1) ** 2
    if n_basis > 4 * r:
        raise ValueError(f"n_basis={n_basis} exceeds the snapshot space size per neighborhood (~{4 * r})")
    kappa = mesh.check_kappa(kappa)
    big_h = 1.0 / nc
    cols = []
    eigenvalues = []
    for jc in range(1, nc):
        for ic in range(1, nc):
            i0, i1 = (ic - 1) * r, (ic + 1) * r  # fine node index range in x (inclusive)
            j0, j1 = (jc - 1) * r, (jc + 1) * r
            li, lj = np.meshgrid(np.arange(i0, i1 + 1), np.arange(j0, j1 + 1), indexing="xy")
            nodes = (lj * (n + 1) + li).ravel()
            m = 2 * r + 1
            assert nodes.size == n_local_max
            ex, ey = np.meshgrid(np.arange(2 * r), np.arange(2 * r), indexing="xy")
            base = (ey * m + ex).ravel()
            elems_local = np.stack([base, base + 1, base + m + 1, base + m], axis=1)
            glob_e = ((ey + j0) * n + (ex + i0)).ravel()
            k_loc = kappa[glob_e]
            a_loc = np.zeros((m * m, m * m))
            s_loc = np.zeros((m * m, m * m))
            rows = np.repeat(elems_local, 4, axis=1).ravel()
            colsx = np.tile(elems_local, (1, 4)).ravel()
            np.add.at(a_loc, (rows, colsx), (k_loc[:, None] * STIFF_REF.ravel()).ravel())
            np.add.at(s_loc, (rows, colsx), (k_loc[:, None] * mesh.h**2 * MASS_REF.ravel()).ravel())
            ii, jj = np.meshgrid(np.arange(m), np.arange(m), indexing="xy")
            on_b = ((ii == 0) | (ii == m - 1) | (jj == 0) | (jj == m - 1)).ravel()
            b_idx, i_idx = np.flatnonzero(on_b), np.flatnonzero(~on_b)
            snap = np.zeros((m * m, b_idx.size))
            snap[b_idx, np.arange(b_idx.size)] = 1.0
            snap[i_idx] = scipy.linalg.solve(a_loc[np.ix_(i_idx, i_idx)], -a_loc[np.ix_(i_idx, b_idx)],
                                             assume_a="pos")
            a_s = snap.T @ a_loc @ snap
            s_s = snap.T @ s_loc @ snap
            lam, vec = scipy.linalg.eigh(a_s, s_s, subset_by_index=[0, n_basis - 1])
            phi = snap @ vec
            # Scale each eigenvector to max |φ| = 1 with a positive peak (a canonical sign).
            peak = phi[np.abs(phi).argmax(axis=0), np.arange(n_basis)]
            phi /= peak
            xy = mesh.nodes[nodes]
            chi = (np.maximum(0, 1 - np.abs(xy[:, 0] - ic * big_h) / big_h)
                   * np.maximum(0, 1 - np.abs(xy[:, 1] - jc * big_h) / big_h))
            for k in range(n_basis):
                col = np.zeros(mesh.n_nodes)
                col[nodes] = chi * phi[:, k]
                cols.append(col)
            eigenvalues.append(lam)
    prolong = np.stack(cols, axis=1)
    prolong[mesh.boundary] = 0.0
    return prolong, np.array(eigenvalues)


class GMsFEMProblem:
    """Coarse GMsFEM forward map with the same interface as :class:`DarcyProblem` (``observe``, ``solve``).

    Built offline from ``fine`` (a DarcyProblem that supplies mesh, field, load, observation points
    and time stepping) and a reference θ (default the prior mean 0).
    """

    def __init__(self, fine: DarcyProblem, nc: int, n_basis: int = 3, reference_theta=None):
        self.fine = fine
        self.kind = fine.kind
        self.nc = nc
        self.n_basis = n_basis
        mesh = fine.mesh
        theta0 = np.zeros(fine.dim) if reference_theta is None else np.asarray(reference_theta, float)
        self.prolong, self.eigenvalues = neighborhood_basis(fine, fine.fields.kappa(theta0), nc, n_basis)
        n_dof = self.prolong.shape[1]
        self.n_dof = n_dof
        # Per-coarse-cell dof table (dummy dof n_dof for boundary coarse nodes, dropped afterwards).
        r = mesh.n // nc
        node_dof = np.full((nc + 1, nc + 1), -1)
        node_dof[1:nc, 1:nc] = np.arange((nc - 1) ** 2).reshape(nc - 1, nc - 1)
        ex, ey = np.meshgrid(np.arange(mesh.n), np.arange(mesh.n), indexing="xy")
        cx, cy = (ex // r).ravel(), (ey // r).ravel()
        corners = np.stack([node_dof[cy, cx], node_dof[cy, cx + 1], node_dof[cy + 1, cx + 1],
                            node_dof[cy + 1, cx]], axis=1)  # node_dof indexed [y, x]
        dofs = np.where(corners[:, :, None] >= 0, corners[:, :, None] * n_basis + np.arange(n_basis), n_dof)
        dofs = dofs.reshape(mesh.n_elements, 4 * n_basis)
        r_ext = np.concatenate([self.prolong, np.zeros((mesh.n_nodes, 1))], axis=1)
        r_el = r_ext[mesh.elements[:, :, None], dofs[:, None, :]]  # (ne, 4, 4L)
        g = np.einsum("eai,ab,ebj->eij", r_el, STIFF_REF, r_el)
        rows = np.repeat(dofs, 4 * n_basis, axis=1)
        cols = np.tile(dofs, (1, 4 * n_basis))
        self._assembler = ScatterAssembler(rows, cols, g.reshape(mesh.n_elements, -1), (n_dof + 1, n_dof + 1))
        self.load = self.prolong.T @ fine.load
        self.obs = np.asarray(fine.obs @ self.prolong)
        self.mass = self.prolong.T @ (mesh.mass @ self.prolong)

    @property
    def dim(self) -> int:
        return self.fine.dim

    def stiffness(self, kappa: np.ndarray) -> np.ndarray:
        """Dense coarse stiffness ``Rᵀ A(κ) R`` for per-fine-element κ."""
        return self._assembler.dense(kappa)[: self.n_dof, : self.n_dof]

    def solve_coarse(self, theta: np.ndarray) -> np.ndarray:
        """Coarse coefficients: shape (n_dof,) steady, (len(obs_steps), n_dof) transient."""
        f = self.fine
        a_h = self.stiffness(f.fields.kappa(theta))
        if self.kind == "steady":
            return scipy.linalg.cho_solve(scipy.linalg.cho_factor(a_h), self.load)
        dt = f.t_final / f.n_steps
        # One Cholesky of (c M_H + dt A_H), then each backward-Euler step is one pair of triangular solves
        # (LAPACK potrs; cheaper than forming the step operator (c M_H + dt A_H)⁻¹ c M_H for 20 steps).
        mass = f.storage * self.mass
        factor, lower = scipy.linalg.cho_factor(mass + dt * a_h)
        load = dt * self.load
        u = np.zeros(self.n_dof)
        out = []
        wanted = set(f.obs_steps)
        for step in range(1, f.n_steps + 1):
            u, info = dpotrs(factor, mass @ u + load, lower=lower)
            if info != 0:
                raise ValueError(f"LAPACK dpotrs failed with info={info}")
            if step in wanted:
                out.append(u)
        return np.array(out)

    def solve(self, theta: np.ndarray) -> np.ndarray:
        """Coarse solution prolonged to fine nodes (same shape as ``DarcyProblem.solve``)."""
        return self.solve_coarse(theta) @ self.prolong.T

    def observe(self, theta: np.ndarray) -> np.ndarray:
        """Predicted observations from the coarse solution."""
        return (np.atleast_2d(self.solve_coarse(theta)) @ self.obs.T).ravel()
