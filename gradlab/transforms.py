"""Optax chains built from a config: clipping, then the optimizer under a learning-rate schedule.

Swept numbers (learning rate, momentum, betas, weight decay, clip threshold) arrive as traced
values and are held in the optimizer state by `optax.inject_hyperparams`, so one compiled
program serves a whole sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp
import optax

from gradlab import sums

if TYPE_CHECKING:
    from gradlab.config import OptimConfig

SCHEDULES = (
    "constant",
    "cosine",
    "warmup_cosine",
    "exponential",
    "inverse_time",
    "step",
    "onecycle",
    "sgdr",
    "linear",
)
CLIPPING = ("none", "global_norm", "value", "agc")


def _matrices(params):
    """Weight decay mask: decay weight matrices (ndim >= 2), not biases or norm scales."""
    return jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)


def inverse_time_decay(steps: int, final_fraction: float) -> optax.Schedule:
    """1 / (1 + k t / steps), with k chosen so the value at `steps` is `final_fraction`."""
    if not 0 < final_fraction <= 1:
        raise ValueError(f"inverse_time_decay requires 0 < final_fraction <= 1, got {final_fraction}")
    k = 1.0 / final_fraction - 1.0

    def schedule(count):
        return 1.0 / (1.0 + k * jnp.minimum(count, steps) / steps)

    return schedule


def schedule_shape(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    """The schedule with peak 1 (multiplied by the traced learning rate), warmup included."""
    warmup = cfg.warmup_steps
    if cfg.schedule == "warmup_cosine":
        warmup = warmup or max(1, total_steps // 10)
        return optax.warmup_cosine_decay_schedule(
            0.0, 1.0, warmup, max(total_steps, warmup + 1), end_value=cfg.final_lr_fraction
        )
    if cfg.schedule == "onecycle":
        # The rise lasts warmup_steps when given, else 30% of training (Smith & Topin 2017).
        # optax places the peak at int(pct_start * total); the half step keeps that exact.
        pct = (warmup + 0.5) / total_steps if 0 < warmup < total_steps else 0.3
        return optax.cosine_onecycle_schedule(total_steps, 1.0, pct_start=pct)
    n = max(1, total_steps - warmup)
    end = cfg.final_lr_fraction
    if cfg.schedule == "constant":
        base = optax.constant_schedule(1.0)
    elif cfg.schedule == "cosine":
        base = optax.cosine_decay_schedule(1.0, n, alpha=end)
    elif cfg.schedule == "linear":
        base = optax.linear_schedule(1.0, end, n)
    elif cfg.schedule == "exponential":
        base = optax.exponential_decay(1.0, n, cfg.decay_rate)
    elif cfg.schedule == "inverse_time":
        base = inverse_time_decay(n, cfg.decay_rate)
    elif cfg.schedule == "step":
        drops = {int(n * i / (cfg.cycles + 1)): cfg.decay_rate for i in range(1, cfg.cycles + 1)}
        base = optax.piecewise_constant_schedule(1.0, drops)
    elif cfg.schedule == "sgdr":
        # c - 1 periods of n // c steps; the last one takes the remainder, so training ends annealed.
        period = max(1, n // cfg.cycles)
        spans = [period] * (cfg.cycles - 1) + [max(1, n - period * (cfg.cycles - 1))]
        base = optax.sgdr_schedule(
            [dict(init_value=1.0, peak_value=1.0, decay_steps=span, warmup_steps=0, end_value=end) for span in spans]
        )
    else:  # config validation lists the allowed names; this is a programming error
        raise ValueError(f"unknown schedule {cfg.schedule!r}; allowed: {', '.join(SCHEDULES)}")
    if warmup == 0:
        return base
    return optax.join_schedules([optax.linear_schedule(0.0, 1.0, warmup), base], [warmup])


def learning_rate(cfg: OptimConfig, lr, total_steps: int) -> Callable:
    """step -> learning rate: the traced peak `lr` times the schedule's shape.

    With accumulate_steps k the optimizer updates once per k steps: its schedule runs over
    total_steps // k updates and step t gets the rate of the update it contributes to, t // k.
    """
    k = cfg.accumulate_steps
    shape = schedule_shape(cfg, updates_of(cfg, total_steps))
    return lambda count: lr * shape(count // k)


def updates_of(cfg: OptimConfig, total_steps: int) -> int:
    """How many optimizer updates `total_steps` training steps make (one per accumulate_steps)."""
    return max(1, total_steps // cfg.accumulate_steps)


def adamw_decoupled(learning_rate, b1=0.9, b2=0.999, eps=1e-8, weight_decay=1e-4, mask=None):
    """AdamW as Loshchilov & Hutter 2019 (Algorithm 2) write it: the decay is not scaled by the lr.

        update = -(learning_rate * m_hat / (sqrt(v_hat) + eps) + weight_decay * params)

    The paper multiplies both terms by the schedule multiplier eta_t only: learning_rate =
    alpha eta_t and weight_decay = lambda eta_t (numbers or schedules). optax.adamw (and
    torch.optim.AdamW) instead compute -learning_rate * (m_hat / (sqrt(v_hat) + eps) +
    weight_decay * params): their decay per step is learning_rate * weight_decay.

    References:
      Loshchilov & Hutter, Decoupled Weight Decay Regularization, ICLR 2019, Algorithm 2 line 12.
    """
    return optax.chain(
        optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
        optax.scale_by_learning_rate(learning_rate, flip_sign=False),
        optax.add_decayed_weights(weight_decay, mask),
        optax.scale(-1.0),
    )


# The optimizers by name: (cfg, h, lr, shape) -> the optimizer alone, where h holds the swept
# numbers (lr, momentum, b1, b2, eps, weight_decay), lr is step -> learning rate and shape the
# schedule's shape (peak 1). Each coupled one gets L2 added to the gradient first (Adam+L2 in
# Loshchilov & Hutter 2019); the others apply their own decoupled decay. Config's optim.name
# choices are this table's names.
_inject = optax.inject_hyperparams


def _sgd(cfg, h, lr, shape):
    del cfg, h, shape
    return _inject(optax.sgd)(learning_rate=lr)


def _momentum(cfg, h, lr, shape):
    del shape
    return _inject(optax.sgd, static_args=("nesterov",))(
        learning_rate=lr, momentum=h["momentum"], nesterov=cfg.name == "nesterov"
    )


def _rmsprop(cfg, h, lr, shape):
    del cfg, shape
    # eps outside the square root, as PyTorch and Adam do (optax's default puts it inside).
    return _inject(optax.rmsprop, static_args=("eps_in_sqrt",))(
        learning_rate=lr, decay=h["b2"], eps=h["eps"], eps_in_sqrt=False
    )


def _adam(cfg, h, lr, shape):
    del cfg, shape
    return _inject(optax.adam)(learning_rate=lr, b1=h["b1"], b2=h["b2"], eps=h["eps"])


def _adagrad(cfg, h, lr, shape):
    """optax.adagrad: accumulators start at 0.1 (its default), eps inside the square root."""
    del cfg, shape
    return _inject(optax.adagrad)(learning_rate=lr, eps=h["eps"])


def _adamw(cfg, h, lr, shape):
    del cfg, shape
    return _inject(optax.adamw, static_args=("mask",))(
        learning_rate=lr, b1=h["b1"], b2=h["b2"], eps=h["eps"], weight_decay=h["weight_decay"], mask=_matrices
    )


def _adamw_decoupled(cfg, h, lr, shape):
    del cfg
    return _inject(adamw_decoupled, static_args=("mask",))(
        learning_rate=lr,
        b1=h["b1"],
        b2=h["b2"],
        eps=h["eps"],
        weight_decay=lambda count: h["weight_decay"] * shape(count),
        mask=_matrices,
    )


def _lion(cfg, h, lr, shape):
    """optax.lion (Chen et al. 2023), its decay decoupled and scaled by the learning rate as adamw's."""
    del cfg, shape
    return _inject(optax.lion, static_args=("mask",))(
        learning_rate=lr, b1=h["b1"], b2=h["b2"], weight_decay=h["weight_decay"], mask=_matrices
    )


_OPTIMIZERS = {  # name: (builder, whether L2 is added to the gradient first)
    "sgd": (_sgd, True),
    "momentum": (_momentum, True),
    "nesterov": (_momentum, True),
    "rmsprop": (_rmsprop, True),
    "adam": (_adam, True),
    "adamw": (_adamw, False),
    "adamw_decoupled": (_adamw_decoupled, False),
    "adagrad": (_adagrad, True),
    "lion": (_lion, False),
}
OPTIMIZERS = tuple(_OPTIMIZERS)  # the choices of optim.name


def optimizer(cfg: OptimConfig, hp: dict, total_updates: int, prefix: str = "optim.") -> optax.GradientTransformation:
    """The optimizer alone (no clipping, no accumulation), its swept numbers taken from `hp`."""
    if cfg.name not in _OPTIMIZERS:  # config validation lists the allowed names; a programming error
        raise ValueError(f"unknown optimizer {cfg.name!r}; allowed: {', '.join(OPTIMIZERS)}")
    make, coupled = _OPTIMIZERS[cfg.name]
    h = {name: hp[prefix + name] for name in ("lr", "momentum", "b1", "b2", "eps", "weight_decay")}
    shape = schedule_shape(cfg, total_updates)
    opt = make(cfg, h, lambda count: h["lr"] * shape(count), shape)
    if not coupled:
        return opt
    return optax.chain(optax.add_decayed_weights(h["weight_decay"], _matrices), opt)


def clip_by_global_norm(max_norm) -> optax.GradientTransformation:
    """optax.clip_by_global_norm with the norm taken as dot products (gradlab/sums.py).

    The same rule: updates pass unchanged while their global norm is below max_norm, and are
    scaled by max_norm / norm otherwise (Pascanu et al. 2013). Only the norm's last bits differ.
    """

    def update(updates, state, params=None):
        del params
        norm = sums.global_norm(updates)
        keep = norm < max_norm
        return jax.tree.map(lambda g: jax.lax.select(keep, g, (g / norm.astype(g.dtype)) * max_norm), updates), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def clipping(cfg: OptimConfig, threshold) -> optax.GradientTransformation:
    if cfg.clip == "global_norm":
        return clip_by_global_norm(threshold)
    if cfg.clip == "value":
        return optax.clip(threshold)
    if cfg.clip == "agc":
        return layerwise_agc(threshold)
    return optax.identity()


def layerwise_agc(threshold) -> optax.GradientTransformation:
    """Adaptive gradient clipping (Brock et al. 2021) per unit of each layer, stacked layers too.

    optax.adaptive_grad_clip infers a unit from a leaf's rank; our hidden layers are stacked on a
    leading depth axis, (depth, fan_in, fan_out), which it would read as one unit spanning all
    layers. Under "hidden" the unit is therefore taken over axis 1 alone: one output unit of one
    layer for a weight, one layer's vector for a bias or norm scale. Other leaves keep optax's
    convention (a weight's output unit, a bias's whole vector).
    """

    def fill(tree, label: str):
        return jax.tree.map(lambda _: label, tree)

    def labels(params):
        if isinstance(params, dict) and "hidden" in params:
            return {k: fill(v, "stacked" if k == "hidden" else "plain") for k, v in params.items()}
        return fill(params, "plain")

    return optax.multi_transform(
        {"stacked": optax.adaptive_grad_clip(threshold, axis=1), "plain": optax.adaptive_grad_clip(threshold)}, labels
    )


def scale_by_label(scales: dict, labels) -> optax.GradientTransformation:
    """Multiply each update by the scale of its leaf's label: per-layer learning rates, after the optimizer.

    Args:
      scales: label -> a number or a traced scalar (a constant 1 leaves its leaves untouched).
      labels: a pytree of labels with the parameters' structure, or params -> such a pytree.
    """

    def scaled(update, label):
        scale = scales[label]
        if isinstance(scale, (int, float)) and scale == 1:
            return update
        return update * jnp.asarray(scale, update.dtype)

    def update(updates, state, params=None):
        del params
        tags = labels(updates) if callable(labels) else labels
        return jax.tree.map(scaled, updates, tags), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def build(cfg: OptimConfig, hp: dict, total_steps: int, prefix: str = "optim.") -> optax.GradientTransformation:
    """clipping -> optimizer, as one optax chain; under optax.MultiSteps when accumulate_steps > 1.

    MultiSteps averages k = accumulate_steps gradients, passes their mean through the chain
    once (clipping acts on the mean, as it would on one batch k times larger) and returns zero
    updates in between; the schedule counts updates, so warmup_steps are updates too.
    """
    chain = optax.chain(
        clipping(cfg, hp[prefix + "clip_threshold"]), optimizer(cfg, hp, updates_of(cfg, total_steps), prefix)
    )
    if cfg.accumulate_steps == 1:
        return chain
    return optax.MultiSteps(chain, every_k_schedule=cfg.accumulate_steps).gradient_transformation()


def batch_scaled_lr(lr, batch_ratio: float, power, warmup_examples, seen):
    """The learning rate for a batch batch_ratio times the base batch, by Goyal et al. 2017's rule
    (Sec. 2): lr k with k = batch_ratio**power (power 1 the linear rule, 1/2 the square-root rule, 0
    a fixed rate), reached by their gradual warmup (Sec. 2.2), linear in the examples `seen` from lr
    at none to k lr at warmup_examples (k lr from the start where warmup_examples is 0). Every
    argument but batch_ratio may be traced."""
    scale = batch_ratio**power
    ramp = jnp.where(warmup_examples > 0, jnp.minimum(1.0, seen / jnp.maximum(warmup_examples, 1.0)), 1.0)
    return lr * (1.0 + (scale - 1.0) * ramp)
