"""Configs: YAML + dotted overrides -> a validated, frozen config, its sweep axes and its hash.

A config file is `configs/<experiment>.yaml`. Any scalar value may instead be a sweep axis:
a list (`[0.1, 0.01]`), `{logspace: [lo, hi, n]}` (n values 10**lo .. 10**hi) or
`{linspace: [lo, hi, n]}`. `seeds: N` is shorthand for a `seed` axis of N consecutive seeds.
Presets for `--scale quick|paper` live under the top-level `scales:` key as dotted overrides.

Every field says how a sweep over it runs (`sweep` in its metadata):
  static  each value is its own compiled program (shapes, code paths)
  traced  a vmapped number inside one compiled program
  max     traced, and the program is built for the largest value (depth under a mask)
  choice  a string traced as its index into `choices` (an init scheme as numbers)
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import itertools
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gradlab.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"
MAX_CONFIG_BYTES = 256 * 1024
MAX_YAML_NODES = 20_000
MAX_AXIS_LENGTH = 4096
MAX_SEEDS = 2**31 - 1


def param(default, *, choices=None, low=None, low_open=False, high=None, sweep=None, doc=""):
    """A config field with its allowed values and how a sweep over it runs."""
    meta = dict(choices=choices, low=low, low_open=low_open, high=high, sweep=sweep, doc=doc)
    return field(default=default, metadata=meta)


ACTIVATIONS = ("tanh", "relu", "leaky_relu", "gelu", "sigmoid", "linear")
NORMS = ("none", "layernorm", "rmsnorm")
INIT_SCHEMES = (
    "zero", "normal", "lecun_normal", "lecun_uniform", "xavier_normal", "xavier_uniform",
    "he_normal", "he_uniform", "orthogonal",
)
OPTIMIZERS = ("sgd", "momentum", "nesterov", "rmsprop", "adam", "adamw", "adamw_decoupled")
SCHEDULES = (
    "constant", "cosine", "warmup_cosine", "exponential", "inverse_time", "step", "onecycle",
    "sgdr", "linear",
)
CLIPPING = ("none", "global_norm", "value", "agc")
TASKS = ("regression", "classification")
DTYPES = ("float32", "bfloat16", "float16")


@dataclass(frozen=True)
class ModelConfig:
    """A deep MLP: input projection, `depth` hidden blocks of `width`, linear readout."""

    depth: int = param(8, low=1, sweep="max", doc="hidden blocks (a mask makes it vmappable)")
    width: int = param(128, low=1)
    activation: str = param("tanh", choices=ACTIVATIONS)
    residual: bool = param(False, sweep="traced", doc="h + f(h) instead of f(h)")
    norm: str = param("none", choices=NORMS)
    norm_position: str = param("pre", choices=("pre", "post"))
    init: str = param("lecun_normal", choices=INIT_SCHEMES, sweep="choice")
    init_std: float = param(0.01, low=0.0, doc="std of the 'normal' init scheme")
    init_gain: float = param(1.0, low=0.0, doc="multiplies every init scheme's std")
    bias_std: float = param(0.0, low=0.0)
    leaky_slope: float = param(0.01, low=0.0)
    dtype: str = param("float32", choices=DTYPES, doc="compute dtype; params stay float32")
    unroll: int = param(
        0, low=0, doc="hidden layers per lax.scan iteration; >= depth: no scan, straight-line blocks; "
        "0: straight-line up to 16 hidden layers, a scan of one layer deeper")
    final_norm: bool = param(False, doc="normalise the last hidden state before the readout (Pre-LN transformers)")
    remat: bool = param(False, doc="jax.checkpoint each hidden block: recompute activations in the backward pass")


@dataclass(frozen=True)
class OptimConfig:
    """An optax chain: optional clipping, then the optimizer under a learning-rate schedule."""

    name: str = param("sgd", choices=OPTIMIZERS)
    lr: float = param(0.01, low=0.0, low_open=True)
    momentum: float = param(0.9, low=0.0, high=1.0)
    b1: float = param(0.9, low=0.0, high=1.0)
    b2: float = param(0.999, low=0.0, high=1.0, doc="Adam second-moment decay; RMSProp decay")
    eps: float = param(1e-8, low=0.0, low_open=True)
    weight_decay: float = param(0.0, low=0.0)
    schedule: str = param("constant", choices=SCHEDULES)
    warmup_steps: int = param(0, low=0)
    final_lr_fraction: float = param(0.0, low=0.0, high=1.0, sweep="static")
    decay_rate: float = param(0.1, low=0.0, low_open=True, sweep="static")
    cycles: int = param(2, low=1, doc="SGDR restarts / step-schedule drops")
    clip: str = param("none", choices=CLIPPING)
    clip_threshold: float = param(1.0, low=0.0, low_open=True)
    accumulate_steps: int = param(1, low=1, doc="optax.MultiSteps: one update per this many averaged gradients")


@dataclass(frozen=True)
class DataConfig:
    """A synthetic task; `seed` fixes the data, the run's `seed` axis varies the init."""

    task: str = param("regression", choices=TASKS)
    examples: int = param(256, low=1)
    batch_size: int = param(0, low=0, doc="0: full batch")
    input_dim: int = param(64, low=1)
    output_dim: int = param(1, low=1)
    noise: float = param(0.0, low=0.0)
    seed: int = param(0, low=0)


@dataclass(frozen=True)
class ExperimentConfig:
    """What every experiment's config has; experiments subclass it to add their own fields."""

    seed: int = param(0, low=0, high=MAX_SEEDS, sweep="traced")
    seeds: int = param(1, low=1, high=MAX_SEEDS, doc="shorthand: a seed axis seed..seed+seeds-1")
    steps: int = param(100, low=1)
    chunk_steps: int = param(100, low=1, doc="steps per compiled chunk; a checkpoint after each")
    telemetry: str = param("layers", choices=("layers", "loss"), doc="per-layer statistics, or the loss alone")
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)


# ----------------------------------------------------------------------------- resolved spec


@dataclass(frozen=True)
class Axis:
    """One sweep axis: a dotted config path and its values."""

    path: str
    values: tuple
    mode: str  # static | traced | max | choice


@dataclass(frozen=True)
class RunSpec:
    """A resolved run: the config (axes hold their first value), its sweep axes, its origin."""

    experiment: str
    config: Any
    axes: tuple[Axis, ...]
    source: str
    scale: str

    def to_dict(self) -> dict:
        return {
            "experiment": self.experiment,
            "scale": self.scale,
            "config": _jsonable(dataclasses.asdict(self.config)),
            "axes": {a.path: list(a.values) for a in self.axes},
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def hash(self) -> str:
        """A stable name for the resolved config (the run folder's name)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def axis(self, path: str) -> Axis | None:
        return next((a for a in self.axes if a.path == path), None)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ----------------------------------------------------------------------------- schema walking


class FieldInfo(typing.NamedTuple):
    type: type
    metadata: typing.Mapping


def field_info(schema: type) -> dict[str, FieldInfo]:
    """Every scalar field of a (nested) config dataclass, by dotted path."""
    out: dict[str, FieldInfo] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out.update({f"{f.name}.{k}": v for k, v in field_info(tp).items()})
        else:
            out[f.name] = FieldInfo(tp, f.metadata)
    return out


def sweep_mode(f: FieldInfo) -> str:
    mode = f.metadata.get("sweep")
    if mode:
        return mode
    return "traced" if f.type is float else "static"


def get_path(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def replace_path(cfg, path: str, value):
    """A copy of a frozen (nested) dataclass with one dotted field replaced."""
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: replace_path(getattr(cfg, head), rest, value)})


# ----------------------------------------------------------------------------- loading


def config_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.yaml"


def load(
    experiment: str,
    schema: type,
    overrides=(),
    scale: str | None = None,
    path: str | os.PathLike | None = None,
) -> RunSpec:
    """Read `configs/<experiment>.yaml` (or `path`), apply the scale preset and overrides.

    Args:
      experiment: the experiment's name.
      schema: its config dataclass (a subclass of ExperimentConfig).
      overrides: `key=value` strings, values parsed as YAML (`model.depth=32`,
        `optim.lr='{logspace: [-4, -1, 16]}'`), or (key, value) pairs.
      scale: a preset under the file's `scales:` key; default its first one.
      path: a config file other than the experiment's own.

    Raises:
      ConfigError: one line naming the file, the key and what is allowed.
    """
    src = Path(path) if path is not None else config_path(experiment)
    raw = read_yaml(src)
    where = str(src)
    scales = raw.pop("scales", None) or {}
    if not isinstance(scales, dict):
        raise ConfigError(f"{where}: scales: must be a mapping of preset name to overrides")
    if scale is None:
        scale = next(iter(scales), "default")
    elif scale not in scales:
        allowed = ", ".join(scales) or "none defined"
        raise ConfigError(f"{where}: --scale {scale!r} is not a preset of this config (allowed: {allowed})")
    preset = scales.get(scale) or {}
    if not isinstance(preset, dict):
        raise ConfigError(f"{where}: scales.{scale}: must be a mapping of dotted keys to values")
    for key, value in preset.items():
        _set_dotted(raw, str(key), value, f"{where}: scales.{scale}")
    for item in overrides:
        key, value = parse_override(item) if isinstance(item, str) else item
        _set_dotted(raw, key, value, f"override {key}")

    cli_keys = {parse_override(i)[0] if isinstance(i, str) else i[0] for i in overrides}
    where = Origin(where, frozenset(cli_keys))
    fields = field_info(schema)
    axes_raw = _extract_axes(raw, fields, "", where)
    config = _structured(schema, raw, where)
    _check_constraints(config, fields, where)

    axes = []
    for key, spec in axes_raw.items():
        values = _axis_values(spec, key, where)
        values = tuple(_coerce(schema, key, v, where) for v in values)
        for v in values:
            _check_value(fields[key], key, v, where)
        axes.append(Axis(key, values, sweep_mode(fields[key])))
        config = replace_path(config, key, values[0])
    if config.seeds > 1:
        if any(a.path == "seed" for a in axes):
            raise ConfigError(f"{where}: seeds: give either a seed list or a seeds count, not both")
        if config.seed + config.seeds - 1 > MAX_SEEDS:
            raise ConfigError(f"{where}: seeds: seed + seeds must stay below 2**31 (the PRNG's seed range)")
        axes.append(Axis("seed", tuple(range(config.seed, config.seed + config.seeds)), "traced"))
    _check_relations(config, axes, where)
    order = {k: i for i, k in enumerate(fields)}
    axes.sort(key=lambda a: (a.path == "seed", order[a.path]))
    return RunSpec(experiment, config, tuple(axes), where, scale)


def read_yaml(src: Path) -> dict:
    """Read a config file with the safe loader, bounded in size and in aliases."""
    where = str(src)
    if not src.exists():
        raise ConfigError(f"{where}: no such config file")
    if src.is_dir():
        raise ConfigError(f"{where}: is a directory, not a config file")
    try:
        size = src.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{where}: {size} bytes; a config file is at most {MAX_CONFIG_BYTES}")
        text = src.read_text()
    except OSError as e:
        raise ConfigError(f"{where}: cannot be read ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{where}: is not UTF-8 text") from None
    try:
        nodes = sum(1 for _ in yaml.parse(text, Loader=yaml.SafeLoader))
        if nodes > MAX_YAML_NODES:
            raise ConfigError(f"{where}: too many YAML nodes ({nodes} > {MAX_YAML_NODES})")
        if any(isinstance(e, yaml.AliasEvent) for e in yaml.parse(text, Loader=yaml.SafeLoader)):
            raise ConfigError(f"{where}: YAML anchors and aliases are not allowed in configs")
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "malformed YAML"
        raise ConfigError(f"{where}: malformed YAML{at}: {problem}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys to values")
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """`model.depth=32` -> ("model.depth", 32); the value is parsed as YAML."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. model.depth=32")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        raise ConfigError(f"override {item!r}: {key}: the value is not valid YAML") from None
    return key, value


def _set_dotted(raw: dict, key: str, value, where: str) -> None:
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"{where}: {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _is_sequence_field(f: FieldInfo) -> bool:
    return typing.get_origin(f.type) in (tuple, list)


def _is_sweep_spec(value, f: FieldInfo | None = None) -> bool:
    if isinstance(value, list):
        # A list given to a tuple- or list-typed field is its value; a list of lists is a sweep.
        return not (f is not None and _is_sequence_field(f) and not any(isinstance(v, list) for v in value))
    return isinstance(value, dict) and len(value) == 1 and next(iter(value)) in ("logspace", "linspace")


def _extract_axes(raw: dict, fields: dict, prefix: str, where: str) -> dict:
    """Pull sweep specs out of `raw` (replaced by their first value for type checking)."""
    axes = {}
    for key in list(raw):
        path = f"{prefix}{key}"
        value = raw[key]
        if path in fields:
            if _is_sweep_spec(value, fields[path]):
                axes[path] = value
                raw[key] = _axis_values(value, path, where)[0]
            elif isinstance(value, dict):
                raise ConfigError(
                    f"{where}: {path}: a mapping is not a value; a sweep is a list, "
                    "{logspace: [lo, hi, n]} or {linspace: [lo, hi, n]}"
                )
        elif any(f.startswith(path + ".") for f in fields):
            if not isinstance(value, dict):
                example = next(f for f in fields if f.startswith(path + "."))
                _raise(where, path, f"is a section, not a value; set its keys, e.g. {example}=...")
            axes.update(_extract_axes(value, fields, path + ".", where))
    return axes


def _axis_values(spec, path: str, where: str) -> list:
    if isinstance(spec, list):
        if not spec:
            raise ConfigError(f"{where}: {path}: an empty list is not a sweep; give at least one value")
        kinds = {type(v) for v in spec}
        if kinds == {int, float}:
            kinds = {float}
        if len(kinds) > 1:
            names = ", ".join(sorted(k.__name__ for k in kinds))
            raise ConfigError(f"{where}: {path}: a sweep list must hold values of one type, got {names}")
        if len(spec) > MAX_AXIS_LENGTH:
            raise ConfigError(f"{where}: {path}: {len(spec)} values; an axis has at most {MAX_AXIS_LENGTH}")
        return list(spec)
    kind, args = next(iter(spec.items()))
    usage = f"{{{kind}: [lo, hi, n]}}"
    if not (isinstance(args, list) and len(args) == 3):
        raise ConfigError(f"{where}: {path}: expected {usage}")
    lo, hi, n = args
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
        raise ConfigError(f"{where}: {path}: {kind} bounds must be numbers, got {lo!r}, {hi!r}")
    if not all(math.isfinite(v) for v in (lo, hi)):
        raise ConfigError(f"{where}: {path}: {kind} bounds must be finite, got {lo!r}, {hi!r}")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1 or n > MAX_AXIS_LENGTH:
        raise ConfigError(f"{where}: {path}: {kind} needs a count n in 1..{MAX_AXIS_LENGTH}, got n={n!r}")
    if lo > hi:
        raise ConfigError(f"{where}: {path}: {kind} needs lo <= hi, got lo={lo}, hi={hi}")
    if kind == "logspace":
        if hi > 300:
            raise ConfigError(f"{where}: {path}: logspace exponent {hi} overflows; keep it below 300")
        return [float(v) for v in np.logspace(lo, hi, n)]
    return [float(v) for v in np.linspace(lo, hi, n)]


def _omegaconf_message(e: OmegaConfBaseException) -> tuple[str, str]:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).split("\n")[0]
    return str(key), msg


def _structured(schema: type, raw: dict, where: str):
    base = OmegaConf.structured(schema)
    OmegaConf.set_readonly(base, False)
    try:
        merged = OmegaConf.merge(base, raw)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key, msg = _omegaconf_message(e)
        if "not in" in msg:
            msg = _unknown_key_message(schema, key)
        return _raise(where, key, msg)


def _unknown_key_message(schema: type, key: str) -> str:
    fields = list(field_info(schema))
    sections = {f.split(".")[0] for f in fields if "." in f}
    close = difflib.get_close_matches(key, fields + sorted(sections), n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"unknown key{hint} (see `gradlab show <experiment>` for every key)"


class Origin(str):
    """The config file's name, which also knows which keys came from the command line."""

    def __new__(cls, path: str, cli_keys: frozenset = frozenset()):
        obj = super().__new__(cls, path)
        obj.cli_keys = cli_keys
        return obj

    def of(self, key: str) -> str:
        return f"{self} (overridden on the command line)" if key in self.cli_keys else str(self)


def _raise(where: str, key: str, msg: str):
    origin = where.of(key) if isinstance(where, Origin) else where
    raise ConfigError(f"{origin}: {key}: {msg}" if key else f"{origin}: {msg}") from None


def _coerce(schema: type, path: str, value, where: str):
    """Convert one sweep value to its field's type, with omegaconf's checks."""
    node = OmegaConf.structured(schema)
    OmegaConf.set_readonly(node, False)
    nested: dict = {}
    _set_dotted(nested, path, value, where)
    try:
        value = OmegaConf.select(OmegaConf.merge(node, nested), path)
        return OmegaConf.to_object(value) if OmegaConf.is_config(value) else value
    except OmegaConfBaseException as e:
        _, msg = _omegaconf_message(e)
        return _raise(where, path, msg)


def _check_relations(config, axes: list, where: str) -> None:
    """Constraints between fields, over every value a swept field takes."""
    swept = {a.path: a.values for a in axes}

    def values(path):
        return swept.get(path, (get_path(config, path),))

    if "inverse_time" in values("optim.schedule"):
        bad = [r for r in values("optim.decay_rate") if r > 1]
        if bad:
            _raise(where, "optim.decay_rate", f"the inverse_time schedule ends at decay_rate x lr, so it must be "
                   f"in (0, 1], got {bad[0]}")


def _check_constraints(config, fields: dict, where: str) -> None:
    for path, f in fields.items():
        _check_value(f, path, get_path(config, path), where)


def _check_value(f: FieldInfo, path: str, value, where: str) -> None:
    meta = f.metadata
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        _raise(where, path, f"unknown value {value!r}{hint}; allowed: {', '.join(choices)}")
    if isinstance(value, float) and not math.isfinite(value):
        _raise(where, path, f"must be a finite number, got {value}")
    low, high = meta.get("low"), meta.get("high")
    if low is not None:
        if meta.get("low_open") and not value > low:
            _raise(where, path, f"must be > {low}, got {value}")
        if not meta.get("low_open") and not value >= low:
            _raise(where, path, f"must be >= {low}, got {value}")
    if high is not None and not value <= high:
        _raise(where, path, f"must be <= {high}, got {value}")


# ----------------------------------------------------------------------------- sweep plan


@dataclass(frozen=True)
class Group:
    """One compiled program: a config for its static values and the traced points it vmaps."""

    index: tuple[int, ...]  # position along the static axes
    config: Any  # static axes at this group's values; `max` fields at their largest value
    hp: dict[str, np.ndarray]  # every traced field, one entry per point: shape (points,)
    points: int


@dataclass(frozen=True)
class Plan:
    static_axes: tuple[Axis, ...]
    traced_axes: tuple[Axis, ...]
    groups: tuple[Group, ...]

    @property
    def points(self) -> int:
        return sum(g.points for g in self.groups)


def plan(spec: RunSpec) -> Plan:
    """Split the sweep into static groups (one compile each) of vmapped points."""
    fields = field_info(type(spec.config))
    static = tuple(a for a in spec.axes if a.mode == "static")
    traced = tuple(a for a in spec.axes if a.mode != "static")
    traced_paths = [p for p, f in fields.items() if sweep_mode(f) != "static"]
    groups = []
    for index in itertools.product(*(range(len(a.values)) for a in static)):
        cfg = spec.config
        for axis, i in zip(static, index):
            cfg = replace_path(cfg, axis.path, axis.values[i])
        for axis in traced:
            if axis.mode == "max":
                cfg = replace_path(cfg, axis.path, max(axis.values))
        points = list(itertools.product(*(a.values for a in traced)))
        hp = {}
        for path in traced_paths:
            f = fields[path]
            axis_i = next((i for i, a in enumerate(traced) if a.path == path), None)
            values = [p[axis_i] for p in points] if axis_i is not None else [get_path(spec.config, path)] * len(points)
            hp[path] = _encode(f, values)
        groups.append(Group(index, cfg, hp, len(points)))
    return Plan(static, traced, tuple(groups))


def _encode(f: FieldInfo, values: list) -> np.ndarray:
    if sweep_mode(f) == "choice":
        return np.asarray([f.metadata["choices"].index(v) for v in values], np.int32)
    if f.type is bool:
        return np.asarray(values, np.bool_)
    if f.type is int:
        return np.asarray(values, np.int32)
    return np.asarray(values, np.float32)
