"""Whole-array and per-row sums against float64 numpy: the dtypes they accumulate in, row means,
a pytree's global norm. (total, sum_of_squares, row_totals and row_sums_of_squares of float32
arrays on both sides of DOT_FROM are in test_transforms.py.)"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import sums


def half(x, dtype):
    """x rounded to a half-precision dtype, and the rounded values exactly, in float64."""
    h = jnp.asarray(x, dtype)
    return h, np.asarray(h.astype(jnp.float32), np.float64)


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.bfloat16])
@pytest.mark.parametrize("size", [100, sums.DOT_FROM - 1, sums.DOT_FROM, 20_000])
def test_half_precision_input_is_summed_in_float32(dtype, size):
    """A float16 accumulator would be off by ~1e-3 relative (ulp 2^-10) and stall at 2048 + ...;
    float32 accumulation keeps 1e-5."""
    x, exact = half(np.random.default_rng(size).uniform(0.5, 1.5, size), dtype)
    total, squares = sums.total(x), sums.sum_of_squares(x)
    assert total.dtype == jnp.float32 and squares.dtype == jnp.float32
    np.testing.assert_allclose(float(total), exact.sum(), rtol=1e-5)
    np.testing.assert_allclose(float(squares), (exact**2).sum(), rtol=1e-5)


@pytest.mark.parametrize("size", [100, 20_000])
def test_float64_input_is_summed_in_float64(size):
    """float32 accumulation of 20000 values near 0.1 errs by ~1e-6 relative; float64 by ~1e-14."""
    values = 0.1 + 1e-3 * np.random.default_rng(size).standard_normal(size)
    with jax.enable_x64(True):
        x = jnp.asarray(values)
        total, squares = sums.total(x), sums.sum_of_squares(x)
        assert x.dtype == jnp.float64 and total.dtype == jnp.float64 and squares.dtype == jnp.float64
        assert float(total) == pytest.approx(math.fsum(values), rel=1e-13)
        assert float(squares) == pytest.approx(math.fsum(values**2), rel=1e-13)


@pytest.mark.parametrize("shape", [(3, 5, 7), (4, 64, 80), (2, 4096)])
def test_row_means_are_numpys_per_row_mean(shape):
    """Below 4096 entries a row a reduction over its own axes, from there a product with ones."""
    x = np.random.default_rng(sum(shape)).standard_normal(shape).astype(np.float32)
    exact = x.astype(np.float64).reshape(shape[0], -1).mean(axis=1)
    np.testing.assert_allclose(np.asarray(sums.row_means(x)), exact, atol=1e-6)
    lanes = jax.vmap(sums.row_means)(np.stack([x, 3 * x]))
    np.testing.assert_allclose(np.asarray(lanes), np.stack([exact, 3 * exact]), atol=3e-6)
    np.testing.assert_allclose(np.asarray(jax.jit(sums.row_means)(x)), exact, atol=1e-6)


def test_row_sums_of_half_precision_rows_are_float32():
    x, exact = half(np.random.default_rng(2).uniform(0.5, 1.5, (3, 6000)), jnp.bfloat16)
    rows = sums.row_totals(x)
    assert rows.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(rows), exact.sum(axis=1), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(sums.row_sums_of_squares(x)), (exact**2).sum(axis=1), rtol=1e-5)


def test_rows_of_a_vector_are_its_entries():
    x = np.array([1.5, -2.0, 0.25], np.float32)
    np.testing.assert_array_equal(np.asarray(sums.row_totals(x)), x)
    np.testing.assert_array_equal(np.asarray(sums.row_means(x)), x)
    np.testing.assert_array_equal(np.asarray(sums.row_sums_of_squares(x)), x**2)


def test_global_norm_of_a_nested_tree():
    """Leaves of every size (a scalar, small and large arrays, a bfloat16 one) in dicts, lists and
    tuples: the norm of them all concatenated."""
    rng = np.random.default_rng(5)
    small, large = rng.standard_normal((3, 4)), rng.standard_normal((3, 50, 60))
    low, low_exact = half(rng.standard_normal(17), jnp.bfloat16)
    tree = {
        "layers": [{"w": large.astype(np.float32), "b": np.float32(-2.5)}, (small.astype(np.float32), low)],
        "empty": {},
    }
    flat = np.concatenate([large.ravel(), [-2.5], small.ravel(), low_exact])
    norm = sums.global_norm(tree)
    assert norm.dtype == jnp.float32
    np.testing.assert_allclose(float(norm), np.linalg.norm(flat), rtol=1e-6)
    np.testing.assert_allclose(float(jax.jit(sums.global_norm)(tree)), np.linalg.norm(flat), rtol=1e-6)
