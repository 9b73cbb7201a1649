"""Configs: YAML + dotted overrides -> a validated, frozen config, its sweep axes, plan and hash.

  schema.py  the config dataclasses, `param`, field walking, Axis and RunSpec
  files.py   YAML reading (numbers as numbers), overrides, a resolved config written back as a file
  loader.py  layering (own file, scale, user file, overrides), `load`, value checks
  plan.py    Group, Plan and `plan`: static groups of vmapped points

The lists of choices (ACTIVATIONS, OPTIMIZERS, ...) live in the modules that implement them and
are re-exported here.
"""

from gradlab.config.files import (
    MAX_CONFIG_BYTES,
    MAX_YAML_NODES,
    experiment_of,
    parse_override,
    read_yaml,
    runnable,
    runnable_yaml,
)
from gradlab.config.loader import CONFIG_DIR, MAX_AXIS_LENGTH, Origin, config_path, load, resolve
from gradlab.config.plan import Group, Plan, plan
from gradlab.config.schema import (
    ACTIVATIONS,
    CLIPPING,
    DTYPES,
    INIT_SCHEMES,
    MAX_SEEDS,
    NORMS,
    OPTIMIZERS,
    SCHEDULES,
    TASKS,
    Axis,
    DataConfig,
    ExperimentConfig,
    FieldInfo,
    KeyDoc,
    ModelConfig,
    OptimConfig,
    RunSpec,
    describe,
    field_info,
    get_path,
    param,
    replace_path,
    sections_of,
    sweep_mode,
)

__all__ = [
    "ACTIVATIONS",
    "CLIPPING",
    "CONFIG_DIR",
    "DTYPES",
    "INIT_SCHEMES",
    "MAX_AXIS_LENGTH",
    "MAX_CONFIG_BYTES",
    "MAX_SEEDS",
    "MAX_YAML_NODES",
    "NORMS",
    "OPTIMIZERS",
    "SCHEDULES",
    "TASKS",
    "Axis",
    "DataConfig",
    "ExperimentConfig",
    "FieldInfo",
    "Group",
    "ModelConfig",
    "OptimConfig",
    "Origin",
    "Plan",
    "RunSpec",
    "KeyDoc",
    "config_path",
    "describe",
    "experiment_of",
    "field_info",
    "get_path",
    "load",
    "param",
    "parse_override",
    "plan",
    "read_yaml",
    "replace_path",
    "resolve",
    "runnable",
    "runnable_yaml",
    "sections_of",
    "sweep_mode",
]
