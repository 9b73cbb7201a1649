"""Loss scaling for float16 training: static and dynamic, as an optax GradientTransformation.

Float16 gradients underflow: an entry below half the smallest subnormal (2^-25) rounds to zero.
Multiplying the loss by a scale S before differentiation multiplies every gradient of the
backward pass by S, lifting the small ones into float16's range; the float32 gradients are
divided by S afterwards. Too large an S overflows float16 (> 65504 becomes inf). Dynamic loss
scaling (Micikevicius et al. 2018, Sec. 3.2) finds S as it trains: a step whose gradients are not
finite is skipped and S halves; after `growth_interval` consecutive finite steps S doubles.

The pieces, usable alone or through the wrapper:

    state = init(initial_scale)                  # LossScaleState(scale, good_steps, skipped)
    loss_s = scale_loss(loss, state)             # differentiate this one
    grads, finite = unscale(grads_s, state)      # float32 grads / scale, and whether all finite
    state = adjust(state, finite, growth_interval)

`loss_scaling(inner, ...)` wraps an optimizer: its update takes the *scaled* gradients, unscales
them, runs `inner` on a finite step and on a non-finite one returns zero updates and leaves the
inner state untouched (bit for bit). The scale to multiply the loss by is `current_scale(state)`.

References:
  Micikevicius et al., Mixed Precision Training, ICLR 2018, Sec. 3.2 and Fig. 3.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class LossScaleState(NamedTuple):
    """The loss scale and its bookkeeping (all scalars, so a batch of them vmaps)."""

    scale: jax.Array  # float32: the loss is multiplied by this before differentiation
    good_steps: jax.Array  # int32: consecutive finite steps since the scale last changed
    skipped: jax.Array  # int32: steps so far whose gradients were not finite (skipped, unless told not to)


class LossScalingState(NamedTuple):
    """The state of `loss_scaling`: the scale's and the wrapped optimizer's."""

    loss_scale: LossScaleState
    inner: Any


def init(initial_scale) -> LossScaleState:
    """A fresh loss scale (a number or a traced scalar)."""
    return LossScaleState(jnp.asarray(initial_scale, jnp.float32), jnp.int32(0), jnp.int32(0))


def scale_loss(loss, state: LossScaleState) -> jax.Array:
    """The loss times the scale, in float32 (differentiate this to get scaled gradients)."""
    return loss.astype(jnp.float32) * state.scale


def all_finite(tree) -> jax.Array:
    """True when no entry of any leaf is inf or NaN."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.all(jnp.stack(leaves)) if leaves else jnp.bool_(True)


def unscale(grads, state: LossScaleState):
    """(float32 grads divided by the scale, whether every entry is finite)."""
    grads = jax.tree.map(lambda g: g.astype(jnp.float32) / state.scale, grads)
    return grads, all_finite(grads)


def adjust(
    state: LossScaleState,
    finite,
    growth_interval,
    growth_factor=2.0,
    backoff_factor=0.5,
    min_scale=1.0,
) -> LossScaleState:
    """The scale after a step whose gradients were `finite` (or not).

    Not finite: scale x backoff_factor (not below min_scale), good_steps = 0, skipped + 1.
    Finite: good_steps + 1; when that reaches growth_interval, scale x growth_factor (kept if the
    product would not be finite) and good_steps = 0. growth_factor = backoff_factor = 1 is a static
    scale. Every argument may be traced.
    """
    finite = jnp.asarray(finite, jnp.bool_)
    good = state.good_steps + 1
    grow = finite & (good >= growth_interval)
    grown = state.scale * growth_factor
    grown = jnp.where(jnp.isfinite(grown), grown, state.scale)
    shrunk = jnp.maximum(state.scale * backoff_factor, min_scale)
    scale = jnp.where(finite, jnp.where(grow, grown, state.scale), shrunk).astype(jnp.float32)
    good_steps = jnp.where(finite & ~grow, good, 0).astype(jnp.int32)
    skipped = (state.skipped + jnp.where(finite, 0, 1)).astype(jnp.int32)
    return LossScaleState(scale, good_steps, skipped)


def loss_scaling(
    inner: optax.GradientTransformation,
    initial_scale=2.0**15,
    growth_interval=2000,
    growth_factor=2.0,
    backoff_factor=0.5,
    min_scale=1.0,
    skip_nonfinite=True,
) -> optax.GradientTransformation:
    """Wrap `inner` so it takes gradients of the scaled loss.

    update(scaled_grads, state, params) divides the gradients by the current scale (in float32),
    then, if they are all finite, applies `inner` to them; if not (and skip_nonfinite), the step
    is skipped: zero updates, the inner state unchanged. The scale then moves as in `adjust`.
    With growth_factor = backoff_factor = 1 the scale is static; skip_nonfinite=False lets a
    non-finite step through (the float16 reality of a too-large static scale). Numbers may be
    traced (one compiled program for a sweep over them).

    Example:
      >>> tx = loss_scaling(optax.sgd(0.1), initial_scale=1024.0, growth_interval=100)
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: loss(p) * current_scale(state))(params)
      >>> updates, state = tx.update(grads, state, params)

    Raises:
      ValueError: a Python-number argument out of range (checked when built).
    """
    for name, value, ok in (("initial_scale", initial_scale, lambda v: v > 0),
                            ("growth_interval", growth_interval, lambda v: v >= 1),
                            ("growth_factor", growth_factor, lambda v: v >= 1),
                            ("backoff_factor", backoff_factor, lambda v: 0 < v <= 1),
                            ("min_scale", min_scale, lambda v: v > 0)):
        if isinstance(value, (int, float)) and not ok(value):
            raise ValueError(f"loss_scaling requires a valid {name}, got {name}={value}")

    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        return LossScalingState(init(initial_scale), inner.init(params))

    def update_fn(updates, state, params=None, **extra):
        grads, finite = unscale(updates, state.loss_scale)
        skip = ~finite & jnp.asarray(skip_nonfinite, jnp.bool_)
        # The inner optimizer never sees a gradient it would skip (its output is discarded anyway).
        grads = jax.tree.map(lambda g: jnp.where(skip, jnp.zeros_like(g), g), grads)
        new_updates, new_inner = inner.update(grads, state.inner, params, **extra)
        new_updates = jax.tree.map(lambda u: jnp.where(skip, jnp.zeros_like(u), u), new_updates)
        new_inner = jax.tree.map(lambda n, o: jnp.where(skip, o, n), new_inner, state.inner)
        scale = adjust(state.loss_scale, finite, growth_interval, growth_factor, backoff_factor, min_scale)
        return new_updates, LossScalingState(scale, new_inner)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def current_scale(state: LossScalingState) -> jax.Array:
    """The scale to multiply the next loss by."""
    return state.loss_scale.scale
