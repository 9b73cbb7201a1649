"""gradlab: see and measure why deep nets train or fail to, in JAX and Optax.

The public API is re-exported here, loaded on first use so that `import gradlab` (and the
CLI) can still choose jax's device settings before jax itself is imported.
"""

import importlib
import os

__version__ = "0.1.0"


def _xla_cpu_defaults() -> None:
    """XLA:CPU without YNNPACK fusions, unless XLA_FLAGS says otherwise.

    jaxlib 0.10 hands dots with a batch dimension (every vmapped layer of a sweep) and reductions
    to YNNPACK. Its batched dots ran at 50 GFLOP/s where Eigen reaches 120 on the same 2-core CPU
    (workload W took 1.5x longer), and its reductions rounded differently once a program held 32
    or more sweep points, so a point's norms depended on how many points shared its device.
    Without it, 2 to 128 lanes give the same bits. XLA reads XLA_FLAGS once, when jax starts its
    backend, so this runs on import, before any computation; older jaxlibs do not know the flag
    and are left alone.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags:
        return
    try:
        from importlib.metadata import version

        release = tuple(int(part) for part in version("jaxlib").split(".")[:3])
    except (ImportError, ValueError):  # not installed the usual way: leave XLA as it is
        return
    if release >= (0, 10, 2):
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_experimental_ynn_fusion_type=".strip()


_xla_cpu_defaults()

_EXPORTS = {
    "run": "gradlab.api", "execute": "gradlab.api", "resolve": "gradlab.api", "load": "gradlab.api",
    "plot": "gradlab.api", "figures": "gradlab.api", "checks": "gradlab.api", "reproduce": "gradlab.api",
    "ExperimentConfig": "gradlab.config", "RunSpec": "gradlab.config",
    "Trial": "gradlab.engine", "run_sweep": "gradlab.engine",
    "GradlabError": "gradlab.errors", "ConfigError": "gradlab.errors",
    "ExperimentError": "gradlab.errors", "ResultsError": "gradlab.errors",
    "LapackOnCpuWarning": "gradlab.errors",
    "Check": "gradlab.experiments",
    "probe": "gradlab.usermodels", "sweep": "gradlab.usermodels",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'gradlab' has no attribute {name!r}")
