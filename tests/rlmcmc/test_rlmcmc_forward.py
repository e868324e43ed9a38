"""Fine-scale Q1 solvers: manufactured-solution convergence, assembly, observations, KL field."""

import numpy as np
import pytest
import scipy.optimize

from rlmcmc.forward import (MASS_REF, STIFF_REF, DarcyProblem, PermeabilityModel, Q1Mesh, nystrom_1d,
                            observation_points, solve_steady, solve_transient)

PI = np.pi


def _g(x, y):
    return np.sin(PI * x) * np.sin(PI * y)


def _kappa(x, y):
    return 1 + 0.5 * np.sin(2 * PI * x) * np.cos(PI * y)


def _minus_div_kappa_grad_g(x, y):
    kx = PI * np.cos(2 * PI * x) * np.cos(PI * y)
    ky = -0.5 * PI * np.sin(2 * PI * x) * np.sin(PI * y)
    gx = PI * np.cos(PI * x) * np.sin(PI * y)
    gy = PI * np.sin(PI * x) * np.cos(PI * y)
    return -(kx * gx + ky * gy) + _kappa(x, y) * 2 * PI**2 * _g(x, y)


def _l2(mesh, e):
    return np.sqrt(e @ (mesh.mass @ e))


def test_steady_manufactured_solution_converges_second_order():
    errors = []
    for n in (8, 16, 32):
        mesh = Q1Mesh(n)
        kappa = _kappa(mesh.centers[:, 0], mesh.centers[:, 1])
        u = solve_steady(mesh, kappa, mesh.load_vector(_minus_div_kappa_grad_g))
        errors.append(_l2(mesh, u - _g(mesh.nodes[:, 0], mesh.nodes[:, 1])))
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((rates > 1.8) & (rates < 2.2)), rates
    assert errors[-1] < 1e-3


def test_transient_manufactured_solution_converges_in_space():
    # u = t g(x): backward Euler is exact for linear-in-time solutions, so only the O(h^2) error remains.
    errors = []
    for n in (8, 16, 32):
        mesh = Q1Mesh(n)
        kappa = _kappa(mesh.centers[:, 0], mesh.centers[:, 1])
        f_space = mesh.load_vector(_minus_div_kappa_grad_g)
        g_load = mesh.load_vector(_g)
        out = solve_transient(mesh, kappa, lambda t: g_load + t * f_space, t_final=0.5, n_steps=5)
        errors.append(_l2(mesh, out[-1] - 0.5 * _g(mesh.nodes[:, 0], mesh.nodes[:, 1])))
    rates = np.log2(np.array(errors[:-1]) / np.array(errors[1:]))
    assert np.all((rates > 1.8) & (rates < 2.2)), rates


@pytest.mark.parametrize("storage", [1.0, 2.5])
def test_transient_converges_first_order_in_time(storage):
    mesh = Q1Mesh(16)
    kappa = np.ones(mesh.n_elements)
    g_load = mesh.load_vector(_g)
    # u = (1 - exp(-t)) g solves c u_t - Δu = f with f = c exp(-t) g + (1 - exp(-t)) 2π² g.
    exact_end = 1 - np.exp(-0.5)
    ref_space = solve_steady(mesh, kappa, mesh.load_vector(lambda x, y: 2 * PI**2 * _g(x, y)))  # ≈ g
    errs = []
    for steps in (4, 8, 16):
        out = solve_transient(mesh, kappa,
                              lambda t: storage * np.exp(-t) * g_load + (1 - np.exp(-t)) * 2 * PI**2 * g_load,
                              0.5, steps, storage=storage)
        errs.append(_l2(mesh, out[-1] - exact_end * ref_space))
    ratios = np.array(errs[:-1]) / np.array(errs[1:])
    assert np.all((ratios > 1.7) & (ratios < 2.3)), ratios


def test_transient_benchmark_field_converges_first_order_in_time():
    """On the channelized high-contrast field of the transient benchmark (T = 0.01, data at T/4, T/2, T),
    the observations converge at order 1 in Δt against a 640-step reference."""
    field = PermeabilityModel(dim=8)
    theta = np.random.default_rng(0).standard_normal(8)

    def observe(n_steps):
        return DarcyProblem(16, field, observation_points(5), kind="transient", t_final=0.01, n_steps=n_steps,
                            obs_steps=(n_steps // 4, n_steps // 2, n_steps)).observe(theta)

    ref = observe(640)
    errs = np.array([np.linalg.norm(observe(n) - ref) for n in (20, 40, 80)])
    ratios = errs[:-1] / errs[1:]
    assert np.all((ratios > 1.7) & (ratios < 2.4)), ratios
    assert errs[0] / np.linalg.norm(ref) < 0.04  # the benchmark's 20 steps: measured 2.0% off the reference


def test_storage_coefficient_rescales_time():
    """c u_t - div(κ∇u) = f at time T is the c = 1 solution at T / c (backward Euler: exactly, step for step),
    for the fine solver and the GMsFEM coarse solver."""
    from rlmcmc.gmsfem import GMsFEMProblem

    field = PermeabilityModel(dim=4)
    theta = np.random.default_rng(1).standard_normal(4)
    kw = dict(kind="transient", n_steps=8, obs_steps=(4, 8))
    slow = DarcyProblem(16, field, observation_points(3), t_final=0.02, storage=4.0, **kw)
    fast = DarcyProblem(16, field, observation_points(3), t_final=0.005, **kw)
    np.testing.assert_allclose(slow.observe(theta), fast.observe(theta), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(GMsFEMProblem(slow, 4, 2).observe(theta), GMsFEMProblem(fast, 4, 2).observe(theta),
                               rtol=1e-10, atol=1e-14)
    assert not np.allclose(slow.observe(theta), DarcyProblem(16, field, observation_points(3), t_final=0.02,
                                                             **kw).observe(theta))


def test_vectorized_assembly_matches_element_loop():
    mesh = Q1Mesh(3)
    kappa = np.random.default_rng(0).uniform(0.1, 10, mesh.n_elements)
    a = np.zeros((mesh.n_nodes, mesh.n_nodes))
    m = np.zeros_like(a)
    for e, nodes in enumerate(mesh.elements):
        a[np.ix_(nodes, nodes)] += kappa[e] * STIFF_REF
        m[np.ix_(nodes, nodes)] += mesh.h**2 * MASS_REF
    np.testing.assert_allclose(mesh.stiffness_assembler.matrix(kappa).toarray(), a, atol=1e-13)
    np.testing.assert_allclose(mesh.mass.toarray(), m, atol=1e-15)
    assert mesh.mass.sum() == pytest.approx(1.0)  # ∫_Ω 1 = 1


def test_observation_matrix_is_exact_for_bilinear_functions():
    mesh = Q1Mesh(5)
    pts = np.array([[0.13, 0.71], [0.5, 0.5], [1.0, 1.0], [0.0, 0.37]])
    f = lambda x, y: 2 + 3 * x - y + 4 * x * y  # noqa: E731
    np.testing.assert_allclose(mesh.observation_matrix(pts) @ f(mesh.nodes[:, 0], mesh.nodes[:, 1]),
                               f(pts[:, 0], pts[:, 1]), atol=1e-13)


def test_nystrom_matches_analytic_exponential_kernel_eigenvalues():
    # Eigenvalues of exp(-|x-y|/l) on [0,1]: λ = 2c/(ω²+c²), c = 1/l, ω roots of (ω²-c²) tan ω = 2cω.
    ell = 0.3
    c = 1 / ell
    f = lambda w: (w**2 - c**2) * np.sin(w) - 2 * c * w * np.cos(w)  # noqa: E731
    grid = np.linspace(1e-6, 12, 20001)
    signs = np.flatnonzero(np.sign(f(grid[:-1])) != np.sign(f(grid[1:])))
    roots = [scipy.optimize.brentq(f, grid[i], grid[i + 1]) for i in signs[:3]]
    exact = np.sort(2 * c / (np.array(roots) ** 2 + c**2))[::-1]
    lam, _, _ = nystrom_1d(ell, n_quad=400, n_modes=3)
    np.testing.assert_allclose(lam, exact, rtol=2e-3)


def test_field_is_grid_independent_and_high_contrast():
    field = PermeabilityModel(dim=8, contrast=1e3)
    theta = np.random.default_rng(2).standard_normal(8)
    coarse, fine = field.field_map(Q1Mesh(4)), field.field_map(Q1Mesh(12))
    # Centre (k + 1/2)/4 of the 4-grid is centre (3k + 1 + 1/2)/12 of the 12-grid: same field values there.
    j = 3 * np.arange(4) + 1
    shared = (j[:, None] * 12 + j[None, :]).ravel()
    np.testing.assert_allclose(coarse.log_kappa(theta), fine.log_kappa(theta)[shared], rtol=1e-12)
    assert np.all(np.diff(field.eigenvalues) <= 0)
    bg = field.background(Q1Mesh(50).centers)
    assert np.exp(bg.max() - bg.min()) == pytest.approx(1e3)
    assert 0.05 < np.mean(bg > 0) < 0.5  # channels are a minority of the domain
    kappa = fine.kappa(theta)
    assert np.all(kappa > 0)


def test_kl_modes_are_orthonormal_in_l2():
    field = PermeabilityModel(dim=6, sigma=1.0)
    mesh = Q1Mesh(60)
    phi = field.kl_basis(mesh.centers) / np.sqrt(field.eigenvalues)
    gram = phi.T @ phi * mesh.h**2
    np.testing.assert_allclose(gram, np.eye(6), atol=2e-2)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="n"):
        Q1Mesh(0)
    with pytest.raises(TypeError, match="n"):
        Q1Mesh(2.5)
    mesh = Q1Mesh(4)
    with pytest.raises(ValueError, match="kappa"):
        solve_steady(mesh, -np.ones(mesh.n_elements), np.zeros(mesh.n_nodes))
    with pytest.raises(ValueError, match="kappa"):
        solve_steady(mesh, np.ones(3), np.zeros(mesh.n_nodes))
    problem = DarcyProblem(8, PermeabilityModel(dim=4), observation_points(3))
    with pytest.raises(ValueError, match="theta"):
        problem.observe(np.zeros(5))
    with pytest.raises(ValueError, match="kind"):
        DarcyProblem(8, PermeabilityModel(dim=4), observation_points(3), kind="wave")
    with pytest.raises(ValueError, match="points"):
        mesh.observation_matrix(np.array([[1.5, 0.2]]))
    with pytest.raises(ValueError, match="n_steps|positive"):
        solve_transient(mesh, np.ones(mesh.n_elements), np.zeros(mesh.n_nodes), 1.0, 0)
    with pytest.raises(ValueError, match="storage"):
        solve_transient(mesh, np.ones(mesh.n_elements), np.zeros(mesh.n_nodes), 1.0, 4, storage=0.0)
    with pytest.raises(TypeError, match="storage"):
        DarcyProblem(8, PermeabilityModel(dim=4), observation_points(3), kind="transient", storage="1")


def test_transient_observations_shape_and_approach_steady():
    field = PermeabilityModel(dim=4)
    pts = observation_points(3)
    steady = DarcyProblem(16, field, pts)
    trans = DarcyProblem(16, field, pts, kind="transient", t_final=5.0, n_steps=40, obs_steps=(10, 40))
    theta = np.zeros(4)
    y = trans.observe(theta).reshape(2, -1)
    assert y.shape == (2, 9)
    np.testing.assert_allclose(y[1], steady.observe(theta), rtol=1e-3)  # long time -> steady state
    assert np.all(y[0] <= y[1] + 1e-12)  # monotone rise from u(0) = 0 with f > 0
