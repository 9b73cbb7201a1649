"""C3 mixed_precision: float formats from their bit layout, float16 rounding predicates against
actual casts and adds, and a tiny run (float32 and float16, every loss scaling) against theory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import api, loss_scaling
from gradlab.errors import ConfigError
from gradlab.experiments import mixed_precision as mp

TINY = ["model.width=16", "model.depth=4", "data.examples=64", "data.input_dim=8", "steps=150", "chunk_steps=150",
        "seeds=2", "model.dtype=[float32, float16]", "growth_interval=20", "initial_scale=1099511627776.0"]


# ----------------------------------------------------------------------------- number formats


@pytest.mark.parametrize("dtype,exponent_bits,mantissa_bits", [(jnp.float16, 5, 10), (jnp.bfloat16, 8, 7),
                                                               (jnp.float32, 8, 23)])
def test_finfo_matches_the_format_built_from_its_bits(dtype, exponent_bits, mantissa_bits):
    assert mp.representable_range(dtype) == mp.format_range(exponent_bits, mantissa_bits)


def test_float16_limits():
    """The catalog's numbers: min subnormal 2^-24, min normal 2^-14, max 65504 (IEEE binary16)."""
    r = mp.representable_range(jnp.float16)
    assert (r.smallest_subnormal, r.smallest_normal, r.max) == (2.0**-24, 2.0**-14, 65504.0)
    assert all(c.passed for c in mp.float16_checks())


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
    np.testing.assert_array_equal(np.asarray(mp.flushes_to_zero(g)), (cast == 0) & (g_np != 0))
    np.testing.assert_array_equal(np.asarray(mp.lands_subnormal(g)), (cast > 0) & (cast < 2.0**-14))
    assert 0.2 < float(np.mean(np.asarray(mp.flushes_to_zero(g)))) < 0.3  # 2^-30..2^-25 of 2^-30..2^-10: 5/20


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
    predicted = np.asarray(mp.update_lost(w, u))
    np.testing.assert_array_equal(predicted, actual)
    assert 0.2 < actual.mean() < 0.8  # both outcomes are well represented


def test_log2_histogram_matches_numpy():
    rng = np.random.default_rng(2)
    x = np.exp2(rng.uniform(-70, 20, 5000)) * rng.choice([-1, 1], 5000)
    x[:50] = 0.0
    where = x != 0
    got = np.asarray(mp.log2_histogram(jnp.asarray(x, jnp.float32), mp.HIST_BINS, jnp.asarray(where)))
    exps = np.clip(np.floor(np.log2(np.abs(np.asarray(x[where], np.float32)))), mp.HIST_BINS[0], mp.HIST_BINS[-1])
    expected = np.array([np.sum(exps == e) for e in mp.HIST_BINS])
    np.testing.assert_array_equal(got, expected)


def test_the_checks_replay_agrees_with_loss_scaling():
    rng = np.random.default_rng(3)
    bad = rng.random(200) < 0.1
    state, path = loss_scaling.init(2.0**20), []
    adjust = jax.jit(loss_scaling.adjust)
    for b in bad:
        path.append(float(state.scale))
        state = adjust(state, jnp.bool_(not b), 7)
    np.testing.assert_array_equal(mp.replay_dynamic_scale(2.0**20, bad, 7), path)


@pytest.mark.parametrize("override,allowed", [("loss_scale=auto", "none, static, dynamic"),
                                              ("growth_interval=0", ">= 1"), ("static_scale=0.5", ">= 1.0"),
                                              ("loss_weight=0", "> 0.0")])
def test_config_errors_name_the_key_and_what_is_allowed(override, allowed):
    with pytest.raises(ConfigError, match=override.split("=")[0]) as info:
        api.resolve("mixed_precision", [override])
    assert allowed in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- a tiny run


EXPERIMENT = "mixed_precision"  # the conftest fixture `tiny` runs it at TINY


def lane(ds, dtype, mode, name):
    return ds[name].sel({"model.dtype": dtype, "loss_scale": mode}).transpose("seed", "step").values


def test_one_compile_per_dtype_and_the_figure(tiny):
    outcome, out = tiny
    assert outcome.dataset.attrs["static_groups"] == 2  # loss scaling, scales and seeds are vmapped
    assert (out / "figures" / "mixed_precision.png").exists()
    assert all(c.passed for c in outcome.checks if "jnp.finfo" in c.name or "dynamic scale" in c.name), outcome.checks


def test_float32_is_unchanged_by_power_of_two_loss_scales(tiny):
    """Multiplying the loss by 2^k and the gradients by 2^-k is exact in float32 (nothing here comes
    near its range ends), so every float32 lane takes the same steps bit for bit."""
    ds = tiny[0].dataset
    none = lane(ds, "float32", "none", "loss")
    np.testing.assert_array_equal(lane(ds, "float32", "static", "loss"), none)
    np.testing.assert_array_equal(lane(ds, "float32", "dynamic", "loss"), none)


def test_dynamic_scale_trajectory_follows_the_rule(tiny):
    """Starting at 2^40 the first steps overflow float16: each halves the scale and moves no weight;
    after growth_interval = 20 finite steps the scale doubles."""
    ds = tiny[0].dataset
    scale = lane(ds, "float16", "dynamic", "scale").astype(float)
    bad = lane(ds, "float16", "dynamic", "nonfinite") > 0
    mass = lane(ds, "float16", "dynamic", "update_mass")
    for s, b in zip(scale, bad):
        expected, good = [2.0**40], 0
        for overflow in b[:-1]:
            good = 0 if overflow else good + 1
            expected.append(expected[-1] / 2 if overflow else expected[-1] * 2 if good == 20 else expected[-1])
            good = 0 if good == 20 else good
        np.testing.assert_array_equal(s, expected)
        assert b[0] and b.sum() >= 1
    assert np.all(mass[bad] == 0) and np.all(mass[~bad] > 0)
    assert np.any(scale[:, 1:] == 2 * scale[:, :-1])


def test_unscaled_float16_loses_gradients_that_scaled_float16_keeps(tiny):
    ds = tiny[0].dataset
    zero_none = lane(ds, "float16", "none", "grad_zero")[:, -50:].mean()
    zero_static = lane(ds, "float16", "static", "grad_zero")[:, -50:].mean()
    zero_fp32 = lane(ds, "float32", "none", "grad_zero")[:, -50:].mean()
    assert zero_none >= zero_static + mp.MEASURABLE and zero_none >= zero_fp32 + mp.MEASURABLE


def test_fp16_weights_lose_updates_that_master_weights_keep(tiny):
    """The measured lost mass equals the closed form entry for entry (same sums); the master weights
    lose at most 2^-24 sum|w| a step (|u| <= gap/2 <= 2^-24 |w|)."""
    ds = tiny[0].dataset
    for mode in ("none", "static", "dynamic"):
        for precision in ("fp16", "fp32"):
            np.testing.assert_array_equal(lane(ds, "float16", mode, f"lost_mass_{precision}"),
                                          lane(ds, "float16", mode, f"lost_mass_{precision}_closed"))
    lost16 = lane(ds, "float16", "dynamic", "lost_mass_fp16")[:, -50:].sum()
    lost32 = lane(ds, "float16", "dynamic", "lost_mass_fp32")
    mass = lane(ds, "float16", "dynamic", "update_mass")[:, -50:].sum()
    assert lost16 / mass >= mp.MEASURABLE
    assert np.all(lost32 <= 2.0**-24 * lane(ds, "float16", "dynamic", "param_l1"))


@pytest.mark.slow
def test_quick_scale_passes_every_check(tmp_path):
    outcome = api.execute("mixed_precision", [], "quick", out=tmp_path, progress=False, draw=False)
    assert len(outcome.checks) == 13 and all(c.passed for c in outcome.checks), outcome.checks
