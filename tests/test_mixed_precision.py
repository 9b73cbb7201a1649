"""C3 mixed_precision: its config errors, and its tiny scale (float32 and float16, every loss scaling)
against theory. The float formats and loss scaling it rests on are tested in test_precision.py."""

import numpy as np
import pytest

from gradlab import api
from gradlab.errors import ConfigError
from gradlab.experiments import mixed_precision as mp


@pytest.mark.parametrize(
    "override,allowed",
    [
        ("loss_scale=auto", "none, static, dynamic"),
        ("growth_interval=0", ">= 1"),
        ("static_scale=0.5", ">= 1.0"),
        ("loss_weight=0", "> 0.0"),
        ("telemetry=layers", "must be loss"),
    ],
)
def test_config_errors_name_the_key_and_what_is_allowed(override, allowed):
    with pytest.raises(ConfigError, match=override.split("=")[0]) as info:
        api.resolve("mixed_precision", [override])
    assert allowed in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- a tiny run


@pytest.fixture(scope="module")
def tiny(tiny_scale):
    """The `tiny` scale: width 16, depth 4, 400 steps, 3 seeds, float32 and float16, growth_interval 20 from 2^40."""
    return tiny_scale("mixed_precision")


def lane(ds, dtype, mode, name):
    return ds[name].sel({"model.dtype": dtype, "loss_scale": mode}).transpose("seed", "step").values


def test_one_compile_per_dtype(tiny):
    assert tiny[0].dataset.attrs["static_groups"] == 2  # loss scaling, scales and seeds are vmapped


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
            np.testing.assert_array_equal(
                lane(ds, "float16", mode, f"lost_mass_{precision}"),
                lane(ds, "float16", mode, f"lost_mass_{precision}_closed"),
            )
    lost16 = lane(ds, "float16", "dynamic", "lost_mass_fp16")[:, -50:].sum()
    lost32 = lane(ds, "float16", "dynamic", "lost_mass_fp32")
    mass = lane(ds, "float16", "dynamic", "update_mass")[:, -50:].sum()
    assert lost16 / mass >= mp.MEASURABLE
    assert np.all(lost32 <= 2.0**-24 * lane(ds, "float16", "dynamic", "param_l1"))


@pytest.mark.slow
def test_quick_scale_passes_every_check(tmp_path):
    outcome = api.execute("mixed_precision", [], "quick", out=tmp_path, progress=False, draw=False)
    assert len(outcome.checks) == 13 and all(c.passed for c in outcome.checks), outcome.checks
