"""Check constructors: the bound compared is the bound printed, and NaN never passes."""

import math

import pytest

from gradlab.check import Check


@pytest.mark.parametrize(
    "make, value, bound, passed, text",
    [
        (Check.at_most, 1.0, 1.0, True, "<= 1"),
        (Check.at_most, 1.0000001, 1.0, False, "<= 1"),
        (Check.at_least, 2.0, 2.0, True, ">= 2"),
        (Check.below, 2.0, 2.0, False, "< 2"),
        (Check.above, 2.5, 2.0, True, "> 2"),
    ],
)
def test_one_sided_bounds(make, value, bound, passed, text):
    check = make("x", value, bound)
    assert check.passed is passed and check.expected == text and check.measured == value


def test_the_why_is_printed_with_the_bound_once():
    check = Check.at_most("ratio", 3e-5, 10 * 0.25**9, "10 x 0.25^9")
    assert check.expected == "<= 10 x 0.25^9 = 3.815e-05" and check.passed


def test_near_and_between():
    assert Check.near("s", -0.464, -0.447, 0.027, "mean field").passed
    assert not Check.near("s", -0.40, -0.447, 0.027).passed
    assert Check.near("s", -0.464, -0.447, 0.027, "mean field").expected == "mean field -0.447 +- 0.027"
    assert Check.between("r", 0.5, 0.0, 1.0).passed and not Check.between("r", 1.5, 0.0, 1.0).passed


@pytest.mark.parametrize("make", [Check.at_most, Check.at_least, Check.below, Check.above])
def test_nan_never_passes(make):
    assert not make("x", math.nan, 1.0).passed
    assert not Check.near("x", math.nan, 0.0, 1.0).passed
    assert not Check.between("x", math.nan, 0.0, 1.0).passed
