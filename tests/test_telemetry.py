"""Per-layer statistics against float64 numpy. (frobenius_rows, nonfinite_fraction_rows and
spectral_norm are in test_transforms.py.)"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import telemetry


@pytest.mark.parametrize("shape", [(7, 5), (3, 40, 50)])
def test_frobenius_is_the_l2_norm_of_every_entry(shape):
    w = np.random.default_rng(len(shape)).standard_normal(shape).astype(np.float32)
    exact = np.linalg.norm(w.astype(np.float64).ravel())
    # float32 sums of up to 6000 squares: a few ulp (6e-8) times sqrt(6000) at worst in practice
    np.testing.assert_allclose(float(telemetry.frobenius(w)), exact, rtol=1e-5)
    low = jnp.asarray(w, jnp.bfloat16)
    exact = np.linalg.norm(np.asarray(low.astype(jnp.float32), np.float64).ravel())
    norm = telemetry.frobenius(low)
    assert norm.dtype == jnp.float32  # reduced in float32, not bfloat16 (~3 significant digits)
    np.testing.assert_allclose(float(norm), exact, rtol=1e-5)


def test_nonfinite_fraction_counts_nan_and_both_infinities():
    a = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    assert float(telemetry.nonfinite_fraction(a)) == 0.0
    a[0, 0], a[1, 3], a[4, 7] = np.nan, np.inf, -np.inf
    a[2, 2] = np.finfo(np.float32).max  # large but finite
    assert float(telemetry.nonfinite_fraction(a)) == pytest.approx(3 / 40)
    in_half = jnp.asarray(a).astype(jnp.float16)  # float32's max overflows to inf in float16
    assert float(telemetry.nonfinite_fraction(in_half)) == pytest.approx(4 / 40)


def test_safe_ratio_is_zero_where_the_denominator_is_zero_and_its_gradient_is_finite():
    num = np.array([1.0, 2.0, 0.0, 3.0], np.float32)
    den = np.array([4.0, 0.0, 0.0, 1e-30], np.float32)
    np.testing.assert_allclose(np.asarray(telemetry.safe_ratio(num, den)), [0.25, 0.0, 0.0, 3e30], rtol=1e-6)
    d_den = jax.grad(lambda d: telemetry.safe_ratio(2.0, d))
    assert float(d_den(0.0)) == 0.0  # no inf * 0 = NaN from the branch not taken
    assert float(d_den(4.0)) == pytest.approx(-2.0 / 16.0)
    d_num = jax.vmap(jax.grad(telemetry.safe_ratio))(num, den)
    np.testing.assert_allclose(np.asarray(d_num), [0.25, 0.0, 0.0, 1e30], rtol=1e-6)


def layer_tree(rng, depth=3, width=6, d_in=4, d_out=2, scale=1.0):
    """An MLP-shaped tree: input, `depth` stacked hidden layers, readout (biases too, which per-layer
    statistics leave out)."""

    def normal(*shape):
        return (scale * rng.standard_normal(shape)).astype(np.float32)

    return {
        "input": {"w": normal(d_in, width), "b": normal(width)},
        "hidden": {"w": normal(depth, width, width), "b": normal(depth, width)},
        "output": {"w": normal(width, d_out), "b": normal(d_out)},
    }


def matrices(tree):
    """The weight matrices in layer order."""
    return [tree["input"]["w"], *tree["hidden"]["w"], tree["output"]["w"]]


def test_mlp_layer_stats_against_numpy_per_matrix():
    rng = np.random.default_rng(3)
    params, grads = layer_tree(rng), layer_tree(rng, scale=0.1)
    updates = jax.tree.map(lambda g: -0.5 * g, grads)
    params["hidden"]["w"][1] = 0.0  # a zero-initialised layer: no relative update
    grads["hidden"]["w"][2, 0, :2] = [np.nan, np.inf]
    mask = np.array([True, True, True, False, True])  # depth 2 of 3 in use: the third hidden layer masked
    stats = {k: np.asarray(v) for k, v in telemetry.mlp_layer_stats(params, grads, updates, mask).items()}
    assert set(stats) == {"grad_norm", "param_norm", "update_norm", "update_ratio", "grad_nonfinite"}

    def norms(tree):
        return np.array([np.linalg.norm(np.asarray(m, np.float64)) for m in matrices(tree)])

    used = np.flatnonzero(mask)
    for name, expected in [("grad_norm", norms(grads)), ("param_norm", norms(params)), ("update_norm", norms(updates))]:
        assert stats[name].shape == (5,)
        np.testing.assert_allclose(stats[name][used], expected[used], rtol=1e-6, err_msg=name)
    ratio = norms(updates) / np.where(norms(params) > 0, norms(params), np.nan)
    np.testing.assert_allclose(stats["update_ratio"][[0, 1, 4]], ratio[[0, 1, 4]], rtol=1e-6)
    assert stats["param_norm"][2] == 0.0 and stats["update_ratio"][2] == 0.0
    np.testing.assert_array_equal(stats["grad_nonfinite"][used], 0.0)
    for name, value in stats.items():  # the masked layer: NaN, whatever its matrices hold
        assert np.isnan(value[3]), name

    mask[3] = True  # the layer with the NaN and the inf, now in use
    stats = telemetry.mlp_layer_stats(params, grads, updates, mask)
    assert np.isnan(float(stats["grad_norm"][3])) and float(stats["grad_nonfinite"][3]) == pytest.approx(2 / 36)
    assert np.all(np.isfinite(np.asarray(stats["grad_norm"])[[0, 1, 2, 4]]))
