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

import numpy as np
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from gradlab.config.files import flatten, parse_override, read_yaml
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
MAX_AXIS_LENGTH = 4096  # values of one sweep axis (a list, logspace, linspace or seeds)
MAX_POINTS = 2**24  # points of a whole sweep: the product of its axes' lengths


def config_path(name: str) -> Path:
    return CONFIG_DIR / f"{name}.yaml"


def load(
    experiment: str,
    schema: type,
    overrides=(),
    scale: str | None = None,
    path: str | os.PathLike | None = None,
) -> RunSpec:
    """The experiment's config, layered: its own file `configs/<experiment>.yaml`, then the scale
    preset, then a user's config file (`path`: only the keys it changes), then the overrides.

    Args:
      experiment: the experiment's name.
      schema: its config dataclass (a subclass of ExperimentConfig).
      overrides: `key=value` strings, values read as YAML with numbers as numbers
        (`model.depth=32`, `optim.lr=1e-4`, `optim.lr='{logspace: [-4, -1, 16]}'`), or (key, value)
        pairs.
      scale: a preset under `scales:` (the user file may add presets); default the user file's
        `scale:` key, else the experiment's first preset.
      path: a user's config file; its `experiment:` key, if present, must name this experiment.

    Raises:
      ConfigError: one line naming the file, the key and what is allowed.
    """
    own = config_path(experiment)
    if path is not None and not own.exists():  # an experiment with no file of its own: the file is its config
        own, path = Path(path), None
    raw = read_yaml(own)
    scales = _scales(raw.pop("scales", None), str(own))
    user: dict = {}
    where, flag = str(own), "--scale"
    if path is not None:
        where = str(path)
        user = read_yaml(Path(path))
        named = user.pop("experiment", experiment)
        if named != experiment:
            raise ConfigError(f"{where}: experiment: this file is for {named!r}, not {experiment!r}")
        scales.update(_scales(user.pop("scales", None), where))
        named_scale = user.pop("scale", None)
        if scale is None and named_scale is not None:
            scale, flag = str(named_scale), "scale:"
    if scale is None:
        scale = next(iter(scales), "default")
    elif scale not in scales:
        allowed = ", ".join(scales) or "none defined"
        raise ConfigError(f"{where}: {flag} {scale!r} is not a preset of this config (allowed: {allowed})")
    preset = scales.get(scale) or {}
    if not isinstance(preset, dict):
        raise ConfigError(f"{where}: scales.{scale}: must be a mapping of dotted keys to values")
    _layer(raw, preset, f"{where}: scales.{scale}")
    user_values = flatten(user)
    _layer(raw, user_values, where)
    pairs = [parse_override(item) if isinstance(item, str) else tuple(item) for item in overrides]
    _layer(raw, dict(pairs), "override")
    typed = frozenset(str(item.split("=", 1)[0]).strip() for item in overrides if isinstance(item, str))
    given = frozenset(key for key, _ in pairs)
    origin = Origin(where, typed, str(own), frozenset(user_values) if path else None, given - typed)
    return resolve(experiment, schema, raw, origin, scale)


def _scales(scales, where: str) -> dict:
    if scales is None:
        return {}
    if not isinstance(scales, dict):
        raise ConfigError(f"{where}: scales: must be a mapping of preset name to overrides")
    return dict(scales)


def _layer(raw: dict, values: dict, where: str) -> None:
    """Set dotted `values` over `raw`. A seed list given here replaces a lower layer's seeds count."""
    for key, value in values.items():
        key = str(key)
        _set_dotted(raw, key, value, f"{where}: {key}" if where == "override" else where)
    if "seed" in values and isinstance(values["seed"], (list, dict)) and "seeds" not in values:
        raw["seeds"] = 1


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

    _check_points(config, fields, axes_raw, where)
    axes = []
    for key, spec in axes_raw.items():
        values = _axis_values(spec, key, where)
        values = tuple(_coerce(schema, key, v, where, fields[key]) for v in values)
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


def _check_points(config, fields: dict, axes_raw: dict, where: str) -> None:
    """Every axis (seeds too) within MAX_AXIS_LENGTH and the sweep within MAX_POINTS, before any
    axis is built: `seeds=1000000000` would fill memory with seeds, even for a dry run."""
    lengths = {key: len(_axis_values(spec, key, where)) for key, spec in axes_raw.items()}
    seeds = config.seeds if "seeds" in fields else 1
    if seeds > MAX_AXIS_LENGTH:
        _raise(where, "seeds", f"{seeds} seeds; an axis has at most {MAX_AXIS_LENGTH}")
    if seeds > 1:
        lengths["seed"] = seeds
    points = math.prod(lengths.values())
    if points > MAX_POINTS:
        sizes = " x ".join(f"{key} {n}" for key, n in lengths.items())
        raise ConfigError(f"{where}: the sweep has {points} points ({sizes}); a sweep has at most {MAX_POINTS}")


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


_Config = typing.TypeVar("_Config")


def _structured(schema: type[_Config], raw: dict, where: str) -> _Config:
    base = OmegaConf.structured(schema)
    OmegaConf.set_readonly(base, False)
    try:
        merged = OmegaConf.merge(base, raw)
        # to_object of a structured config is an instance of its dataclass; omegaconf types it as any container.
        return typing.cast(_Config, OmegaConf.to_object(merged))
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
    """The config file's name, which also knows where each key came from: the command line, the
    user's file (`file_keys`) or, for the rest, the experiment's own file (`own`)."""

    cli_keys: frozenset
    own: str
    file_keys: frozenset | None
    call_keys: frozenset  # given as (key, value) pairs: by a Python call (gradlab.run(..., model__depth=4))

    def __new__(
        cls,
        path: str,
        cli_keys: frozenset = frozenset(),
        own: str = "",
        file_keys: frozenset | None = None,
        call_keys: frozenset = frozenset(),
    ):
        obj = super().__new__(cls, path)
        obj.cli_keys, obj.own, obj.file_keys, obj.call_keys = cli_keys, own or path, file_keys, call_keys
        return obj

    def of(self, key: str) -> str:
        if key in self.cli_keys:
            return f"{self} (overridden on the command line)"
        if key in self.call_keys:
            return f"{self} (overridden by an argument of the call)"
        if self.file_keys is not None and key not in self.file_keys and key.split(".")[0] not in self.file_keys:
            return self.own
        return str(self)


def _raise(where: str, key: str, msg: str) -> typing.NoReturn:
    origin = where.of(key) if isinstance(where, Origin) else where
    raise ConfigError(f"{origin}: {key}: {msg}" if key else f"{origin}: {msg}") from None


def _coerce(schema: type, path: str, value, where: str, f: FieldInfo | None = None):
    """Convert one sweep value to its field's type, with omegaconf's checks (a number or string
    already of its field's type is taken as it is: a 4096-value axis in milliseconds)."""
    plain = not isinstance(value, bool)
    if f is not None and ((f.type is float and plain and isinstance(value, (int, float))) or f.type is type(value)):
        return float(value) if f.type is float else value
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
                _raise(
                    where,
                    f"{prefix}decay_rate",
                    f"the inverse_time schedule ends at decay_rate x lr, so it must be in (0, 1], got {bad[0]}",
                )


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
