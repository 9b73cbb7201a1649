"""C5 at a tiny size: the init theory against Monte Carlo, the unit criteria on hand-made nets, and a
small sweep whose checks must pass."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import api, inits, models
from gradlab.errors import ConfigError
from gradlab.experiments import dead_relu


@pytest.fixture(scope="module")
def tiny(tiny_scale):
    """The experiment at its tiny scale (gradlab/configs/dead_relu.yaml)."""
    return tiny_scale("dead_relu")[0]


def test_dead_probability_is_two_to_minus_n_uncorrelated_and_matches_monte_carlo_correlated():
    assert dead_relu.dead_probability(20, 0.0) == 2.0**-20
    rng = np.random.default_rng(0)
    n, rho, samples = 8, 0.5, 400_000
    z = np.sqrt(rho) * rng.normal(size=(samples, 1)) + np.sqrt(1 - rho) * rng.normal(size=(samples, n))
    mc = np.mean(np.all(z <= 0, axis=1))
    p = dead_relu.dead_probability(n, rho)
    assert abs(mc - p) < 4 * np.sqrt(p * (1 - p) / samples)  # 4 binomial standard errors


@pytest.mark.parametrize("rho", [0.0, 0.3, 0.8])
def test_relu_correlation_map_matches_monte_carlo(rho):
    """He-scaled ReLU outputs: next pre-activation correlation = 2 E[relu(u) relu(v)] (E[relu(u)^2] = 1/2)."""
    rng = np.random.default_rng(1)
    u = rng.normal(size=1_000_000)
    v = rho * u + np.sqrt(1 - rho**2) * rng.normal(size=u.size)
    mc = 2 * np.mean(np.maximum(u, 0) * np.maximum(v, 0))
    assert abs(mc - dead_relu.relu_correlation(rho)) < 5e-3  # sd of the product ~1 / sqrt(1e6) x 2


def test_a_dead_relu_unit_has_exactly_zero_gradient_and_a_leaky_one_does_not():
    spec = models.MLPSpec(in_dim=3, out_dim=1, depth=1, width=4, activation="relu")
    hyper = models.MLPHyper(
        depth=1,
        residual=False,
        init=inits.scheme_index("he_normal"),
        init_std=0.0,
        init_gain=1.0,
        bias_std=0.0,
        leaky_slope=0.01,
    )
    params = models.init(jax.random.PRNGKey(0), spec, hyper)
    params["hidden"]["b"] = params["hidden"]["b"].at[0, 2].set(-100.0)  # unit 2 of layer 1: always off
    x = jax.random.normal(jax.random.PRNGKey(1), (32, 3))
    for activation, nograd in (("relu", 0.25), ("leaky_relu", 0.0)):
        s = models.MLPSpec(**{**spec.__dict__, "activation": activation})

        def loss(p):
            out, taps = models.apply(p, x, s, hyper)
            return jnp.mean(jnp.square(out - 1.0)), taps

        grads, taps = jax.grad(loss, has_aux=True)(params)
        norms = dead_relu.unit_grad_norms(grads)
        assert norms.shape == (2, 4)
        assert float(taps["dead_frac"][1]) == 0.25  # the pre-activation criterion, whatever the activation
        np.testing.assert_array_equal(dead_relu.no_gradient_fraction(norms, 1e-7), [0.0, nograd])
    assert np.isnan(dead_relu.no_gradient_fraction(jnp.asarray([[1.0, jnp.inf]]), 1e-7)).all()


def test_poisson_upper_quantile():
    assert dead_relu.poisson_upper(0.0, 1e-3) == 0
    k = dead_relu.poisson_upper(2.0, 1e-3)
    cdf = lambda k: sum(np.exp(-2.0) * 2.0**i / np.prod(range(1, i + 1)) for i in range(k + 1))  # noqa: E731
    assert 1 - cdf(k) < 1e-3 <= 1 - cdf(k - 1)


def test_tiny_run_makes_every_check(tiny):
    assert len(tiny.checks) == 4
    assert tiny.dataset.attrs["static_groups"] == 2  # one compile per activation; lr vmapped


def test_full_data_dead_fraction_is_at_most_the_batch_one(tiny):
    """Dead on all examples implies dead on the batch: dead_full <= the stock batch dead_frac."""
    ds = tiny.dataset
    full = ds["dead_full"].isel(layer=slice(0, 2)).values
    batch = ds["dead_frac"].isel(layer=slice(0, 2)).values
    ok = np.isfinite(full) & np.isfinite(batch)
    assert np.all(full[ok] <= batch[ok])
    assert np.all(np.isnan(ds["dead_full"].isel(layer=-1).values))  # the linear readout is not a unit layer


def test_bad_threshold_is_a_config_error():
    with pytest.raises(ConfigError, match="grad_threshold"):
        api.resolve("dead_relu", ["grad_threshold=0"])
    with pytest.raises(ConfigError, match="model.activation"):
        api.resolve("dead_relu", ["model.activation=relu6"])
