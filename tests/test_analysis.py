"""analysis: each number against a closed form or an independent computation written differently."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradlab import analysis


def test_slope_of_an_exact_line_and_its_zero_error():
    x = np.arange(7.0)
    assert analysis.slope(x, 3.0 - 0.25 * x) == pytest.approx(-0.25, abs=1e-12)
    slope, error = analysis.slope_with_error(x, 3.0 - 0.25 * x)
    assert slope == pytest.approx(-0.25, abs=1e-12) and error == pytest.approx(0.0, abs=1e-12)


def test_slope_error_matches_the_normal_equations():
    rng = np.random.default_rng(0)
    x = np.linspace(0.0, 5.0, 12)
    y = 1.0 + 2.0 * x + rng.normal(size=x.size)
    design = np.stack([np.ones_like(x), x], axis=1)
    coef, residual, *_ = np.linalg.lstsq(design, y, rcond=None)
    covariance = residual[0] / (x.size - 2) * np.linalg.inv(design.T @ design)
    slope, error = analysis.slope_with_error(x, y)
    assert slope == pytest.approx(coef[1], rel=1e-10)
    assert error == pytest.approx(np.sqrt(covariance[1, 1]), rel=1e-10)


def test_seed_slope_error_is_the_spread_of_per_seed_slopes():
    x = np.array([1.0, 2.0, 4.0, 8.0])
    per_seed_slopes = np.array([0.5, 0.7, 0.9])
    y = per_seed_slopes[:, None] * x[None, :] + np.array([[0.0], [1.0], [-1.0]])
    slope, error = analysis.seed_slope(x, y)
    assert slope == pytest.approx(0.7, abs=1e-12)
    assert error == pytest.approx(0.2 / np.sqrt(3), rel=1e-12)  # std (ddof 1) of 0.5, 0.7, 0.9 is 0.2
    assert analysis.seed_slope(x, y[:1])[1] == 0.0


@pytest.mark.parametrize("n", [2, 5, 30])
def test_random_walk_slope_std_against_the_covariance_of_a_walk(n):
    # Cov(y_i, y_j) = min(i, j) for a walk starting at y_0 = 0; Var(slope) = a^T C a.
    idx = np.arange(n)
    cov = np.minimum.outer(idx, idx).astype(float)
    a = analysis.ols_weights(n)
    assert analysis.random_walk_slope_std(n) == pytest.approx(np.sqrt(a @ cov @ a), rel=1e-12)


def test_random_walk_slope_std_against_monte_carlo():
    rng = np.random.default_rng(1)
    n = 20
    walks = np.concatenate([np.zeros((20000, 1)), np.cumsum(rng.normal(size=(20000, n - 1)), axis=1)], axis=1)
    fitted = np.polyfit(np.arange(n), walks.T, 1)[0]
    assert np.std(fitted) == pytest.approx(analysis.random_walk_slope_std(n), rel=0.03)


def test_constant_loss_regression_is_the_mse_of_the_mean():
    rng = np.random.default_rng(2)
    y = rng.normal(size=(50, 3)) * np.array([1.0, 2.0, 0.5])
    best = np.mean((y - y.mean(axis=0)) ** 2)
    assert analysis.constant_loss(y, "regression") == pytest.approx(best, rel=1e-12)
    assert analysis.constant_loss(y[:, 0], "regression") == pytest.approx(np.var(y[:, 0]), rel=1e-12)


def test_constant_loss_classification_is_the_cross_entropy_of_the_label_frequencies():
    labels = np.array([0, 0, 1, 2, 2, 2, 2, 2])
    p = np.array([2, 1, 5]) / 8
    cross_entropy = -np.mean(np.log(p[labels]))  # predicting the frequencies for every example
    assert analysis.constant_loss(labels, "classification", 4) == pytest.approx(cross_entropy, rel=1e-12)


def test_tail_mean_and_final_mark_divergence_as_inf():
    loss = np.array([[4.0, 3.0, 2.0, 1.0], [1.0, 2.0, np.nan, 5.0], [1.0, 1.0, 1.0, np.inf]])
    np.testing.assert_array_equal(analysis.tail_mean(loss, 2), [1.5, np.inf, np.inf])
    np.testing.assert_array_equal(analysis.tail_mean(loss, 10), [2.5, np.inf, np.inf])
    np.testing.assert_array_equal(analysis.final(loss), [1.0, 5.0, np.inf])
    np.testing.assert_array_equal(analysis.final(loss, diverged=[False, True, False]), [1.0, np.inf, np.inf])
    np.testing.assert_array_equal(analysis.final(loss.T, axis=0), [1.0, 5.0, np.inf])


@settings(max_examples=50, deadline=None)
@given(st.lists(st.floats(-1e3, 1e3), min_size=3, max_size=20), st.floats(-5, 5), st.floats(-5, 5))
def test_slope_is_invariant_to_adding_a_line(ys, a, b):
    x = np.arange(len(ys), dtype=float)
    y = np.asarray(ys)
    assert analysis.slope(x, y + a + b * x) == pytest.approx(analysis.slope(x, y) + b, abs=1e-6)


def test_variants_name_every_residual_norm_pair_in_the_asked_order():
    import xarray as xr

    ds = xr.Dataset(coords={"model.residual": [False, True], "model.norm": ["none", "layernorm"]})
    assert [name for name, _ in analysis.variants(ds)] == ["plain", "residual", "layernorm", "residual+layernorm"]
    first = list(analysis.variants(ds, residual_first=True))
    assert [name for name, _ in first] == ["plain", "layernorm", "residual", "residual+layernorm"]
    assert first[3][1] == {"model.residual": True, "model.norm": "layernorm"}
