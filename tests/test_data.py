"""Synthetic tasks: fixed by data.seed, the teacher recovered from the targets, minibatch epochs,
the losses against numpy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import data
from gradlab.config import DataConfig


def config(**kw):
    return dataclasses.replace(DataConfig(), **kw)


def f64(a):
    return np.asarray(a, np.float64)


def test_make_is_fixed_by_the_seed_and_differs_across_seeds():
    cfg = config(examples=64, input_dim=8, output_dim=3, noise=0.1, seed=5)
    a, b = data.make(cfg), data.make(cfg)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    other = data.make(config(examples=64, input_dim=8, output_dim=3, noise=0.1, seed=6))
    assert np.mean(np.asarray(a.x) != np.asarray(other.x)) > 0.99
    assert np.mean(np.asarray(a.y) != np.asarray(other.y)) > 0.99
    labels = [data.make(config(task="classification", examples=64, output_dim=4, seed=s)).y for s in (5, 6)]
    assert np.mean(np.asarray(labels[0]) != np.asarray(labels[1])) > 0.3  # 3/4 expected for unrelated labels


def fit_teacher(x, y):
    """The p with y = sin(x p), column by column: Stein's lemma for its direction (E[x sin(x.p)] is
    along p for Gaussian x), a line search for its length, then Gauss-Newton."""
    teacher = []
    for target in y.T:
        u = (x * target[:, None]).mean(axis=0)
        u /= np.linalg.norm(u)
        lengths = np.linspace(0.05, 4.0, 200)
        p = u * lengths[np.argmin(np.sum((np.sin(np.outer(x @ u, lengths)) - target[:, None]) ** 2, axis=0))]
        for _ in range(10):
            z = x @ p
            jac = np.cos(z)[:, None] * x
            p = p - np.linalg.solve(jac.T @ jac, jac.T @ (np.sin(z) - target))
        teacher.append(p)
    return np.stack(teacher, axis=1)


def test_regression_targets_are_a_sine_of_a_gaussian_teacher():
    """y = sin(x p): p fitted from (x, y) alone reproduces y to float32 rounding, and its entries have
    the variance 1/input_dim the task is built with (512 of them: 1 +- 0.0625 at one sigma)."""
    cfg = config(examples=2000, input_dim=32, output_dim=16, noise=0.0, seed=3)
    task = data.make(cfg)
    x, y = f64(task.x), f64(task.y)
    assert x.shape == (2000, 32) and y.shape == (2000, 16)
    assert np.max(np.abs(y)) <= 1.0
    assert abs(x.mean()) < 0.03 and abs(x.var() - 1) < 0.03  # x ~ N(0, I): 64000 draws
    teacher = fit_teacher(x, y)
    assert np.max(np.abs(np.sin(x @ teacher) - y)) < 1e-5
    assert np.var(teacher) * cfg.input_dim == pytest.approx(1.0, abs=0.25)


def test_regression_noise_is_added_to_the_same_task():
    clean = data.make(config(examples=1000, input_dim=8, output_dim=4, noise=0.0, seed=2))
    noisy = data.make(config(examples=1000, input_dim=8, output_dim=4, noise=0.3, seed=2))
    np.testing.assert_array_equal(clean.x, noisy.x)
    diff = f64(noisy.y) - f64(clean.y)
    assert np.std(diff) == pytest.approx(0.3, rel=0.03)  # 4000 draws: 1.1% at one sigma
    assert abs(np.mean(diff)) < 4 * 0.3 / np.sqrt(diff.size)
    assert np.max(np.abs(f64(noisy.y))) > 1.0


def test_classification_labels_are_in_range_and_every_class_is_present():
    task = data.make(config(task="classification", examples=4000, input_dim=16, output_dim=4, seed=1))
    labels = np.asarray(task.y)
    assert labels.shape == (4000,) and np.issubdtype(labels.dtype, np.integer)
    assert labels.min() >= 0 and labels.max() <= 3
    share = np.bincount(labels, minlength=4) / labels.size
    assert np.all((share > 0.12) & (share < 0.4)), share  # a random linear teacher: about 1/4 each
    noisy = np.asarray(
        data.make(config(task="classification", examples=4000, input_dim=16, output_dim=4, seed=1, noise=0.1)).y
    )
    assert 0 < np.mean(noisy != labels) < 0.2  # noise on the logits moves the labels near a boundary


def test_full_batch_when_batch_size_is_zero_or_the_whole_set():
    cfg = config(examples=20, input_dim=3)
    task = data.make(cfg)
    for size in (0, 20, 50):
        got = data.batch(task, dataclasses.replace(cfg, batch_size=size), jnp.int32(7), jax.random.PRNGKey(0))
        np.testing.assert_array_equal(got.x, task.x)
        np.testing.assert_array_equal(got.y, task.y)


def rows(task, batch):
    """The example indices of a minibatch's rows (x's first column identifies an example)."""
    first = f64(task.x)[:, 0]
    idx = [int(np.flatnonzero(first == v)[0]) for v in f64(batch.x)[:, 0]]
    np.testing.assert_array_equal(batch.x, np.asarray(task.x)[idx])
    np.testing.assert_array_equal(batch.y, np.asarray(task.y)[idx])  # the (x, y) pairs stay together
    return idx


@pytest.mark.parametrize("examples", [24, 26])
def test_minibatches_of_an_epoch_are_disjoint_and_cover_the_set(examples):
    cfg = config(examples=examples, input_dim=3, output_dim=2, batch_size=8, noise=0.1)
    task = data.make(cfg)
    assert len(np.unique(f64(task.x)[:, 0])) == examples
    key = jax.random.PRNGKey(11)
    jitted = jax.jit(lambda step: data.batch(task, cfg, step, key))
    epochs = []
    for epoch in range(2):
        seen = []
        for step in range(3 * epoch, 3 * epoch + 3):
            batch = jitted(jnp.int32(step))  # the step traced, as in a training step
            assert batch.x.shape == (8, 3)
            seen += rows(task, batch)
        assert len(set(seen)) == 24  # three disjoint batches of 8 (of 26, two wait for another epoch)
        epochs.append(seen)
    assert epochs[0] != epochs[1]  # each epoch its own shuffle
    np.testing.assert_array_equal(data.batch(task, cfg, 4, key).x, jitted(jnp.int32(4)).x)  # eager: the same


def test_regression_loss_is_the_mean_squared_error():
    rng = np.random.default_rng(0)
    out, y = rng.standard_normal((10, 3)).astype(np.float32), rng.standard_normal((10, 3)).astype(np.float32)
    cfg = config(output_dim=3)
    expected = np.mean((f64(out) - f64(y)) ** 2)
    assert float(data.loss(cfg, out, y)) == pytest.approx(expected, rel=1e-6)
    low = data.loss(cfg, jnp.asarray(out, jnp.bfloat16), y)
    assert low.dtype == jnp.float32


def test_classification_loss_is_the_cross_entropy():
    rng = np.random.default_rng(1)
    logits = (3 * rng.standard_normal((12, 4))).astype(np.float32)
    labels = rng.integers(0, 4, 12)
    cfg = config(task="classification", output_dim=4)
    z = f64(logits)
    log_softmax = z - z.max(1, keepdims=True) - np.log(np.exp(z - z.max(1, keepdims=True)).sum(1, keepdims=True))
    expected = -np.mean(log_softmax[np.arange(12), labels])
    assert float(data.loss(cfg, logits, labels)) == pytest.approx(expected, rel=1e-6)
    sure = np.full((2, 4), -50.0, np.float32)
    sure[[0, 1], [2, 0]] = 50.0
    assert float(data.loss(cfg, sure, np.array([2, 0]))) < 1e-6  # confident and right
    assert float(data.loss(cfg, sure, np.array([1, 3]))) == pytest.approx(100.0, rel=1e-6)  # confident and wrong
