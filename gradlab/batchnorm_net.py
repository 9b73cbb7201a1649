"""An MLP with BatchNorm (Ioffe & Szegedy 2015) as its norm, as pure init/apply functions.

The layout, init, residual rule and depth mask are models.py's (input projection, `depth` hidden
blocks under lax.scan, linear readout), with flax.linen.BatchNorm where models.py has a per-example
norm, r = 1 for residual nets and 0 otherwise:
  pre:  h <- r h + act(W BN(h) + b)        post: h <- BN(r h + act(W h + b))
and with spec.final_norm one more BN before the readout. In training mode BN normalises each feature
with the mean mu_B and biased variance v_B of the batch's rows where `mask` is true (Algorithm 1):
  BN(x) = scale (x - mu_B) / sqrt(v_B + eps) + bias,
and updates its running averages s <- m s + (1 - m) stat_B (flax's momentum m; the variance stays
biased, without Algorithm 2's B / (B - 1)); in inference mode the running averages replace mu_B, v_B.
Masking rows is training on fewer of them: a net under mask[:B] equals one fed the first B rows.
`statistics_errors` holds the recorded statistics to their closed forms within flax's float32 error.

References: Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", Algorithms 1 and 2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradlab import analysis, data, models

EPS = 1e-5  # flax.linen.BatchNorm's default epsilon
ULP = float(np.finfo(np.float32).eps) / 2  # float32 unit roundoff, 2^-24


class _Block(nn.Module):
    """One hidden block with flax's BatchNorm; returns (h, the BatchNorm's input, its output)."""

    width: int
    activation: str
    position: str
    momentum: float
    train: bool

    @nn.compact
    def __call__(self, h, residual, leaky_slope, mask):
        act = models.activation_fn(self.activation, leaky_slope)
        bn = nn.BatchNorm(use_running_average=not self.train, momentum=self.momentum, epsilon=EPS, name="bn")
        dense = nn.Dense(self.width, name="dense")
        if self.position == "pre":
            z = bn(h, mask=mask[:, None])
            return residual * h + act(dense(z)), h, z
        u = residual * h + act(dense(h))
        out = bn(u, mask=mask[:, None])
        return out, u, out


def init(key, spec: models.MLPSpec, hyper: models.MLPHyper) -> tuple[dict, dict]:
    """(params, batch_stats): the weights models.init draws for the same key, BatchNorm scale 1 and
    bias 0, running mean 0 and variance 1 (flax's initial values)."""
    params = models.init(key, dataclasses.replace(spec, norm="layernorm"), hyper)
    d, w = spec.depth, spec.width
    stats = {"hidden": {"mean": jnp.zeros((d, w)), "var": jnp.ones((d, w))}}
    if spec.final_norm:
        stats["final"] = {"mean": jnp.zeros((w,)), "var": jnp.ones((w,))}
    return params, stats


def masked_moments(x, mask) -> tuple[jax.Array, jax.Array]:
    """Per-feature mean and biased variance over the rows where mask is true (two-pass)."""
    weight = mask.astype(jnp.float32)[:, None] * jnp.ones((1, x.shape[1]))
    count = jnp.sum(weight, axis=0)
    mean = jnp.sum(weight * x, axis=0) / count
    var = jnp.sum(weight * jnp.square(x - mean[None]), axis=0) / count
    return mean, var


def apply(params, stats, x, mask, spec: models.MLPSpec, hyper: models.MLPHyper, train: bool, momentum: float):
    """Forward pass on the rows of x (batch, in_dim) where mask is true (training mode) or on all
    rows with the running averages (inference mode).

    Returns:
      (out, new batch_stats, moments): moments are the first block's BatchNorm input's and output's
      per-feature mean and variance over the masked rows (masked_moments), in training mode.
    """
    act = models.activation_fn(spec.activation, hyper.leaky_slope)
    block = _Block(spec.width, spec.activation, spec.norm_position, momentum, train)
    residual = jnp.asarray(hyper.residual).astype(jnp.float32)
    mutable = ["batch_stats"] if train else False
    h = act(x @ params["input"]["w"] + params["input"]["b"][None])

    def body(h, layer):
        index, p, s = layer
        variables = {
            "params": {"dense": {"kernel": p["w"], "bias": p["b"]}, "bn": {"scale": p["scale"], "bias": p["bias"]}},
            "batch_stats": {"bn": s},
        }
        result = block.apply(variables, h, residual, hyper.leaky_slope, mask, mutable=mutable)
        # flax types apply's result as one union of `out` and `(out, updated)`; `mutable` decides which.
        (new, bn_in, bn_out), updated = result if train else (cast(tuple, result), {"batch_stats": {"bn": s}})
        active = index < hyper.depth
        new = jnp.where(active, new, h)
        s = jax.tree.map(lambda n, o: jnp.where(active, n, o), updated["batch_stats"]["bn"], s)
        return new, (s, (*masked_moments(bn_in, mask), *masked_moments(bn_out, mask)))

    layers = (jnp.arange(spec.depth), params["hidden"], stats["hidden"])
    h, (hidden_stats, moments) = jax.lax.scan(body, h, layers)
    new_stats = {"hidden": hidden_stats}
    if spec.final_norm:
        bn = nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=EPS)
        variables = {"params": params["final"], "batch_stats": stats["final"]}
        result = bn.apply(variables, h, mask=mask[:, None], mutable=mutable)
        h, updated = result if train else (result, {"batch_stats": stats["final"]})
        new_stats["final"] = updated["batch_stats"]
    out = h @ params["output"]["w"] + params["output"]["b"][None]
    return out, new_stats, jax.tree.map(lambda m: m[0], moments)


def masked_loss(data_cfg, out, y, mask):
    """data.loss over the rows where mask is true: mean squared error or softmax cross-entropy."""
    if data.kind(data_cfg) == "classification":
        per_row = optax.softmax_cross_entropy_with_integer_labels(out, y)
    else:
        per_row = jnp.mean(jnp.square(out - y), axis=-1)
    weight = mask.astype(jnp.float32)
    return jnp.sum(weight * per_row) / jnp.sum(weight)


class Net(NamedTuple):
    """init(key, hyper) -> (params, stats); apply(params, stats, x, mask, hyper, train) -> (out, stats, moments)."""

    init: Callable
    apply: Callable


def net(spec: models.MLPSpec, momentum: float) -> Net:
    """Any norm's net behind this module's signature, so one training loop runs them all: BatchNorm's
    for spec.norm == "batchnorm", else models.py's with no statistics ({}) and no moments (None),
    the same in training and inference."""
    if spec.norm == "batchnorm":
        return Net(
            lambda key, hyper: init(key, spec, hyper),
            lambda p, s, x, mask, hyper, train: apply(p, s, x, mask, spec, hyper, train, momentum),
        )

    def per_example(p, s, x, mask, hyper, train):
        del mask, train  # per-example norms: no batch statistics
        return models.apply(p, x, spec, hyper)[0], s, None

    return Net(lambda key, hyper: (models.init(key, spec, hyper), {}), per_example)


def statistics_errors(moments: dict, sizes, momentum: float) -> tuple[float, float, float, float]:
    """The first block's recorded BatchNorm statistics against their closed forms (numpy).

    Args:
      moments: arrays (step, ..., batch size, feature) of the BatchNorm's input and output batch
        moments (masked_moments, two-pass) and its running averages after each step: in_mean, in_var,
        out_mean, out_var, running_mean, running_var.
      sizes: the batch size (rows) of each entry of the batch size axis.
      momentum: the running averages' m.

    Returns:
      (max |error| / its float32 bound, max |error|) of the training-mode output's batch mean (0) and
      variance (v / (v + eps), v the input's batch variance) at init (step 0), and (the same, max
      relative error) of the running mean and variance against a float64 exponential average of the
      input's batch moments.

    flax reduces E[x^2] - E[x]^2 in float32: over B rows its mean and variance carry up to ~B u E[x^2]
    (u = 2^-24), which moves the output's mean by B u sqrt(E[x^2] / (v + eps)) and its variance by
    B u E[x^2] / (v + eps); an average with weights summing to <= 1 keeps that size. The bounds are 16
    times that (and 1e-6 for the sums at init).
    """
    x = {k: np.asarray(v, float) for k, v in moments.items()}
    ulps = 16 * np.asarray(sizes, float)[:, None] * ULP
    v = x["in_var"][0]
    r = (np.square(x["in_mean"][0]) + v) / (v + EPS)
    mean_err, var_err = np.abs(x["out_mean"][0]), np.abs(x["out_var"][0] - v / (v + EPS))
    closed = max(np.nanmax(mean_err / (ulps * np.sqrt(r) + 1e-6)), np.nanmax(var_err / (ulps * r + 1e-6)))
    scale = np.max(np.square(x["in_mean"]) + x["in_var"], axis=0)  # max over steps of E[x^2]
    worst, rel = 0.0, 0.0
    for stat, start in (("mean", 0.0), ("var", 1.0)):
        ref = analysis.exponential_average(x[f"in_{stat}"], start, momentum)
        err = np.abs(x[f"running_{stat}"] - ref)
        worst = max(worst, float(np.nanmax(err / (ulps * np.maximum(scale, 1.0)))))
        rel = max(rel, float(np.nanmax(err / np.maximum(np.abs(ref), 1e-3))))
    return float(closed), float(max(np.nanmax(mean_err), np.nanmax(var_err))), worst, rel
