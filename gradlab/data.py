"""Synthetic tasks: teacher-student regression and classification, held whole in memory."""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradlab.norms import at_least_f32

if TYPE_CHECKING:
    from gradlab.config import DataConfig

TASKS = ("regression", "classification")  # the tasks make() builds


class Data(NamedTuple):
    x: jax.Array  # (examples, input_dim)
    y: jax.Array  # (examples, output_dim) targets, or (examples,) integer labels


def make(cfg: DataConfig) -> Data:
    """The task fixed by `cfg.seed`.

    regression:     x ~ N(0, I), y = sin(x p) + noise, p ~ N(0, 1/input_dim)
    classification: y = argmax(x t + noise) over output_dim classes, t ~ N(0, 1/input_dim)
    """
    n, d_in, d_out = cfg.examples, cfg.input_dim, cfg.output_dim
    z = jax.random.normal(jax.random.PRNGKey(cfg.seed), (n * d_in + d_in * d_out + n * d_out,))
    x = z[: n * d_in].reshape(n, d_in)
    teacher = z[n * d_in : n * d_in + d_in * d_out].reshape(d_in, d_out) / jnp.sqrt(d_in)
    noise = cfg.noise * z[n * d_in + d_in * d_out :].reshape(n, d_out)
    if cfg.task == "classification":
        return Data(x, jnp.argmax(x @ teacher + noise, axis=-1))
    return Data(x, jnp.sin(x @ teacher) + noise)


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
    if cfg.task == "classification":
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(out, y))
    return jnp.mean(jnp.square(out - y))


def output_dim(cfg: DataConfig) -> int:
    return cfg.output_dim
