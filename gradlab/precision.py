"""Number formats and loss scaling: what float16 and bfloat16 represent, what rounding to them
loses, and static and dynamic loss scaling as optax GradientTransformations.

Float16 has 5 exponent and 10 mantissa bits: bias b = 2^4 - 1 = 15, smallest normal 2^(1-b) =
2^-14, smallest subnormal 2^(1-b-10) = 2^-24, largest (2 - 2^-10) 2^15 = 65504 (`format_range`
builds these from the bits, `representable_range` reads them from jnp.finfo). A gradient entry at
most half the smallest subnormal (2^-25) rounds to zero; one in (2^-25, 2^-14) survives as a
subnormal with fewer mantissa bits. bfloat16 keeps float32's 8 exponent bits, so its range is
float32's.

Loss scaling: multiplying the loss by a scale S before differentiation multiplies every gradient
of the backward pass by S, lifting the small ones into float16's range; the float32 gradients are
divided by S afterwards. Too large an S overflows float16 (> 65504 becomes inf). Dynamic loss
scaling finds S as it trains: a step whose gradients are not finite is skipped and S halves; after
`growth_interval` consecutive finite steps S doubles. The pieces, usable alone or through the
wrapper `loss_scaling(inner, ...)`:

    state = init(initial_scale)                  # LossScaleState(scale, good_steps, skipped)
    loss_s = scale_loss(loss, state)             # differentiate this one
    grads, finite = unscale(grads_s, state)      # float32 grads / scale, and whether all finite
    state = adjust(state, finite, growth_interval)

References:
  IEEE 754-2008, binary16 (Sec. 3.6).
  Micikevicius et al., Mixed Precision Training, ICLR 2018, Sec. 3.2 and Fig. 3.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.typing import ArrayLike

# ----------------------------------------------------------------------------- number formats


class FloatRange(NamedTuple):
    """What a binary floating-point format represents (positive side)."""

    smallest_subnormal: float
    smallest_normal: float
    max: float
    eps: float  # the gap between 1 and the next number


def representable_range(dtype) -> FloatRange:
    """The range of a dtype, from jnp.finfo."""
    info = jnp.finfo(dtype)
    return FloatRange(float(info.smallest_subnormal), float(info.smallest_normal), float(info.max), float(info.eps))


def format_range(exponent_bits: int, mantissa_bits: int) -> FloatRange:
    """The range an IEEE-754-style format has by construction: bias b = 2^(e-1) - 1, smallest
    normal 2^(1-b), smallest subnormal 2^(1-b-m), largest (2 - 2^-m) 2^b, eps 2^-m."""
    bias = 2 ** (exponent_bits - 1) - 1
    return FloatRange(
        2.0 ** (1 - bias - mantissa_bits),
        2.0 ** (1 - bias),
        (2.0 - 2.0**-mantissa_bits) * 2.0**bias,
        2.0**-mantissa_bits,
    )


def flushes_to_zero(g, dtype=jnp.float16) -> jax.Array:
    """Non-zero entries that round to zero in `dtype`: |g| <= half its smallest subnormal (the tie
    goes to the even neighbour, 0)."""
    half = jnp.finfo(dtype).smallest_subnormal.astype(jnp.float32) / 2
    a = jnp.abs(g.astype(jnp.float32))
    return (a > 0) & (a <= half)


def lands_subnormal(g, dtype=jnp.float16) -> jax.Array:
    """Entries that round to a non-zero subnormal of `dtype`: half the smallest subnormal < |g| <
    smallest normal - half the smallest subnormal (the upper tie rounds up to the even normal)."""
    info = jnp.finfo(dtype)
    half = info.smallest_subnormal.astype(jnp.float32) / 2
    a = jnp.abs(g.astype(jnp.float32))
    return (a > half) & (a < info.smallest_normal.astype(jnp.float32) - half)


def _mantissa_even(w) -> jax.Array:
    bits = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[w.dtype.itemsize]
    return (jax.lax.bitcast_convert_type(w, bits) & 1) == 0


def rounding_gap(w, u) -> jax.Array:
    """|nextafter(w, w + u) - w| in float32: the spacing (ulp) of w's format next to w in u's direction."""
    toward = jnp.where(u >= 0, jnp.inf, -jnp.inf).astype(w.dtype)
    return jnp.abs(jnp.nextafter(w, toward).astype(jnp.float32) - w.astype(jnp.float32))


def update_lost(w, u, gap=None) -> jax.Array:
    """Whether w + u == w in w's dtype (u already in it), from the spacing of the format alone:
    round to nearest loses u when |u| is below half the gap to w's neighbour in u's direction,
    and at exactly half when w is the even neighbour."""
    gap = rounding_gap(w, u) if gap is None else gap
    a = jnp.abs(u.astype(jnp.float32))
    return (a < gap / 2) | ((a == gap / 2) & _mantissa_even(w))


def log2_histogram(x, edges: np.ndarray, where) -> jax.Array:
    """Counts of floor(log2|x|) at each left edge over the entries `where` is True; the first and
    last bins take everything beyond them."""
    safe = jnp.where(where, jnp.abs(x.astype(jnp.float32)), 1.0)
    index = jnp.clip(jnp.floor(jnp.log2(safe)).astype(jnp.int32) - int(edges[0]), 0, len(edges) - 1)
    return jnp.zeros(len(edges), jnp.float32).at[index.ravel()].add(where.ravel().astype(jnp.float32))


def shadow_weights(dtype) -> optax.GradientTransformation:
    """Passes the updates through unchanged; its state is a copy of the parameters kept in `dtype`
    that receives the same updates (cast to `dtype`): the weights training would have, were they
    stored in `dtype` instead of float32. Chain it after the optimizer."""

    def init_fn(params):
        return jax.tree.map(lambda p: p.astype(dtype), params)

    def update_fn(updates, state, params=None):
        del params
        return updates, jax.tree.map(lambda w, u: w + u.astype(dtype), state, updates)

    return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------------------- rounding statistics

GRAD_BINS = np.arange(-60, 17)  # left edges of the log2|g| bins (floor(log2|g|)); the end bins take the rest
HALF_GAP_BINS = np.arange(-16, 17)  # left edges of the log2(|u| / half gap) bins


def _cat(tree) -> jax.Array:
    return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


def gradient_stats(grads, act_grads, dtype=jnp.float16) -> dict:
    """What rounding float32 gradients to `dtype` does: the fractions of weight-gradient ("grad_") and
    activation-gradient dL/dh ("act_grad_") entries that are zero, flush to zero and land subnormal,
    and their log2 histograms over GRAD_BINS (as fractions of all entries)."""
    out = {}
    for name, tree in (("grad", grads), ("act_grad", act_grads)):
        g = _cat(tree)
        finite = jnp.isfinite(g)
        n = g.size
        out[f"{name}_zero"] = jnp.sum(g == 0) / n
        out[f"{name}_flush"] = jnp.sum(flushes_to_zero(g, dtype) & finite) / n
        out[f"{name}_subnormal"] = jnp.sum(lands_subnormal(g, dtype) & finite) / n
        out[f"{name}_hist"] = log2_histogram(g, GRAD_BINS, finite & (g != 0)) / n
    return out


def update_stats(params32, params16, updates) -> dict:
    """What adding `updates` loses on float32 and on float16 weights (w + u == w), measured and in
    closed form (`update_lost`), as sums of |u|; and the histograms of |u| / (gap / 2) over
    HALF_GAP_BINS (u in float32 for both: below 1 an update is lost). Each argument a pytree of
    arrays, the three of one structure."""
    w32, w16, u = _cat(params32), _cat(params16), _cat(updates)
    u16 = u.astype(jnp.float16)
    moved = u != 0
    mass = jnp.abs(u)
    gap32, gap16 = rounding_gap(w32, u), rounding_gap(w16, u16)
    lost32 = moved & (w32 + u == w32)
    lost16 = moved & (w16 + u16 == w16)
    return {
        "update_mass": jnp.sum(mass),
        "lost_mass_fp32": jnp.sum(jnp.where(lost32, mass, 0.0)),
        "lost_mass_fp32_closed": jnp.sum(jnp.where(moved & update_lost(w32, u, gap32), mass, 0.0)),
        "lost_mass_fp16": jnp.sum(jnp.where(lost16, mass, 0.0)),
        "lost_mass_fp16_closed": jnp.sum(jnp.where(moved & update_lost(w16, u16, gap16), mass, 0.0)),
        "param_l1": jnp.sum(jnp.abs(w32)),
        "half_gap_hist_fp16": log2_histogram(2 * mass / gap16, HALF_GAP_BINS, moved),
        "half_gap_hist_fp32": log2_histogram(2 * mass / gap32, HALF_GAP_BINS, moved),
    }


# ----------------------------------------------------------------------------- loss scaling


class LossScaleState(NamedTuple):
    """The loss scale and its bookkeeping (all scalars, so a batch of them vmaps)."""

    scale: jax.Array  # float32: the loss is multiplied by this before differentiation
    good_steps: jax.Array  # int32: consecutive finite steps since the scale last changed
    skipped: jax.Array  # int32: steps so far whose gradients were not finite (skipped, unless told not to)


class LossScalingState(NamedTuple):
    """The state of `loss_scaling`: the scale's and the wrapped optimizer's."""

    loss_scale: LossScaleState
    inner: Any


def init(initial_scale: ArrayLike) -> LossScaleState:
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
    finite: ArrayLike,
    growth_interval: ArrayLike,
    growth_factor: ArrayLike = 2.0,
    backoff_factor: ArrayLike = 0.5,
    min_scale: ArrayLike = 1.0,
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


def replay_dynamic_scale(first: float, nonfinite: np.ndarray, growth_interval: int) -> np.ndarray:
    """The scale before each step, replayed in plain Python (numpy) from which steps were not
    finite: `adjust` with its default factors, for reading a recorded run."""
    scale, good, out = float(first), 0, []
    for bad in nonfinite:
        out.append(scale)
        if bad:
            scale, good = max(scale / 2, 1.0), 0
        else:
            good += 1
            if good == growth_interval:
                scale, good = scale * 2, 0
    return np.asarray(out)


def audit_dynamic_scale(scale: np.ndarray, nonfinite: np.ndarray, growth_interval: int) -> tuple[int, int, int]:
    """Recorded scale trajectories (runs, steps) of dynamic loss scaling with `adjust`'s default factors,
    and which of their steps were not finite: (the number of steps where the scale differs from
    `replay_dynamic_scale` on those steps, the halvings, the doublings), over all runs."""
    replayed = np.stack([replay_dynamic_scale(s[0], b, growth_interval) for s, b in zip(scale, nonfinite)])
    ratio = scale[..., 1:] / scale[..., :-1]
    return int(np.sum(replayed != scale)), int(np.sum(ratio == 0.5)), int(np.sum(ratio == 2.0))


def loss_scaling(
    inner: optax.GradientTransformation,
    initial_scale: ArrayLike = 2.0**15,
    growth_interval: ArrayLike = 2000,
    growth_factor: ArrayLike = 2.0,
    backoff_factor: ArrayLike = 0.5,
    min_scale: ArrayLike = 1.0,
    skip_nonfinite: ArrayLike = True,
) -> optax.GradientTransformation:
    """Wrap `inner` so it takes gradients of the scaled loss.

    update(scaled_grads, state, params) divides the gradients by the current scale (in float32),
    then, if they are all finite, applies `inner` to them; if not (and skip_nonfinite), the step
    is skipped: zero updates, the inner state unchanged (bit for bit). The scale then moves as in
    `adjust`. With growth_factor = backoff_factor = 1 the scale is static; skip_nonfinite=False lets
    a non-finite step through (the float16 reality of a too-large static scale). Numbers may be
    traced (one compiled program for a sweep over them).

    Example:
      >>> tx = loss_scaling(optax.sgd(0.1), initial_scale=1024.0, growth_interval=100)
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: loss(p) * current_scale(state))(params)
      >>> updates, state = tx.update(grads, state, params)

    Raises:
      ValueError: a Python-number argument out of range (checked when built).
    """
    for name, value, ok in (
        ("initial_scale", initial_scale, lambda v: v > 0),
        ("growth_interval", growth_interval, lambda v: v >= 1),
        ("growth_factor", growth_factor, lambda v: v >= 1),
        ("backoff_factor", backoff_factor, lambda v: 0 < v <= 1),
        ("min_scale", min_scale, lambda v: v > 0),
    ):
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


# ----------------------------------------------------------------------------- a mixed-precision chain

LOSS_SCALES = ("none", "static", "dynamic")  # the loss scalings of `scaled_chain`, by index


def scaled_chain(
    inner: optax.GradientTransformation,
    mode: ArrayLike,
    static_scale: ArrayLike,
    initial_scale: ArrayLike,
    growth_interval: ArrayLike,
) -> optax.GradientTransformation:
    """`inner` under the loss scaling LOSS_SCALES[mode], then a float16 `shadow_weights` copy of the
    weights given the same updates. mode is an index and, like the numbers, may be traced: one
    compiled program serves all three.
      none     scale 1, kept; a non-finite step is applied
      static   scale static_scale, kept; a non-finite step is applied
      dynamic  from initial_scale, halved on a non-finite step (skipped), doubled after
               growth_interval finite ones (`adjust`'s default factors)
    `chain_states` reads its state, `step_stats` what one of its steps did."""
    dynamic = mode == LOSS_SCALES.index("dynamic")
    static_or_initial = jnp.where(mode == LOSS_SCALES.index("static"), static_scale, initial_scale)
    first = jnp.where(mode == LOSS_SCALES.index("none"), 1.0, static_or_initial)
    scaled = loss_scaling(
        inner,
        initial_scale=first,
        growth_interval=growth_interval,
        growth_factor=jnp.where(dynamic, 2.0, 1.0),
        backoff_factor=jnp.where(dynamic, 0.5, 1.0),
        skip_nonfinite=dynamic,
    )
    return optax.chain(scaled, shadow_weights(jnp.float16))


def chain_states(opt_state: Any) -> tuple[LossScalingState, Any]:
    """The state of a `scaled_chain`, which optax types only as a pytree: (loss scaling's state, the
    float16 shadow weights)."""
    scaling, weights16 = opt_state
    return scaling, weights16


def step_stats(opt_state: Any, params, grads, act_grads, updates) -> dict:
    """What one step of a `scaled_chain` did, from its state before the step, the float32 master
    weights, the scaled gradients of the loss (weights and activations dL/dh) and the updates it
    returned: scale (the loss scale used), nonfinite (1 if the gradients were not finite),
    `gradient_stats` of the unscaled gradients and `update_stats` against the master and the float16
    shadow weights."""
    scaling, weights16 = chain_states(opt_state)
    grads, finite = unscale(grads, scaling.loss_scale)
    act_grads, _ = unscale(act_grads, scaling.loss_scale)
    return {
        "scale": scaling.loss_scale.scale,
        "nonfinite": (~finite).astype(jnp.float32),
        **gradient_stats(grads, act_grads),
        **update_stats(params, weights16, updates),
    }
