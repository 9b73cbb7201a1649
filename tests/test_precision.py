"""gradlab.precision: float formats from their bit layout, float16 rounding predicates against actual
casts and adds; loss scaling against a plain-Python state machine, inside jit and vmap; skipped steps
leave parameters and optimizer state bit-identical; float16 underflow recovered by the scale."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradlab import precision

# ----------------------------------------------------------------------------- number formats


@pytest.mark.parametrize(
    "dtype,exponent_bits,mantissa_bits", [(jnp.float16, 5, 10), (jnp.bfloat16, 8, 7), (jnp.float32, 8, 23)]
)
def test_finfo_matches_the_format_built_from_its_bits(dtype, exponent_bits, mantissa_bits):
    assert precision.representable_range(dtype) == precision.format_range(exponent_bits, mantissa_bits)


def test_float16_limits():
    """The catalog's numbers: min subnormal 2^-24, min normal 2^-14, max 65504 (IEEE binary16)."""
    r = precision.representable_range(jnp.float16)
    assert (r.smallest_subnormal, r.smallest_normal, r.max) == (2.0**-24, 2.0**-14, 65504.0)


def log_uniform_with_ties(rng, n=20000):
    """|g| log-uniform over 2^-30..2^-10 with random signs, plus the exact rounding ties of float16."""
    g = np.exp2(rng.uniform(-30, -10, n)) * rng.choice([-1, 1], n)
    sub = 2.0**-24
    ties = [sub / 2, -sub / 2, 2.0**-14 - sub / 2, 1.5 * sub, 2.0**-14, 2.0**-14 - sub, 0.0]
    return jnp.asarray(np.concatenate([g, ties]), jnp.float32)


def test_flush_and_subnormal_predicates_match_an_actual_cast_to_float16():
    g = log_uniform_with_ties(np.random.default_rng(0))
    cast = np.abs(np.asarray(g.astype(jnp.float16), np.float32))
    g_np = np.asarray(g)
    np.testing.assert_array_equal(np.asarray(precision.flushes_to_zero(g)), (cast == 0) & (g_np != 0))
    np.testing.assert_array_equal(np.asarray(precision.lands_subnormal(g)), (cast > 0) & (cast < 2.0**-14))
    assert 0.2 < float(np.mean(np.asarray(precision.flushes_to_zero(g)))) < 0.3  # 2^-30..2^-25 of 2^-30..2^-10: 5/20


@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float32])
def test_update_lost_matches_an_actual_add(dtype):
    """Random weights and updates from 2^-6 to 2^6 half gaps, exact ties, weights at powers of two (whose
    gap below is half the gap above) and zero weights."""
    rng = np.random.default_rng(1)
    n = 20000
    w = jnp.asarray(rng.normal(size=n) * np.exp2(rng.uniform(-8, 2, n)), dtype)
    w = w.at[:200].set(jnp.asarray(np.exp2(rng.integers(-8, 3, 200)) * rng.choice([-1, 1], 200), dtype))
    w = w.at[200:260].set(0)
    ulp = jnp.abs(jnp.nextafter(w, jnp.asarray(jnp.inf, dtype)).astype(jnp.float32) - w.astype(jnp.float32))
    ratio = np.exp2(rng.uniform(-6, 6, n))
    ratio[260:1260] = 1.0  # |u| = half the gap above: a tie
    u = (jnp.asarray(ratio * rng.choice([-1, 1], n), jnp.float32) * ulp / 2).astype(dtype)
    actual = np.asarray(w + u == w)
    predicted = np.asarray(precision.update_lost(w, u))
    np.testing.assert_array_equal(predicted, actual)
    assert 0.2 < actual.mean() < 0.8  # both outcomes are well represented


def test_log2_histogram_matches_numpy():
    rng = np.random.default_rng(2)
    x = np.exp2(rng.uniform(-70, 20, 5000)) * rng.choice([-1, 1], 5000)
    x[:50] = 0.0
    where = x != 0
    got = np.asarray(precision.log2_histogram(jnp.asarray(x, jnp.float32), precision.GRAD_BINS, jnp.asarray(where)))
    exps = np.clip(
        np.floor(np.log2(np.abs(np.asarray(x[where], np.float32)))), precision.GRAD_BINS[0], precision.GRAD_BINS[-1]
    )
    expected = np.array([np.sum(exps == e) for e in precision.GRAD_BINS])
    np.testing.assert_array_equal(got, expected)


def test_the_numpy_replay_agrees_with_adjust():
    rng = np.random.default_rng(3)
    bad = rng.random(200) < 0.1
    state, path = precision.init(2.0**20), []
    adjust = jax.jit(precision.adjust)
    for b in bad:
        path.append(float(state.scale))
        state = adjust(state, jnp.bool_(not b), 7)
    np.testing.assert_array_equal(precision.replay_dynamic_scale(2.0**20, bad, 7), path)


def test_shadow_weights_pass_updates_through_and_keep_a_float16_copy():
    """The chain's updates are untouched; its state is the float16 weights given the same updates
    (each cast to float16 and added in float16), so an update below half a float16 gap is lost there."""
    params = {"w": jnp.array([1.0, 1.0, -2.0]), "b": jnp.array(0.5)}
    tx = optax.chain(optax.sgd(1.0), precision.shadow_weights(jnp.float16))
    state = tx.init(params)
    grads = {"w": jnp.array([2.0**-12, 2.0**-10, 0.25]), "b": jnp.array(-1.0)}
    updates, state = tx.update(grads, state, params)
    chex.assert_trees_all_equal(updates, jax.tree.map(lambda g: -g, grads))
    shadow = state[1]
    assert shadow["w"].dtype == jnp.float16
    # 1 - 2^-12 rounds back to 1 in float16 (gap below 1 is 2^-11); 1 - 2^-10 is exact.
    np.testing.assert_array_equal(np.asarray(shadow["w"], np.float32), [1.0, 1.0 - 2.0**-10, -2.25])
    assert float(shadow["b"]) == 1.5


# ----------------------------------------------------------------------------- loss scaling


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
        state = precision.adjust(state, finite, interval)
        return state, state

    _, path = jax.lax.scan(body, precision.init(first), finite_seq)
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
    state = precision.init(1024.0)
    ref = ReferenceScale(1024.0, 3)
    adjust = jax.jit(precision.adjust)
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
    tx = precision.loss_scaling(inner, initial_scale=2.0**12, growth_interval=2)
    params, ref_params = quadratic_params(), quadratic_params()
    state, ref_state = tx.init(params), inner.init(ref_params)
    update, ref_update = jax.jit(tx.update), jax.jit(inner.update)
    rng = np.random.default_rng(1)
    for finite in [True, False, True, True, False, True]:
        grads = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape), jnp.float32), params)
        scaled = jax.tree.map(lambda g: g * precision.current_scale(state), grads)
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
    tx = precision.loss_scaling(
        optax.sgd(0.1),
        initial_scale=8.0,
        growth_interval=1,
        growth_factor=1.0,
        backoff_factor=1.0,
        skip_nonfinite=False,
    )
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
    state = precision.init(2.0**20)
    grads, finite = precision.unscale(jax.grad(lambda w: precision.scale_loss(loss(w), state))(w), state)
    assert bool(finite)
    np.testing.assert_allclose(np.asarray(grads), k * np.asarray(x), rtol=2.0**-11)


def test_one_compile_for_any_scale_and_interval():
    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(first, interval, grads):
        tx = precision.loss_scaling(optax.sgd(0.1), initial_scale=first, growth_interval=interval)
        state = tx.init(grads)
        return tx.update(grads, state, grads)

    step(jnp.float32(2.0**10), jnp.int32(3), {"w": jnp.ones(2)})
    step(jnp.float32(2.0**4), jnp.int32(7), {"w": jnp.ones(2)})


@pytest.mark.parametrize(
    "name,value",
    [
        ("initial_scale", 0.0),
        ("growth_interval", 0),
        ("growth_factor", 0.5),
        ("backoff_factor", 1.5),
        ("min_scale", -1.0),
    ],
)
def test_bad_arguments_are_refused_when_built_naming_the_value(name, value):
    with pytest.raises(ValueError, match=f"{name}={value}"):
        precision.loss_scaling(optax.sgd(0.1), **{name: value})


# ----------------------------------------------------------------------------- the mixed-precision chain


def test_audit_dynamic_scale_counts_against_a_hand_written_trajectory():
    """growth_interval 2 from 8, steps 0 and 5 not finite: 8 (halve) 4, 4 (double) 8, 8 (double) 16
    (halve) 8. Two runs: the second with one entry off the rule."""
    bad = np.array([True, False, False, False, False, True, False])
    good = np.array([8.0, 4.0, 4.0, 8.0, 8.0, 16.0, 8.0])
    assert precision.audit_dynamic_scale(good[None], bad[None], 2) == (0, 2, 2)
    wrong = good.copy()
    wrong[3] = 4.0  # no doubling after step 2: 8 4 4 4 8 16 8, still two halvings and two doublings
    assert precision.audit_dynamic_scale(np.stack([good, wrong]), np.stack([bad, bad]), 2) == (1, 4, 4)


def run_scaled_chain(mode: int, finite: list[bool]):
    """SGD at lr 1/2 under scaled_chain(mode, static 8, initial 64, interval 2) on w = (1, -2), fed the
    gradients (2^-4, 2^-3) times the current scale (the first entry inf on a non-finite step): the scale
    before each step, the weights after each, and the float16 shadow at the end."""
    params = jnp.asarray([1.0, -2.0], jnp.float32)
    tx = precision.scaled_chain(optax.sgd(0.5), jnp.int32(mode), 8.0, 64.0, 2)
    state, scales, path = tx.init(params), [], []
    for ok in finite:
        scale = precision.chain_states(state)[0].loss_scale.scale
        grads = jnp.asarray([2.0**-4 if ok else np.inf, 2.0**-3], jnp.float32) * scale
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        scales.append(float(scale))
        path.append(np.asarray(params))
    return scales, np.stack(path), precision.chain_states(state)[1]


def test_scaled_chain_modes_none_static_and_dynamic():
    finite = [True, False, True, True, True]
    scales, path, shadow = run_scaled_chain(precision.LOSS_SCALES.index("dynamic"), finite)
    assert scales == [64.0, 64.0, 32.0, 32.0, 64.0]  # halved after the overflow, doubled after 2 finite steps
    steps = np.cumsum([1, 0, 1, 1, 1])[:, None] * np.array([2.0**-5, 2.0**-4])  # lr x g, the overflow skipped
    np.testing.assert_array_equal(path, np.array([1.0, -2.0]) - steps)
    assert shadow.dtype == jnp.float16
    np.testing.assert_array_equal(np.asarray(shadow, np.float32), path[-1])  # exact in float16 too
    for mode, scale in (("none", 1.0), ("static", 8.0)):
        scales, path, _ = run_scaled_chain(precision.LOSS_SCALES.index(mode), finite)
        assert scales == [scale] * 5  # kept through the overflow, which is applied: the weight is gone
        assert np.isnan(path[-1, 0]) or np.isinf(path[-1, 0])


def test_step_stats_reads_the_unscaled_gradients_and_the_scale_used():
    """At scale 2^10 the scaled gradient 2^10 (2^-26, 1) unscales to (2^-26, 1): half its entries flush
    to zero in float16; an inf entry makes the step non-finite."""
    params = {"w": jnp.asarray([1.0, -2.0], jnp.float32)}
    tx = precision.scaled_chain(optax.sgd(1.0), jnp.int32(1), 2.0**10, 1.0, 1)
    state = tx.init(params)
    grads = {"w": jnp.asarray([2.0**-26, 1.0], jnp.float32) * 2.0**10}
    act_grads = {"h": jnp.asarray([0.0, 2.0**-20, 1.0, 1.0], jnp.float32) * 2.0**10}
    updates = {"w": jnp.asarray([-(2.0**-12), -1.0], jnp.float32)}  # 1 - 2^-12 rounds to 1 in float16 only
    stats = precision.step_stats(state, params, grads, act_grads, updates)
    assert float(stats["scale"]) == 2.0**10 and float(stats["nonfinite"]) == 0.0
    assert float(stats["grad_flush"]) == 0.5 and float(stats["grad_zero"]) == 0.0
    assert float(stats["act_grad_zero"]) == 0.25 and float(stats["act_grad_subnormal"]) == 0.25  # 2^-20 < 2^-14
    assert float(stats["update_mass"]) == 1.0 + 2.0**-12
    assert float(stats["lost_mass_fp16"]) == 2.0**-12 and float(stats["lost_mass_fp32"]) == 0.0
    bad = {"w": grads["w"].at[0].set(jnp.inf)}
    assert float(precision.step_stats(state, params, bad, act_grads, updates)["nonfinite"]) == 1.0
