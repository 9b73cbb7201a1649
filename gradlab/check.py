"""Checks: one measured number against what theory allows, each bound stated once.

An experiment's `checks(measured)` returns a list of these, built with the constructors below, so
the bound a check compares with and the bound it prints are the same number:

    Check.at_most("plain sigmoid |g_1|/|g_10|", m.sigmoid_ratio, 10 * 0.25**9, "10 x 0.25^9")

Imports neither jax nor numpy: checks are plain floats.
"""

from __future__ import annotations

from dataclasses import dataclass


def number(x: float) -> str:
    """A bound as the check tables print it (4 significant digits)."""
    return f"{x:.4g}"


def _expected(relation: str, bound: float, why: str) -> str:
    return f"{relation} {why} = {number(bound)}" if why else f"{relation} {number(bound)}"


@dataclass(frozen=True)
class Check:
    """One quantitative check: what was measured against what theory allows.

    Attributes:
      name: what is measured, as the check table shows it (unique within an experiment).
      measured: the measured number.
      expected: the bound in words, e.g. "<= 10 x 0.25^9 = 3.815e-05".
      passed: whether the measured number meets the bound (NaN never does); a skipped check passes.
      skipped: the sweep, narrowed by the user, lacks what the check reads; `expected` says what.
    """

    name: str
    measured: float
    expected: str
    passed: bool
    skipped: bool = False

    @property
    def result(self) -> str:
        """What a check table prints: pass, FAIL, skipped, or "no healthy point" for a NaN
        measurement (every point the check reads diverged, so there is nothing to compare)."""
        if self.skipped:
            return "skipped"
        if self.passed:
            return "pass"
        return "FAIL: no healthy point" if self.measured != self.measured else "FAIL"

    @classmethod
    def skip(cls, name: str, needs: str) -> Check:
        """A check this sweep cannot compute: `needs` says what the sweep must hold for it."""
        return cls(name, float("nan"), f"skipped: needs {needs}", True, skipped=True)

    @classmethod
    def at_most(cls, name: str, measured: float, bound: float, why: str = "") -> Check:
        """measured <= bound; `why` says where the bound comes from (printed before its value)."""
        measured = float(measured)
        return cls(name, measured, _expected("<=", bound, why), measured <= bound)

    @classmethod
    def at_least(cls, name: str, measured: float, bound: float, why: str = "") -> Check:
        """measured >= bound."""
        measured = float(measured)
        return cls(name, measured, _expected(">=", bound, why), measured >= bound)

    @classmethod
    def below(cls, name: str, measured: float, bound: float, why: str = "") -> Check:
        """measured < bound (strictly)."""
        measured = float(measured)
        return cls(name, measured, _expected("<", bound, why), measured < bound)

    @classmethod
    def above(cls, name: str, measured: float, bound: float, why: str = "") -> Check:
        """measured > bound (strictly)."""
        measured = float(measured)
        return cls(name, measured, _expected(">", bound, why), measured > bound)

    @classmethod
    def near(cls, name: str, measured: float, target: float, tolerance: float, why: str = "") -> Check:
        """|measured - target| <= tolerance; `why` names the target (e.g. "mean field")."""
        measured = float(measured)
        text = f"{why} {number(target)}" if why else number(target)
        return cls(name, measured, f"{text} +- {number(tolerance)}", abs(measured - target) <= tolerance)

    @classmethod
    def between(cls, name: str, measured: float, low: float, high: float, why: str = "") -> Check:
        """low <= measured <= high."""
        measured = float(measured)
        text = f"in [{number(low)}, {number(high)}]"
        return cls(name, measured, f"{text} ({why})" if why else text, low <= measured <= high)

    @classmethod
    def holds(cls, name: str, measured: float, passed: bool, expected: str) -> Check:
        """A check whose pass rule is not a single bound (e.g. an ordering of several numbers);
        `expected` says the rule in words."""
        measured = float(measured)
        return cls(name, measured, expected, bool(passed))
