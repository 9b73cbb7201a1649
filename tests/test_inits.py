import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import inits
from gradlab.inits import INIT_SCHEMES

FAN_IN, FAN_OUT = 256, 512


def expected_variance(name, init_std=0.05):
    return {
        "zero": 0.0,
        "normal": init_std**2,
        "lecun_normal": 1 / FAN_IN,
        "lecun_uniform": 1 / FAN_IN,
        "xavier_normal": 2 / (FAN_IN + FAN_OUT),
        "xavier_uniform": 2 / (FAN_IN + FAN_OUT),
        "he_normal": 2 / FAN_IN,
        "he_uniform": 2 / FAN_IN,
        "orthogonal": 1 / FAN_OUT,  # orthonormal rows of length FAN_OUT: entries of variance 1/FAN_OUT
    }[name]


@pytest.mark.parametrize("name", [n for n in INIT_SCHEMES if n != "orthogonal"])
def test_weight_variance_matches_the_scheme(name):
    w = np.asarray(inits.sample_weight(jax.random.PRNGKey(1), (FAN_IN, FAN_OUT), inits.scheme_index(name), 0.05, 1.0))
    var = expected_variance(name)
    if var == 0:
        assert np.all(w == 0)
        return
    n = w.size
    # The sample variance of n iid draws has relative std sqrt((kurtosis - 1) / n):
    # kurtosis 3 for the normal, 9/5 for the uniform. Allow 5 of those.
    kurtosis = 1.8 if "uniform" in name else 3.0
    tol = 5 * np.sqrt((kurtosis - 1) / n)
    assert abs(np.mean(w**2) / var - 1) < tol
    if "uniform" in name:
        assert np.max(np.abs(w)) <= np.sqrt(3 * var) * (1 + 1e-6)


def test_gain_scales_the_std_quadratically_in_variance():
    idx = inits.scheme_index("he_normal")
    key = jax.random.PRNGKey(0)
    w1 = inits.sample_weight(key, (64, 64), idx, 0.0, 1.0)
    w3 = inits.sample_weight(key, (64, 64), idx, 0.0, 3.0)
    np.testing.assert_allclose(np.asarray(w3), 3 * np.asarray(w1), rtol=1e-6)


@pytest.mark.parametrize("shape", [(64, 64), (96, 32), (32, 96)])
def test_orthogonal_has_orthonormal_columns_or_rows(shape):
    w = np.asarray(
        inits.sample_weight(jax.random.PRNGKey(2), shape, inits.scheme_index("orthogonal"), 0.0, 1.0), np.float64
    )
    rows, cols = shape
    # lecun scaling of an orthogonal matrix: singular values sqrt(max/fan_in) -> 1 when square
    gram = w.T @ w if rows >= cols else w @ w.T
    scale = max(shape) / rows
    np.testing.assert_allclose(gram, scale * np.eye(min(shape)), atol=2e-5)


def test_orthogonal_is_rotation_invariant_in_distribution():
    # A Haar matrix's first entry has E[q11^2] = 1/n; average over many draws.
    n = 16
    keys = jax.random.split(jax.random.PRNGKey(3), 2000)
    q = jax.vmap(lambda k: inits.orthonormalize(jax.random.normal(k, (n, n))))(keys)
    second_moment = float(jnp.mean(q[:, 0, 0] ** 2))
    # std of q11^2 for Haar O(n) is about sqrt(2)/n; mean of 2000 draws: /sqrt(2000)
    assert abs(second_moment - 1 / n) < 5 * np.sqrt(2) / n / np.sqrt(2000)


def test_scheme_is_a_traced_value_under_vmap():
    schemes = jnp.asarray([inits.scheme_index("zero"), inits.scheme_index("he_normal")])
    w = jax.vmap(lambda s: inits.sample_weight(jax.random.PRNGKey(0), (128, 128), s, 0.0, 1.0))(schemes)
    assert float(jnp.max(jnp.abs(w[0]))) == 0.0
    assert abs(float(jnp.mean(w[1] ** 2)) * 128 / 2 - 1) < 0.05


@pytest.mark.parametrize(
    "name, init_std, init_gain, expected",
    [
        ("he_normal", 0.0, 1.0, 2.0),  # He et al. 2015: Var W = 2 / n
        ("he_uniform", 0.0, 2.0, 8.0),  # gain 2 quadruples the variance
        ("xavier_uniform", 0.0, 1.0, 1.0),  # 2 / (n + n)
        ("lecun_uniform", 0.0, 3**-0.5, 1 / 3),  # Glorot & Bengio's U[-1/sqrt(n), 1/sqrt(n)]: Var = 1 / (3n)
        ("normal", 0.01, 1.0, 256 * 1e-4),  # N(0, 0.01^2) ignores the fan: n * 0.01^2
        ("orthogonal", 0.0, 1.0, 1.0),
        ("zero", 0.0, 1.0, 0.0),
    ],
)
def test_sigma_w2_is_width_times_a_square_layers_entry_variance(name, init_std, init_gain, expected):
    width = 256
    assert inits.sigma_w2(name, width, init_std, init_gain) == pytest.approx(expected, rel=1e-12)
    w = inits.sample_weight(jax.random.PRNGKey(4), (width, width), inits.scheme_index(name), init_std, init_gain)
    measured = width * float(np.mean(np.asarray(w, np.float64) ** 2))
    # relative std of a sample variance of width^2 draws is at most sqrt(2 / width^2) (normal kurtosis 3)
    assert measured == pytest.approx(expected, rel=5 * np.sqrt(2.0) / width, abs=0.0)
