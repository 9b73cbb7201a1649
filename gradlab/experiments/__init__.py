"""The experiment catalog: one module per experiment, found by name.

An experiment module holds its science and nothing else; the framework carries the rest:

  NAME, CLAIM              its name (= its config file's) and the one sentence it measures
  Config                   its config dataclass (config.ExperimentConfig or a subclass whose
                           `validate()` checks its own fields; config.load calls it, so a bad
                           value is refused before anything is written)
  AXES                     the sweep axes measure and figures index by; the framework adds
                           each one that was not swept as a length-1 dim at its value
  trial(cfg) -> Trial      what one sweep point does, for the config of one static group
  reference(cfg) -> dict   optional: numbers computed once at run time (jax allowed), stored in
                           the results as variables "ref.<name>" (e.g. the constant-predictor loss)
  measure(ds) -> Measured  numpy only: every number the claim rests on, computed once
  checks(m) -> [Check]     Check.at_most(name, m.x, bound, why), ...: each bound stated once
  figures(ds, m) -> dict   {suffix: matplotlib Figure} from stored results and m ("" is the main
                           figure); numpy and matplotlib only

`evaluate(module, ds)` and `draw(module, ds, measured)` are how everything else calls them.
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from types import ModuleType
from typing import Any

from gradlab import results
from gradlab.check import Check
from gradlab.errors import ExperimentError

__all__ = ["Check", "draw", "evaluate", "get", "names"]


def names() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))


def get(name: str) -> ModuleType:
    known = names()
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ExperimentError(f"unknown experiment {name!r}{hint}; known: {', '.join(known)}")
    return importlib.import_module(f"{__name__}.{name}")


def evaluate(module: ModuleType, ds) -> tuple[Any, list[Check]]:
    """The experiment's measured numbers and its checks, from its stored results."""
    ds = results.with_axes(ds, list(module.AXES))
    measured = module.measure(ds)
    return measured, list(module.checks(measured))


def draw(module: ModuleType, ds, measured, style: str = "screen") -> dict:
    """The experiment's figures, {suffix: Figure}, from its stored results and measured numbers,
    drawn in gradlab's figure style (`screen` or `paper`, see plotting.py)."""
    from gradlab import plotting  # matplotlib only when something is drawn

    with plotting.style(style):
        drawn = module.figures(results.with_axes(ds, list(module.AXES)), measured)
        return {suffix: _name_the_data(plotting.finish(fig), ds) for suffix, fig in drawn.items()}


def _name_the_data(fig, ds):
    """A figure drawn from a real dataset says which, unless its experiment's own text already does."""
    from gradlab import datasets

    task = results.run_config(ds).get("data", {}).get("task")
    if task in datasets.SHAPES:
        name = datasets.title(task)
        if not any(name in t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))):
            title = fig._suptitle  # matplotlib has a getter of its text but no setter
            if title is not None:
                title.set_text(f"{title.get_text()}\ndata: {name}")
            else:
                fig.suptitle(f"data: {name}")
    return fig
