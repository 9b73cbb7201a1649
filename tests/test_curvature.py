"""gradlab.curvature against dense linear algebra: HVPs against jax.hessian and finite differences of
the gradient, power iteration and Lanczos against eigh, Gauss quadrature moments against v^T H^k v and
tr(H^k), the Adam-preconditioned sharpness against eigh of P^-1/2 H P^-1/2, Marchenko-Pastur edges, and the
optimizers' stability thresholds against their update recurrences run on a quadratic."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

from gradlab import curvature


def small_net():
    """A 2-layer tanh net on 20 examples (43 params) with MSE: (loss of flat params, flat params)."""
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    params = {"w1": jax.random.normal(k1, (3, 8)) / np.sqrt(3), "b1": jnp.zeros(8), "w2": jax.random.normal(k2, (8, 1))}
    params["b2"] = jnp.zeros(1) + 0.1
    x, y = jax.random.normal(k3, (20, 3)), jax.random.normal(k4, (20, 1))
    flat, unravel = ravel_pytree(params)

    def loss(v):
        p = unravel(v)
        return jnp.mean(jnp.square(jnp.tanh(x @ p["w1"] + p["b1"][None]) @ p["w2"] + p["b2"][None] - y))

    return loss, flat, params, unravel


def dense(loss, flat):
    return np.asarray(jax.hessian(loss)(flat), np.float64)


def test_hvp_equals_the_dense_hessian_and_finite_differences_of_the_gradient():
    loss, flat, _, _ = small_net()
    matvec, n = curvature.flat_hvp(loss, flat)
    v = jax.random.normal(jax.random.PRNGKey(1), (n,))
    np.testing.assert_allclose(matvec(v), dense(loss, flat) @ np.asarray(v), rtol=1e-4, atol=1e-5)
    h = 1e-3  # central difference of the gradient: O(h^2) error
    fd = (jax.grad(loss)(flat + h * v) - jax.grad(loss)(flat - h * v)) / (2 * h)
    np.testing.assert_allclose(matvec(v), fd, rtol=2e-2, atol=2e-3)


def test_pytree_hvp_matches_the_flat_one():
    loss, flat, params, unravel = small_net()
    v = jax.random.normal(jax.random.PRNGKey(2), flat.shape)
    tree = curvature.hvp(lambda p: loss(ravel_pytree(p)[0]), params, unravel(v))
    np.testing.assert_allclose(ravel_pytree(tree)[0], curvature.flat_hvp(loss, flat)[0](v), rtol=1e-5, atol=1e-6)


def test_power_iteration_and_lanczos_find_lambda_max():
    loss, flat, _, _ = small_net()
    eigs = np.linalg.eigvalsh(dense(loss, flat))
    assert eigs[-1] > abs(eigs[0])  # power iteration finds the largest magnitude: here the top
    matvec, n = curvature.flat_hvp(loss, flat)
    v0 = jax.random.normal(jax.random.PRNGKey(3), (n,))
    lam, _ = jax.jit(lambda v: curvature.power_iteration(matvec, v, 300))(v0)
    np.testing.assert_allclose(lam, eigs[-1], rtol=1e-3)
    np.testing.assert_allclose(curvature.lanczos_top_eigenvalue(matvec, v0, 30), eigs[-1], rtol=1e-4)
    np.testing.assert_allclose(curvature.top_eigenvalue(loss, flat, jax.random.PRNGKey(4), 300), eigs[-1], rtol=1e-3)
    lam0, v = curvature.power_iteration(matvec, v0, 0)  # zero iterations: nothing measured, v0 kept
    assert np.isnan(lam0) and np.allclose(v, v0 / jnp.linalg.norm(v0))


def test_gated_runs_its_body_only_when_due_even_under_vmap():
    calls = lambda x: x + 1.0  # noqa: E731
    due = jnp.array([True, False, True])
    out = jax.vmap(lambda d, x: curvature.gated(d, calls, x, x))(due, jnp.zeros(3))
    np.testing.assert_array_equal(out, [1.0, 0.0, 1.0])


def test_gauss_quadrature_is_exact_up_to_degree_2m_minus_1():
    loss, flat, _, _ = small_net()
    h = dense(loss, flat)
    eigs, vectors = np.linalg.eigh(h)
    matvec = lambda v: jnp.asarray(h, jnp.float32) @ v  # noqa: E731
    m, n = 6, flat.size
    v = np.asarray(jax.random.rademacher(jax.random.PRNGKey(5), (n,), jnp.float32), np.float64)
    nodes, weights = curvature.gauss_quadrature(*curvature.lanczos(matvec, jnp.asarray(v, jnp.float32), m))
    w = (vectors.T @ v) ** 2 / n
    scale = lambda k: w @ np.abs(eigs) ** k  # noqa: E731
    for k in range(1, 2 * m):
        assert abs(np.sum(weights * nodes**k) - w @ eigs**k) <= 1e-4 * scale(k), k
    assert abs(np.sum(weights * nodes ** (2 * m + 2)) - w @ eigs ** (2 * m + 2)) > 1e-3 * scale(2 * m + 2)


def test_slq_over_a_full_basis_gives_the_traces():
    """With the n standard basis vectors as probes the SLQ moments are tr(H^k) / n exactly."""
    loss, flat, _, _ = small_net()
    h = dense(loss, flat)
    n = flat.size
    matvec = lambda v: jnp.asarray(h, jnp.float32) @ v  # noqa: E731
    alphas, betas = jax.vmap(lambda v: curvature.lanczos(matvec, v, 4))(jnp.eye(n))
    nodes, weights = curvature.gauss_quadrature(alphas, betas)
    for k in (1, 2, 3, 5, 7):
        trace = np.trace(np.linalg.matrix_power(h, k)) / n
        assert curvature.moments(nodes, weights, [k])[0] == pytest.approx(trace, rel=1e-3, abs=1e-6)
    grid = np.linspace(nodes.min() - 1, nodes.max() + 1, 4000)
    density = curvature.slq_density(nodes, weights, grid, 0.05)
    assert np.sum(density) * (grid[1] - grid[0]) == pytest.approx(1.0, rel=1e-3)


def test_preconditioned_sharpness_is_eigh_of_the_symmetric_form():
    loss, flat, params, _ = small_net()
    tx = optax.adam(1e-2)
    state = tx.init(flat)
    for _ in range(3):
        _, state = tx.update(jax.grad(loss)(flat), state, flat)
    p = np.asarray(curvature.adam_preconditioner(state, 0.999, 1e-8), np.float64)
    adam_state = next(s for s in jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState)))
    assert isinstance(adam_state, optax.ScaleByAdamState)
    nu = np.asarray(adam_state.nu, np.float64)
    np.testing.assert_allclose(p, np.sqrt(nu / (1 - 0.999**3)) + 1e-8, rtol=1e-5)
    s = 1 / np.sqrt(p)
    sym = s[:, None] * dense(loss, flat) * s[None, :]
    top = np.linalg.eigvalsh(sym)[-1]
    assert top == pytest.approx(np.max(np.linalg.eigvals(dense(loss, flat) / p[:, None]).real), rel=1e-6)
    matvec = curvature.preconditioned(curvature.flat_hvp(loss, flat)[0], jnp.asarray(p, jnp.float32))
    v0 = jax.random.normal(jax.random.PRNGKey(6), flat.shape)
    assert float(curvature.lanczos_top_eigenvalue(matvec, v0, 40)) == pytest.approx(top, rel=1e-3)


def test_top_eigenvalues_of_the_whole_hessian_and_of_its_diagonal_blocks():
    loss, flat, params, _ = small_net()
    h = dense(loss, flat)
    tree_loss = lambda p: loss(ravel_pytree(p)[0])  # noqa: E731
    whole, blocks = curvature.top_eigenvalues(tree_loss, params, jax.random.PRNGKey(7), 30)
    assert whole == pytest.approx(np.linalg.eigvalsh(h)[-1], rel=1e-4)
    sizes = [leaf.size for leaf in jax.tree.leaves(params)]
    starts = np.cumsum([0, *sizes])
    want = [np.linalg.eigvalsh(h[a:b, a:b])[-1] for a, b in zip(starts[:-1], starts[1:])]
    np.testing.assert_allclose(blocks, want, rtol=1e-4)


def test_marchenko_pastur_edges_of_least_squares():
    d, n = 400, 1600
    x = jax.random.normal(jax.random.PRNGKey(8), (n, d))
    matvec = lambda v: x.T @ (x @ v) / n  # noqa: E731
    alphas, betas = curvature.slq(matvec, d, jax.random.PRNGKey(9), 2, 60)
    nodes, _ = curvature.gauss_quadrature(alphas, betas)
    assert nodes.min() == pytest.approx(0.25, rel=0.05)
    assert nodes.max() == pytest.approx(2.25, rel=0.05)


def test_probe_reports_the_top_hessian_eigenvalues_of_a_flax_model():
    import flax.linen as nn

    from gradlab import probe

    model = nn.Sequential([nn.Dense(6), nn.tanh, nn.Dense(2)])
    x, y = jax.random.normal(jax.random.PRNGKey(10), (12, 3)), jax.random.normal(jax.random.PRNGKey(11), (12, 2))
    variables = model.init(jax.random.PRNGKey(12), x)
    mse = lambda out, batch: jnp.mean(jnp.square(out - batch[1]))  # noqa: E731
    ds = probe(model, variables, (x, y), mse)
    flat, unravel = ravel_pytree(variables["params"])
    h = dense(lambda v: mse(model.apply({"params": unravel(v)}, x), (x, y)), flat)
    assert float(ds["hessian_top"]) == pytest.approx(np.linalg.eigvalsh(h)[-1], rel=1e-4)
    sizes = [leaf.size for leaf in jax.tree.leaves(variables["params"])]
    starts = np.cumsum([0, *sizes])
    want = [np.linalg.eigvalsh(h[a:b, a:b])[-1] for a, b in zip(starts[:-1], starts[1:])]
    np.testing.assert_allclose(ds["hessian_block_top"].values, want, rtol=1e-4)
    assert "hessian_top" not in probe(model, variables, (x, y), mse, lanczos_steps=0)


def _final_error(optimizer, eta, beta=0.0, b1=0.0, steps=1000):
    """|x| after `steps` updates on f = x^2 / 2 (lambda = 1) from x = 1, each optimizer's update written out:
    optax's trace v = g + beta v, x -= eta v (sgd: beta = 0); Adam's m = b1 m + (1 - b1) g, x -= eta m
    with its preconditioner frozen at P = 1."""
    x, m = 1.0, 0.0
    for _ in range(steps):
        m = b1 * m + (1 - b1) * x if optimizer == "adam" else beta * m + x
        x -= eta * m
    return abs(x)


@pytest.mark.parametrize(
    "optimizer, beta, b1, closed",
    [("sgd", 0.0, 0.0, 2.0), ("momentum", 0.5, 0.0, 3.0), ("momentum", 0.9, 0.0, 3.8), ("adam", 0.0, 0.9, 38.0)],
)
def test_stability_threshold_divides_decay_from_growth_on_a_quadratic(optimizer, beta, b1, closed):
    """At 1% below the threshold the error decays (|root| <= 0.98 per step), 1% above it grows (>= 1.02)."""
    edge = curvature.stability_threshold(optimizer, momentum=beta, b1=b1)
    assert edge == pytest.approx(closed, rel=1e-12)
    assert _final_error(optimizer, 0.99 * edge, beta, b1) < 1e-6
    assert _final_error(optimizer, 1.01 * edge, beta, b1) > 1e6
    with pytest.raises(ValueError, match="no stability threshold"):
        curvature.stability_threshold("lion")
