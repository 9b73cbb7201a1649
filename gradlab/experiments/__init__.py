"""The experiment catalog: one module per experiment, found by name.

An experiment module defines
  NAME, CLAIM          its name (= its config file's) and the one-line claim it measures
  Config               its config dataclass (a subclass of config.ExperimentConfig)
  trial(cfg) -> Trial  what one sweep point does, for the config of one static group
  figures(ds) -> {suffix: Figure}   drawn from stored results only ("" is the main figure)
  checks(ds) -> [Check]             the numbers that prove the claim
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from types import ModuleType

from gradlab.errors import ExperimentError


@dataclass(frozen=True)
class Check:
    """One quantitative check: what was measured against what theory allows."""

    name: str
    measured: float
    expected: str
    passed: bool


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> ModuleType:
    known = names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ExperimentError(f"unknown experiment {name!r}{hint}; known: {', '.join(known)}")
    return importlib.import_module(f"{__name__}.{name}")
