"""B4: every schedule equals its closed form, written here from the formulas (not from the code).

The forms tested (peak 1; T total steps, W warmup, n = T - W, r decay_rate, a final_lr_fraction,
c cycles; t counted from the end of warmup):
  step           r**k after k of the drops at floor(n i / (c + 1)), i = 1..c (value changes AT b)
  exponential    r**(t/n)                         optax.exponential_decay(1, n, r)
  inverse_time   1 / (1 + (1/r - 1) t/n)          gradlab's own: reaches r at t = n
  cosine         a + (1 - a) (1 + cos(pi t/n)) / 2, held at a after n
  sgdr           that cosine with period P = n // c, restarting at 1 at t = kP; a after cP
  onecycle       optax.cosine_onecycle_schedule(T, 1): cosine from 1/25 up to 1 over
                 p = int(0.3 T) steps, then down to 1/(25 * 1e4) at T
  warmup_cosine  t/W for t < W (W = warmup_steps or T // 10), then the cosine over T - W
  warmup > 0     t/W in front of the first six
"""

import dataclasses
import math

import numpy as np
import pytest

from gradlab import api, schedule_forms, transforms
from gradlab.config import OptimConfig

T = 100
R, A, C = 0.2, 0.1, 3
ALL = ("constant", "step", "exponential", "inverse_time", "cosine", "sgdr", "onecycle", "warmup_cosine")
STEPS = (0, 1, 5, 9, 10, 11, 24, 25, 29, 30, 31, 33, 34, 50, 66, 67, 75, 89, 90, 91, 99, 100, 120)


def half_cosine(frac):
    """(1 + cos(pi frac)) / 2 for frac clipped to [0, 1]: 1 at the start, 0 at the end."""
    return (1 + math.cos(math.pi * min(max(frac, 0.0), 1.0))) / 2


def expected(schedule, t, total=T, warmup=0, r=R, a=A, c=C):
    if schedule == "onecycle":
        p = warmup if warmup else int(0.3 * total)
        lo, end = 1 / 25, 1 / 25 / 1e4
        if t < p:
            return 1 - (1 - lo) * half_cosine(t / p)
        return end + (1 - end) * half_cosine((t - p) / (total - p))
    if schedule == "warmup_cosine":
        w = warmup or total // 10
        return t / w if t < w else a + (1 - a) * half_cosine((t - w) / (total - w))
    if t < warmup:
        return t / warmup
    s, n = t - warmup, total - warmup
    if schedule == "constant":
        return 1.0
    if schedule == "step":
        passed = sum(1 for i in range(1, c + 1) if s >= math.floor(n * i / (c + 1)))
        return r**passed
    if schedule == "exponential":
        return r ** (s / n)
    if schedule == "inverse_time":
        return 1 / (1 + (1 / r - 1) * min(s, n) / n)
    if schedule == "cosine":
        return a + (1 - a) * half_cosine(s / n)
    if schedule == "sgdr":  # c - 1 periods of n // c steps, then one to the end
        period = n // c
        last = (c - 1) * period
        if s < last:
            return a + (1 - a) * half_cosine((s % period) / period)
        return a + (1 - a) * half_cosine((s - last) / (n - last))
    raise ValueError(schedule)


def shape_of(schedule, warmup=0, total=T):
    cfg = dataclasses.replace(
        OptimConfig(), schedule=schedule, warmup_steps=warmup, decay_rate=R, final_lr_fraction=A, cycles=C
    )
    shape = transforms.schedule_shape(cfg, total)
    return lambda t: float(np.asarray(shape(np.int32(t))))  # the shape at step t, as a Python float


@pytest.mark.parametrize("schedule", ALL)
def test_shape_equals_closed_form(schedule):
    shape = shape_of(schedule)
    got = np.asarray([shape(t) for t in STEPS])
    np.testing.assert_allclose(got, [expected(schedule, t) for t in STEPS], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("schedule", ["constant", "step", "exponential", "inverse_time", "cosine", "sgdr"])
def test_warmup_is_linear_from_zero_then_the_schedule(schedule):
    shape = shape_of(schedule, warmup=20)
    got = np.asarray([shape(t) for t in STEPS])
    np.testing.assert_allclose(got, [expected(schedule, t, warmup=20) for t in STEPS], rtol=1e-5, atol=1e-7)
    assert shape(0) == 0.0
    assert shape(10) == pytest.approx(0.5, rel=1e-6)


def test_step_drops_by_the_rate_at_each_boundary():
    shape = shape_of("step")
    for k, b in enumerate((25, 50, 75), start=1):  # floor(100 i / 4)
        assert shape(b - 1) == pytest.approx(R ** (k - 1), rel=1e-6)
        assert shape(b) == pytest.approx(R**k, rel=1e-6)


def test_sgdr_restarts_to_the_peak_each_period():
    shape = shape_of("sgdr")
    period = T // C  # 33
    ends = [(k + 1) * period - 1 for k in range(C - 1)] + [T - 1]  # the last period takes the remainder
    for k in range(C):
        assert shape(k * period) == pytest.approx(1.0, rel=1e-6)
        # one step before a period's end the cosine is (1 + cos(pi (P-1)/P)) / 2 < 3e-3 for P >= 33
        assert shape(ends[k]) == pytest.approx(A, abs=3e-3)


def test_onecycle_rise_lasts_the_warmup_when_given():
    shape = shape_of("onecycle", warmup=17)
    values = np.asarray([shape(t) for t in range(T)])
    assert int(np.argmax(values)) == 17
    np.testing.assert_allclose(values, [expected("onecycle", t, warmup=17) for t in range(T)], rtol=1e-5, atol=1e-7)


def test_onecycle_peaks_at_30_percent():
    shape = shape_of("onecycle")  # optax's piecewise interpolation takes one count at a time
    values = np.asarray([shape(t) for t in range(T)])
    assert int(np.argmax(values)) == 30
    assert values[30] == pytest.approx(1.0, rel=1e-6)
    assert values[0] == pytest.approx(1 / 25, rel=1e-6)


def test_numpy_closed_forms_agree_with_these():
    optim = dict(lr=0.5, warmup_steps=0, decay_rate=R, final_lr_fraction=A, cycles=C)
    for schedule in ALL:
        got = schedule_forms.closed_form(schedule, T, optim, STEPS)
        np.testing.assert_allclose(got, [0.5 * expected(schedule, t) for t in STEPS], rtol=1e-12, atol=1e-15)


def test_recorded_lr_follows_the_closed_form_end_to_end(tmp_path):
    """The tiny scale: two schedules (each a compiled group, ~5-10 s on 2 shared CPU cores), 20 steps at
    lr 0.05 with these R, A, C; the rest are covered above."""
    outcome = api.execute("schedules", [], "tiny", out=tmp_path, progress=False, draw=False)
    ds = outcome.dataset
    assert int(ds["diverged"].sum()) == 0
    lr = 0.05
    for schedule in ("sgdr", "onecycle"):
        want = [lr * expected(schedule, t, total=20) for t in range(20)]
        for var in ("lr", "lr_applied"):
            got = ds[var].sel({"optim.schedule": schedule}).transpose("seed", "step").values
            np.testing.assert_allclose(got, np.broadcast_to(want, got.shape), rtol=1e-5, atol=1e-8)
    assert len(outcome.checks) == 2 + 2 + 1  # closed forms, sgdr restarts, onecycle peak, applied lr
    assert len(api.plot(ds).axes) >= 2 + 1
