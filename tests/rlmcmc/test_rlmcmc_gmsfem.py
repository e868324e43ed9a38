"""GMsFEM coarse solver: Galerkin structure, convergence in the number of basis functions, speed."""

import time

import numpy as np
import pytest

from rlmcmc.forward import DarcyProblem, PermeabilityModel, observation_points
from rlmcmc.gmsfem import GMsFEMProblem, neighborhood_basis


def _rel_errors(fine, coarse, thetas):
    mass = fine.mesh.mass
    out = []
    for t in thetas:
        ref = np.atleast_2d(fine.solve(t))
        err = np.atleast_2d(coarse.solve(t)) - ref
        out.append(np.sqrt(sum(e @ (mass @ e) for e in err) / sum(r @ (mass @ r) for r in ref)))
    return np.mean(out)


@pytest.fixture(scope="module")
def field():
    return PermeabilityModel(dim=8, contrast=1e3)


@pytest.mark.parametrize("kind", ["steady", "transient"])
def test_error_falls_as_basis_functions_grow(field, kind):
    fine = DarcyProblem(32, field, observation_points(5), kind=kind)
    thetas = np.random.default_rng(0).standard_normal((3, 8))
    errors = [_rel_errors(fine, GMsFEMProblem(fine, 4, n_basis), thetas) for n_basis in (1, 2, 4, 6)]
    assert np.all(np.diff(errors) < 0), errors
    assert errors[-1] < 0.3 * errors[0], errors


def test_coarse_stiffness_is_galerkin_projection(field):
    fine = DarcyProblem(16, field, observation_points(3))
    coarse = GMsFEMProblem(fine, 4, 3)
    kappa = fine.fields.kappa(np.random.default_rng(1).standard_normal(8))
    a = fine.mesh.stiffness_assembler.matrix(kappa).toarray()
    r = coarse.prolong
    np.testing.assert_allclose(coarse.stiffness(kappa), r.T @ a @ r, rtol=1e-10, atol=1e-10)
    # Galerkin orthogonality: the fine residual of the prolonged coarse solution is ⊥ to range(R).
    theta = np.zeros(8)
    u = coarse.solve(theta)
    a_full = fine.mesh.stiffness_assembler.matrix(fine.fields.kappa(theta)).toarray()
    np.testing.assert_allclose(r.T @ (a_full @ u - fine.load), 0.0, atol=1e-9 * np.abs(fine.load).sum())
    assert np.all(u[fine.mesh.boundary] == 0)


def test_basis_is_partition_of_unity_weighted_and_first_eigenvalue_zero(field):
    fine = DarcyProblem(16, field, observation_points(3))
    r, eig = neighborhood_basis(fine, fine.fields.kappa(np.zeros(8)), 4, 2)
    assert r.shape == (fine.mesh.n_nodes, 9 * 2)
    np.testing.assert_allclose(eig[:, 0], 0.0, atol=1e-8)  # constants are in every snapshot space
    assert np.all(eig[:, 1] > 1e-6)
    # The first basis function per neighborhood is χ_i times a constant: their sum is the (normalized)
    # partition of unity, equal to 1 at interior coarse nodes.
    total = r[:, ::2].sum(axis=1)
    coarse_nodes = [(j * 4) * 17 + i * 4 for j in range(1, 4) for i in range(1, 4)]
    np.testing.assert_allclose(total[coarse_nodes], 1.0, atol=1e-10)


def test_coarse_observations_match_prolonged_solution(field):
    fine = DarcyProblem(16, field, observation_points(3), kind="transient", n_steps=10, obs_steps=(5, 10))
    coarse = GMsFEMProblem(fine, 4, 2)
    theta = np.random.default_rng(3).standard_normal(8)
    expected = (fine.obs @ coarse.solve(theta).T).T.ravel()
    np.testing.assert_allclose(coarse.observe(theta), expected, rtol=1e-12)


def test_transient_benchmark_coarse_solve_is_close_to_the_fine_one():
    """The kl8-transient benchmark's GMsFEM level (fine 32², coarse 8² x 4, 20 backward-Euler steps): its
    observations at the three data times are within 12% of the fine ones at prior draws (measured
    0.065-0.10), and each coarse step is the Galerkin step (c M_H + Δt A_H) u⁺ = c M_H u + Δt F_H."""
    from rlmcmc.problem import make_problem
    from rlmcmc.protocol import BENCHMARKS

    problem = make_problem(BENCHMARKS["kl8-transient"])
    fine, coarse = problem.fine, problem.coarse
    assert fine.kind == coarse.kind == "transient" and fine.obs_steps == (5, 10, 20)
    thetas = np.random.default_rng(0).standard_normal((4, 8))
    rel = [np.linalg.norm(coarse.observe(t) - fine.observe(t)) / np.linalg.norm(fine.observe(t)) for t in thetas]
    assert max(rel) < 0.12, rel
    # Independent step-by-step dense reference of the coarse time stepping.
    theta = thetas[0]
    a_h = coarse.prolong.T @ fine.mesh.stiffness_assembler.matrix(fine.fields.kappa(theta)).toarray() @ coarse.prolong
    dt = fine.t_final / fine.n_steps
    m_h = fine.storage * coarse.mass
    u, ref = np.zeros(coarse.n_dof), []
    for step in range(1, fine.n_steps + 1):
        u = np.linalg.solve(m_h + dt * a_h, m_h @ u + dt * coarse.load)
        if step in fine.obs_steps:
            ref.append(u)
    np.testing.assert_allclose(coarse.solve_coarse(theta), np.array(ref), rtol=1e-8, atol=1e-12)


def test_bad_coarse_grid_raises(field):
    fine = DarcyProblem(16, field, observation_points(3))
    with pytest.raises(ValueError, match="divide"):
        GMsFEMProblem(fine, 5, 2)
    with pytest.raises(ValueError, match="n_basis"):
        GMsFEMProblem(fine, 4, 100)
    with pytest.raises(TypeError, match="n_basis"):
        GMsFEMProblem(fine, 4, 1.5)


@pytest.mark.slow
def test_coarse_transient_solve_at_least_5x_faster_on_default_grid():
    field = PermeabilityModel(dim=16)
    fine = DarcyProblem(100, field, observation_points(5), kind="transient", n_steps=20)
    coarse = GMsFEMProblem(fine, 10, 3)
    thetas = np.random.default_rng(4).standard_normal((5, 16))

    def best_time(fn):
        times = []
        for t in thetas:
            t0 = time.process_time()
            fn(t)
            times.append(time.process_time() - t0)
        return min(times)

    try:  # tiny dense systems: BLAS threads only add overhead (and noise on a shared machine)
        from threadpoolctl import threadpool_limits
    except ImportError:
        import contextlib

        threadpool_limits = contextlib.nullcontext
    with threadpool_limits(1):
        t_fine, t_coarse = best_time(fine.observe), best_time(coarse.observe)
    assert t_fine / t_coarse >= 5, (t_fine, t_coarse)
    assert _rel_errors(fine, coarse, thetas[:2]) < 0.15
