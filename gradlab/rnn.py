"""A recurrent sequence classifier (flax.linen cells under nn.RNN) and its gradient through time.

`SequenceClassifier` reads a batch of sequences (batch, T, features) with a SimpleCell, LSTMCell or
GRUCell under nn.RNN (lax.scan) and reads its output at step `length - 1` out to one logit; `length`
may be traced, so one program of the longest T serves every shorter one (a mask: the steps after
`length - 1` run but never reach the loss). The recurrent kernels are drawn by inits.orthogonal
(free of LAPACK, unlike flax's default QR); `init_params` scales them by a gain and adds a forget-gate
bias to an LSTM.

`loss_and_grads` takes the logistic loss on that logit and, from the same backward pass, each
example's ||dl/dx_t||, RMS over the batch, indexed by the lag k = length - 1 - t (the number of
recurrent steps between x_t and the loss): the quantity that vanishes or explodes through time.
`task_batch` is a recall task whose label is the sign of the first input's first feature, so the
only useful signal sits T - 1 steps from the loss. `tanh_derivatives_by_lag` gives a tanh cell's
per-step factors tanh'(a) by lag, the numbers bounds on that decay are written in.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from gradlab import inits

CELLS = {"simple": nn.SimpleCell, "lstm": nn.LSTMCell, "gru": nn.GRUCell}


class SequenceClassifier(nn.Module):
    """A cell under nn.RNN, its output at step `length - 1` read out to one logit."""

    cell: str
    hidden: int
    param_dtype: Any = jnp.float32  # also the carry's dtype (flax initialises the carry with it)

    @nn.compact
    def __call__(self, xs_BxTxF, length):
        cell = CELLS[self.cell](
            self.hidden, param_dtype=self.param_dtype, recurrent_kernel_init=inits.orthogonal, name="cell"
        )
        outs = nn.RNN(cell, name="rnn")(xs_BxTxF)
        last = jax.lax.dynamic_index_in_dim(outs, length - 1, axis=1, keepdims=False)
        return nn.Dense(1, param_dtype=self.param_dtype, name="readout")(last)[:, 0], outs


def recurrent_kernels(cell_params: dict) -> list[str]:
    """Names of the dense layers acting on the carry h (flax names them h, h*)."""
    return [name for name in cell_params if name.startswith("h")]


def init_params(model: SequenceClassifier, key, example_BxTxF, length, gain, forget_bias) -> dict:
    """flax init, then the recurrent kernels scaled by `gain` and `forget_bias` added (LSTM)."""
    params = model.init(key, example_BxTxF, length)["params"]
    cell = dict(params["cell"])  # nn.RNN adds no scope: the cell's params sit under its own name
    for name in recurrent_kernels(cell):
        cell[name] = {**cell[name], "kernel": gain * cell[name]["kernel"]}
    if model.cell == "lstm":
        cell["hf"] = {**cell["hf"], "bias": cell["hf"]["bias"] + forget_bias}
    return {**params, "cell": cell}


def task_batch(key, batch: int, steps: int, features: int):
    """x ~ N(0, I) of shape (batch, steps, features); label 1 where the first input's feature 0 > 0."""
    xs = jax.random.normal(key, (batch, steps, features))
    return xs, (xs[:, 0, 0] > 0).astype(jnp.float32)


def per_step_grad_norm(grad_BxTxF) -> jax.Array:
    """RMS over the batch of each example's ||dl/dx_t||: shape (T,)."""
    return jnp.sqrt(jnp.mean(jnp.sum(jnp.square(grad_BxTxF), axis=-1), axis=0))


def by_lag(values_T, length) -> jax.Array:
    """values at t = length - 1 - k for k = 0 .. T-1 (NaN where t < 0): time -> distance to the loss."""
    t = length - 1 - jnp.arange(values_T.shape[0])
    return jnp.where(t >= 0, values_T[jnp.maximum(t, 0)], jnp.nan)


def loss_and_grads(model: SequenceClassifier, params, xs_BxTxF, labels_B, length):
    """Mean logistic loss on the last step; returns (loss, logits, outputs, param grads, ||dl/dx|| by lag).

    One backward pass gives both gradients; the input gradient of the batch mean is 1/batch of each
    example's own dl_i/dx_i, so it is scaled back by the batch size."""

    def loss_fn(params, xs):
        logits, outs = model.apply({"params": params}, xs, length)
        return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels_B)), (logits, outs)

    (loss, (logits, outs)), (grads, grad_xs) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
        params, xs_BxTxF
    )
    norms = by_lag(per_step_grad_norm(xs_BxTxF.shape[0] * grad_xs), length)
    return loss, logits, outs, grads, norms


def tanh_derivatives_by_lag(outs_BxTxH, length) -> dict:
    """For a cell whose output is h = tanh(a) (SimpleCell), the factors of back-propagation's per-step
    decay, by lag: dtanh_sq and dtanh_4th, the means over batch and features of tanh'(a)^2 and
    tanh'(a)^4 (tanh' = 1 - h^2), and log_max_dtanh, the batch mean of ln max_i tanh'(a_i)."""
    dtanh = 1.0 - jnp.square(outs_BxTxH)
    return {
        "dtanh_sq": by_lag(jnp.mean(jnp.square(dtanh), axis=(0, 2)), length),
        "dtanh_4th": by_lag(jnp.mean(jnp.square(jnp.square(dtanh)), axis=(0, 2)), length),
        "log_max_dtanh": by_lag(jnp.mean(jnp.log(jnp.max(dtanh, axis=2)), axis=0), length),
    }
