"""gradlab.schedule_forms against values worked out by hand from the formulas (T = 100 steps, peak 1,
decay_rate 0.2, final_lr_fraction 0.1, cycles 3), and its promise to import no jax."""

import subprocess
import sys

import numpy as np
import pytest

from gradlab import schedule_forms

T = 100
OPTIM = dict(lr=1.0, warmup_steps=0, decay_rate=0.2, final_lr_fraction=0.1, cycles=3)
HALF = 0.1 + 0.9 * 0.5  # the cosine halfway: a + (1 - a) (1 + cos(pi/2)) / 2
END = 1 / 25 / 1e4  # onecycle's last value

HAND = {
    "constant": {0: 1.0, 50: 1.0, 99: 1.0},
    # drops at floor(100 i / 4) = 25, 50, 75, each by 0.2
    "step": {24: 1.0, 25: 0.2, 49: 0.2, 50: 0.04, 75: 0.008, 99: 0.008},
    "exponential": {0: 1.0, 50: 0.2**0.5, 100: 0.2},
    # 1 / (1 + 4 t/100), t clipped to 100
    "inverse_time": {0: 1.0, 25: 0.5, 50: 1 / 3, 100: 0.2, 150: 0.2},
    # cos(pi/4) = sqrt(2)/2
    "cosine": {0: 1.0, 25: 0.1 + 0.9 * (2 + 2**0.5) / 4, 50: HALF, 100: 0.1, 150: 0.1},
    "linear": {0: 1.0, 25: 0.775, 50: HALF, 100: 0.1},
    # periods of 33 steps restarting at 0, 33, 66; the last spans 66..100, halfway at 83
    "sgdr": {0: 1.0, 33: 1.0, 66: 1.0, 83: HALF, 100: 0.1},
    # up from 1/25 over 30 steps (halfway at 15: 0.04 + 0.96 / 2), then down to END over 70 (halfway at 65)
    "onecycle": {0: 0.04, 15: 0.52, 30: 1.0, 65: END + (1 - END) / 2, 100: END, 120: END},
    # a 10-step warmup (T // 10), then the cosine over 90 steps (halfway at 55)
    "warmup_cosine": {0: 0.0, 5: 0.5, 10: 1.0, 55: HALF, 100: 0.1},
}


@pytest.mark.parametrize("name", sorted(HAND))
def test_closed_forms_at_hand_computed_steps(name):
    steps, values = zip(*HAND[name].items())
    np.testing.assert_allclose(schedule_forms.closed_form(name, T, OPTIM, steps), values, rtol=1e-14, atol=1e-15)


def test_the_peak_lr_scales_every_value():
    optim = OPTIM | {"lr": 0.5}
    np.testing.assert_allclose(schedule_forms.closed_form("cosine", T, optim, [0, 50]), [0.5, 0.5 * HALF], rtol=1e-14)
    assert schedule_forms.closed_form("constant", 4, optim).tolist() == [0.5] * 4  # default t: 0..steps-1


def test_warmup_is_a_ramp_in_front_of_the_schedule():
    optim = OPTIM | {"warmup_steps": 20}
    got = schedule_forms.closed_form("cosine", T, optim, [0, 10, 20, 60, 100])
    np.testing.assert_allclose(got, [0.0, 0.5, 1.0, HALF, 0.1], rtol=1e-14, atol=1e-15)
    # step: drops at 20 + floor(80 i / 4) = 40, 60, 80
    got = schedule_forms.closed_form("step", T, optim, [39, 40, 60, 80])
    np.testing.assert_allclose(got, [1.0, 0.2, 0.04, 0.008], rtol=1e-14)
    # onecycle: the warmup sets the rise instead (peak at 17)
    got = schedule_forms.closed_form("onecycle", T, OPTIM | {"warmup_steps": 17}, [0, 17])
    np.testing.assert_allclose(got, [0.04, 1.0], rtol=1e-14)


def test_boundaries_and_landmarks():
    assert schedule_forms.boundaries(T, OPTIM) == {
        "step": [25, 50, 75],
        "sgdr": [0, 33, 66],
        "onecycle": 30,
        "warmup_cosine": 10,
    }
    # n = 80: drops at 20 + 20 i, restarts every 26 steps from 20
    warm = schedule_forms.boundaries(T, OPTIM | {"warmup_steps": 20})
    assert warm == {"step": [40, 60, 80], "sgdr": [20, 46, 72], "onecycle": 20, "warmup_cosine": 20}
    assert schedule_forms.landmarks("onecycle", T, OPTIM) == [0, 25, 29, 30, 31, 50, 75, 99]
    assert schedule_forms.landmarks("warmup_cosine", T, OPTIM) == [0, 4, 5, 6, 9, 10, 11, 25, 50, 75, 99]
    assert schedule_forms.landmarks("cosine", T, OPTIM | {"warmup_steps": 20}) == [0, 19, 20, 21, 25, 50, 75, 99]


def test_an_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match="no closed form"):
        schedule_forms.closed_form("triangle", T, OPTIM)


def test_imports_no_jax():
    code = "import sys, gradlab.schedule_forms; sys.exit('jax' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
