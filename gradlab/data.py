"""Training data held whole in memory: synthetic teacher-student tasks and real datasets.

The real datasets (gradlab/datasets.py: mnist1d, digits, diabetes) come with a held-out split;
`held_out` returns it, `make` the training split. Minibatches of either are drawn inside the
compiled step (`batch`), per seed, with no host round trip.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradlab import datasets
from gradlab.norms import at_least_f32

if TYPE_CHECKING:
    from gradlab.config import DataConfig

SYNTHETIC = ("regression", "classification")
TASKS = SYNTHETIC + datasets.NAMES  # the tasks make() builds


class Data(NamedTuple):
    x: jax.Array  # (examples, input_dim)
    y: jax.Array  # (examples, output_dim) targets, or (examples,) integer labels


def kind(cfg: DataConfig) -> str:
    """The task's kind, classification or regression: it decides the loss and the constant predictor."""
    return task_kind(cfg.task)


def task_kind(task: str) -> str:
    """kind() from the task's name alone (a stored run's config is a dict)."""
    return task if task in SYNTHETIC else datasets.SHAPES[task].kind


def make(cfg: DataConfig) -> Data:
    """The training set: the synthetic task fixed by `cfg.seed`, or a real dataset's train split.

    regression:     x ~ N(0, I), y = sin(x p) + noise, p ~ N(0, 1/input_dim)
    classification: y = argmax(x t + noise) over output_dim classes, t ~ N(0, 1/input_dim)
    mnist1d, digits, diabetes: gradlab/datasets.py (standardised, a fixed split)
    """
    if cfg.task not in SYNTHETIC:
        split = datasets.load(cfg.task)
        return Data(jnp.asarray(split.x_train), jnp.asarray(split.y_train))
    n, d_in, d_out = cfg.examples, cfg.input_dim, cfg.output_dim
    z = jax.random.normal(jax.random.PRNGKey(cfg.seed), (n * d_in + d_in * d_out + n * d_out,))
    x = z[: n * d_in].reshape(n, d_in)
    teacher = z[n * d_in : n * d_in + d_in * d_out].reshape(d_in, d_out) / jnp.sqrt(d_in)
    noise = cfg.noise * z[n * d_in + d_in * d_out :].reshape(n, d_out)
    if cfg.task == "classification":
        return Data(x, jnp.argmax(x @ teacher + noise, axis=-1))
    return Data(x, jnp.sin(x @ teacher) + noise)


def held_out(cfg: DataConfig) -> Data | None:
    """A real dataset's test split; None for a synthetic task (it has none)."""
    if cfg.task in SYNTHETIC:
        return None
    split = datasets.load(cfg.task)
    return Data(jnp.asarray(split.x_test), jnp.asarray(split.y_test))


def eval_slice(test: Data, size: int, step) -> Data:
    """The `size` test examples step `step` evaluates: consecutive slices in a fixed order, so any
    ceil(n / size) consecutive steps see every test example (the last slice overlaps the one before)."""
    n = test.x.shape[0]
    if size >= n:
        return test
    slices = -(-n // size)
    start = jnp.minimum((step % slices) * size, n - size)
    return Data(*(jax.lax.dynamic_slice_in_dim(a, start, size) for a in test))


def batch(data: Data, cfg: DataConfig, step, key) -> Data:
    """The minibatch for `step`: the whole set when batch_size is 0, else epochs of shuffles."""
    n, size = cfg.examples, cfg.batch_size
    if size == 0 or size >= n:
        return data
    per_epoch = n // size
    perm = jax.random.permutation(jax.random.fold_in(key, step // per_epoch), n)
    idx = jax.lax.dynamic_slice_in_dim(perm, (step % per_epoch) * size, size)
    return Data(data.x[idx], data.y[idx])


def loss(cfg: DataConfig, out, y):
    """Mean squared error (regression) or softmax cross-entropy (classification), in float32."""
    out = at_least_f32(out)
    if kind(cfg) == "classification":
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))
    return jnp.mean(jnp.square(out - y))


def accuracy(out, labels):
    """The fraction of rows whose largest output is the label."""
    return jnp.mean((jnp.argmax(out, axis=-1) == labels).astype(jnp.float32))


def output_dim(cfg: DataConfig) -> int:
    return cfg.output_dim
