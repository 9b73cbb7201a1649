"""Loading: YAML + scale preset + dotted overrides -> a validated RunSpec, or one-line ConfigErrors.

A config file is `configs/<experiment>.yaml`. Any scalar value may instead be a sweep axis:
a list (`[0.1, 0.01]`), `{logspace: [lo, hi, n]}` (n values 10**lo .. 10**hi) or
`{linspace: [lo, hi, n]}`. `seeds: N` is shorthand for a `seed` axis of N consecutive seeds.
Presets for `--scale quick|paper` live under the top-level `scales:` key as dotted overrides.
"""

from __future__ import annotations

import copy
import difflib
import math
import os
import typing
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gradlab.config.schema import (
    MAX_SEEDS,
    Axis,
    FieldInfo,
    OptimConfig,
    RunSpec,
    field_info,
    get_path,
    replace_path,
    sections_of,
    sweep_mode,
)
from gradlab.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
MAX_CONFIG_BYTES = 256 * 1024
MAX_YAML_NODES = 20_000
MAX_AXIS_LENGTH = 4096


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
    pairs = [parse_override(item) if isinstance(item, str) else tuple(item) for item in overrides]
    for key, value in pairs:
        _set_dotted(raw, key, value, f"override {key}")
    return resolve(experiment, schema, raw, Origin(where, frozenset(key for key, _ in pairs)), scale)


def resolve(experiment: str, schema: type, raw: dict, where: str, scale: str = "default") -> RunSpec:
    """A RunSpec from a mapping as a config file holds it (sweep specs included), fully checked.

    Args:
      raw: nested {key: value or sweep spec}; not modified.
      where: what error messages name as the source (an Origin also knows the CLI's keys).
    """
    raw = copy.deepcopy(raw)
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
    if "seeds" in fields and config.seeds > 1:
        if any(a.path == "seed" for a in axes):
            raise ConfigError(f"{where}: seeds: give either a seed list or a seeds count, not both")
        if config.seed + config.seeds - 1 > MAX_SEEDS:
            raise ConfigError(f"{where}: seeds: seed + seeds must stay below 2**31 (the PRNG's seed range)")
        axes.append(Axis("seed", tuple(range(config.seed, config.seed + config.seeds)), "traced"))
    _check_relations(config, axes, where)
    _validate(config, axes, where)
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
    """Constraints between fields of every optimizer section, over every value a swept field takes."""
    swept = {a.path: a.values for a in axes}

    def values(path):
        return swept.get(path, (get_path(config, path),))

    for prefix in sections_of(type(config), OptimConfig):
        if "inverse_time" in values(f"{prefix}schedule"):
            bad = [r for r in values(f"{prefix}decay_rate") if r > 1]
            if bad:
                _raise(where, f"{prefix}decay_rate", f"the inverse_time schedule ends at decay_rate x lr, so it "
                       f"must be in (0, 1], got {bad[0]}")


def _validate(config, axes: list, where: str) -> None:
    """The config's own validate(): on the resolved config, then with each swept value in turn."""
    candidates = [config] + [replace_path(config, a.path, v) for a in axes for v in a.values[1:]]
    for candidate in candidates:
        try:
            candidate.validate()
        except ConfigError as e:
            _raise(where, e.key or "", str(e))


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
