"""gradlab: see and measure why deep nets train or fail to, in JAX and Optax.

The public API is re-exported here, loaded on first use so that `import gradlab` (and the
CLI) can still choose jax's device settings before jax itself is imported. Importing changes
nothing: runs set up XLA flags, devices and the compilation cache in `gradlab.runtime`.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.2.0"  # the one place the version is written (pyproject reads it)

_EXPORTS = {
    "run": "gradlab.api",
    "execute": "gradlab.api",
    "resolve": "gradlab.api",
    "load": "gradlab.api",
    "plot": "gradlab.api",
    "figures": "gradlab.api",
    "checks": "gradlab.api",
    "reproduce": "gradlab.api",
    "ExperimentConfig": "gradlab.config",
    "RunSpec": "gradlab.config",
    "Trial": "gradlab.engine",
    "run_sweep": "gradlab.engine",
    "GradlabError": "gradlab.errors",
    "ConfigError": "gradlab.errors",
    "ExperimentError": "gradlab.errors",
    "ResultsError": "gradlab.errors",
    "SetupError": "gradlab.errors",
    "LapackOnCpuWarning": "gradlab.errors",
    "Check": "gradlab.experiments",
    "probe": "gradlab.usermodels",
    "sweep": "gradlab.usermodels",
}
__all__ = [  # sorted(_EXPORTS), written out for type checkers
    "Check",
    "ConfigError",
    "ExperimentConfig",
    "ExperimentError",
    "GradlabError",
    "LapackOnCpuWarning",
    "ResultsError",
    "RunSpec",
    "SetupError",
    "Trial",
    "checks",
    "execute",
    "figures",
    "load",
    "plot",
    "probe",
    "reproduce",
    "resolve",
    "run",
    "run_sweep",
    "sweep",
]

if TYPE_CHECKING:  # what __getattr__ loads, named for type checkers
    from gradlab.api import checks, execute, figures, load, plot, reproduce, resolve, run
    from gradlab.config import ExperimentConfig, RunSpec
    from gradlab.engine import Trial, run_sweep
    from gradlab.errors import ConfigError, ExperimentError, GradlabError, LapackOnCpuWarning, ResultsError, SetupError
    from gradlab.experiments import Check
    from gradlab.usermodels import probe, sweep


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gradlab' has no attribute {name!r}")
