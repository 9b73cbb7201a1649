"""gradlab.loss_scaling against a plain-Python state machine, inside jit and vmap; skipped steps
leave parameters and optimizer state bit-identical; float16 underflow recovered by the scale."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradlab import loss_scaling


class ReferenceScale:
    """Dynamic loss scaling as the paper states it, written as a plain object."""

    def __init__(self, scale, growth_interval, min_scale=1.0):
        self.scale, self.good, self.skipped = float(scale), 0, 0
        self.interval, self.min_scale = growth_interval, min_scale

    def step(self, finite: bool):
        if not finite:
            self.scale = max(self.scale * 0.5, self.min_scale)
            self.good = 0
            self.skipped += 1
            return
        self.good += 1
        if self.good == self.interval:
            self.scale *= 2.0
            self.good = 0


def run_adjust(first, finite_seq, interval):
    """The scale machine over a whole sequence under one jit (lax.scan): (scale, good, skipped) per step."""

    def body(state, finite):
        state = loss_scaling.adjust(state, finite, interval)
        return state, state

    _, path = jax.lax.scan(body, loss_scaling.init(first), finite_seq)
    return path


run_adjust_jit = jax.jit(run_adjust)


def reference_path(first, finite_seq, interval):
    ref, out = ReferenceScale(first, interval), []
    for finite in finite_seq:
        ref.step(bool(finite))
        out.append((ref.scale, ref.good, ref.skipped))
    return np.asarray(out)


SCRIPT = [True, True, True, False, True, True, False, False, True, True, True, True, True, True, True, False]


def test_scripted_sequence_step_by_step():
    """Interval 3 from 2^10: three finite steps double, each overflow halves and resets the count."""
    state = loss_scaling.init(1024.0)
    ref = ReferenceScale(1024.0, 3)
    adjust = jax.jit(loss_scaling.adjust)
    for finite in SCRIPT:
        state = adjust(state, jnp.bool_(finite), 3)
        ref.step(finite)
        assert float(state.scale) == ref.scale and int(state.good_steps) == ref.good
        assert int(state.skipped) == ref.skipped
    # By hand: 3 finite -> 2048; overflow -> 1024; 2 finite; 2 overflows -> 256; 7 finite -> 1024 (+1); overflow.
    assert ref.scale == 512.0 and ref.skipped == 4


@settings(max_examples=40, deadline=None)
@given(
    finite=st.lists(st.booleans(), min_size=24, max_size=24),
    interval=st.integers(1, 6),
    log2_first=st.integers(0, 30),
)
def test_random_sequences_match_the_reference_under_jit(finite, interval, log2_first):
    """Fixed length and traced arguments: every example runs the same compiled program."""
    path = run_adjust_jit(jnp.float32(2.0**log2_first), jnp.asarray(finite), jnp.int32(interval))
    got = np.stack([np.asarray(path.scale, float), np.asarray(path.good_steps), np.asarray(path.skipped)], axis=1)
    np.testing.assert_array_equal(got, reference_path(2.0**log2_first, finite, interval))


def test_vmap_lanes_each_equal_their_own_reference():
    rng = np.random.default_rng(0)
    finite = rng.random((5, 40)) < 0.8
    intervals = np.array([1, 2, 3, 5, 8], np.int32)
    firsts = np.array([1.0, 2.0**8, 2.0**15, 2.0**20, 4.0], np.float32)
    path = jax.jit(jax.vmap(run_adjust))(firsts, finite, intervals)
    for lane in range(5):
        ref = reference_path(firsts[lane], finite[lane], intervals[lane])
        np.testing.assert_array_equal(np.asarray(path.scale[lane], float), ref[:, 0])
        np.testing.assert_array_equal(np.asarray(path.skipped[lane]), ref[:, 2])


def test_scale_never_drops_below_min_scale():
    path = run_adjust_jit(jnp.float32(4.0), jnp.zeros(6, bool), jnp.int32(3))
    np.testing.assert_array_equal(np.asarray(path.scale), [2.0, 1.0, 1.0, 1.0, 1.0, 1.0])


def quadratic_params():
    return {"w": jnp.array([1.0, -2.0, 0.5]), "b": jnp.array(0.25)}


RTOL = 1e-6  # a few float32 ulps (2^-23 each) from a different fusion or FMA contraction per step


def test_wrapper_skips_nonfinite_steps_bit_identically_and_matches_inner_on_finite_ones():
    """Adam with momentum state: a skipped step changes neither its state nor the params (bit for bit),
    and a finite step equals Adam on the unscaled gradient (power-of-2 scales divide exactly; the two
    programs may still fuse Adam's arithmetic differently: RTOL)."""
    inner = optax.adam(0.1)
    tx = loss_scaling.loss_scaling(inner, initial_scale=2.0**12, growth_interval=2)
    params, ref_params = quadratic_params(), quadratic_params()
    state, ref_state = tx.init(params), inner.init(ref_params)
    update, ref_update = jax.jit(tx.update), jax.jit(inner.update)
    rng = np.random.default_rng(1)
    for i, finite in enumerate([True, False, True, True, False, True]):
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        scaled = jax.tree.map(lambda g: g * loss_scaling.current_scale(state), grads)
        if not finite:
            scaled = {**scaled, "w": scaled["w"].at[1].set(jnp.inf)}
        before = (params, state.inner)
        updates, state = update(scaled, state, params)
        params = optax.apply_updates(params, updates)
        if finite:
            ref_updates, ref_state = ref_update(grads, ref_state, ref_params)
            ref_params = optax.apply_updates(ref_params, ref_updates)
            chex.assert_trees_all_close(updates, ref_updates, rtol=RTOL)
        else:
            chex.assert_trees_all_equal(updates, jax.tree.map(jnp.zeros_like, updates))
            chex.assert_trees_all_equal((params, state.inner), before)
        chex.assert_trees_all_close(params, ref_params, rtol=RTOL)
        chex.assert_trees_all_close(state.inner, ref_state, rtol=RTOL)
    # 2^12: finite, (overflow) 2^11, finite, finite -> 2^12, (overflow) 2^11, finite.
    assert float(state.loss_scale.scale) == 2.0**11 and int(state.loss_scale.skipped) == 2


def test_static_scale_lets_an_overflow_through_when_told_not_to_skip():
    tx = loss_scaling.loss_scaling(optax.sgd(0.1), initial_scale=8.0, growth_interval=1, growth_factor=1.0,
                                   backoff_factor=1.0, skip_nonfinite=False)
    params = quadratic_params()
    state = tx.init(params)
    grads = {"w": jnp.array([8.0, jnp.inf, 0.0]), "b": jnp.array(8.0)}
    updates, state = tx.update(grads, state, params)
    assert not np.isfinite(np.asarray(updates["w"][1])) and float(updates["b"]) == np.float32(-0.1)  # -lr x 8 / 8
    updates, state = tx.update({"w": jnp.ones(3), "b": jnp.array(1.0)}, state, params)
    assert float(state.loss_scale.scale) == 8.0  # static: neither halves nor grows
    np.testing.assert_allclose(np.asarray(updates["w"]), -0.1 / 8)


def test_loss_scaling_recovers_a_float16_gradient_that_underflows_without_it():
    """loss = k sum(w x) with the product in float16 and k = 2^-30: the cotangent k reaching the
    float16 product is below 2^-25 and flushes to zero; scaled by 2^20 it is 2^-10, exact, and the
    unscaled float32 gradient is k x up to float16's rounding of x (relative 2^-11)."""
    k = 2.0**-30
    x = jnp.array([0.3, -1.7, 2.5], jnp.float32)
    w = jnp.ones(3, jnp.float32)

    def loss(w):
        return k * jnp.sum((w.astype(jnp.float16) * x.astype(jnp.float16)).astype(jnp.float32))

    assert float(jnp.max(jnp.abs(jax.grad(loss)(w)))) == 0.0
    state = loss_scaling.init(2.0**20)
    grads, finite = loss_scaling.unscale(jax.grad(lambda w: loss_scaling.scale_loss(loss(w), state))(w), state)
    assert bool(finite)
    np.testing.assert_allclose(np.asarray(grads), k * np.asarray(x), rtol=2.0**-11)


def test_one_compile_for_any_scale_and_interval():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(first, interval, grads):
        tx = loss_scaling.loss_scaling(optax.sgd(0.1), initial_scale=first, growth_interval=interval)
        state = tx.init(grads)
        return tx.update(grads, state, grads)

    step(jnp.float32(2.0**10), jnp.int32(3), {"w": jnp.ones(2)})
    step(jnp.float32(2.0**4), jnp.int32(7), {"w": jnp.ones(2)})


@pytest.mark.parametrize("name,value", [("initial_scale", 0.0), ("growth_interval", 0), ("growth_factor", 0.5),
                                        ("backoff_factor", 1.5), ("min_scale", -1.0)])
def test_bad_arguments_are_refused_when_built_naming_the_value(name, value):
    with pytest.raises(ValueError, match=f"{name}={value}"):
        loss_scaling.loss_scaling(optax.sgd(0.1), **{name: value})
