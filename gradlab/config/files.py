"""Config files as YAML: reading them safely, numbers read as numbers, and writing a resolved
config back as a file that `gradlab run FILE` runs again to the same hash.

YAML 1.1 (PyYAML's safe loader) reads `1e-4`, `1E3` and `-inf` as strings; here they are floats, as
in YAML 1.2 and Python: every config file and every `key=value` override is read by `read_text`.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import yaml

from gradlab.config.schema import RunSpec
from gradlab.errors import ConfigError

MAX_CONFIG_BYTES = 256 * 1024
MAX_YAML_NODES = 20_000
RESERVED = ("experiment", "scale", "scales")  # a file's keys that are not config fields


class NumberLoader(yaml.SafeLoader):
    """The safe loader, reading 1e-4, 1E3, -inf and nan as floats (YAML 1.1 reads them as strings)."""


NumberLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^(?:[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)[eE][-+]?[0-9]+|[-+]?(?:inf|Inf|INF)|nan|NaN|NAN)$"),
    list("-+0123456789.iInN"),
)


def read_text(text: str, where: str) -> Any:
    """Parse YAML text with NumberLoader, bounded in nodes, without anchors or aliases."""
    try:
        events = list(yaml.parse(text, Loader=NumberLoader))
        if len(events) > MAX_YAML_NODES:
            raise ConfigError(f"{where}: too many YAML nodes ({len(events)} > {MAX_YAML_NODES})")
        if any(isinstance(e, yaml.AliasEvent) for e in events):
            raise ConfigError(f"{where}: YAML anchors and aliases are not allowed in configs")
        return yaml.load(text, Loader=NumberLoader)  # noqa: S506 (NumberLoader is a SafeLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or "malformed YAML"
        raise ConfigError(f"{where}: malformed YAML{at}: {problem}") from None


def read_yaml(src: Path) -> dict:
    """Read a config file: a mapping of keys to values, bounded in size."""
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
    raw = read_text(text, where)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of keys to values")
    return raw


def parse_override(item: str) -> tuple[str, Any]:
    """`model.depth=32` -> ("model.depth", 32); the value is read as YAML, numbers as numbers."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected key=value, e.g. model.depth=32")
    try:
        value = read_text(text, f"override {key}") if text.strip() else ""
    except ConfigError:
        raise ConfigError(f"override {item!r}: {key}: the value is not valid YAML") from None
    return key, value


def experiment_of(src: Path) -> str:
    """The experiment a user's config file names (its `experiment:` key)."""
    name = read_yaml(src).get("experiment")
    if not isinstance(name, str) or not name:
        raise ConfigError(
            f"{src}: experiment: a config file names its experiment, e.g. `experiment: gradient_flow` "
            "(`gradlab list` shows them)"
        )
    return name


def flatten(raw: dict, prefix: str = "") -> dict[str, Any]:
    """{"model": {"depth": 8}} -> {"model.depth": 8}; sweep specs ({logspace: ...}) stay values."""
    out: dict[str, Any] = {}
    for key, value in raw.items():
        path = f"{prefix}{key}"
        if isinstance(value, dict) and not (len(value) == 1 and next(iter(value)) in ("logspace", "linspace")):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def runnable(spec: RunSpec) -> dict:
    """The resolved config as a file holds it: `experiment`, `scale`, every key, sweep axes as lists.

    A seed axis that came from `seeds: N` stays `seed` + `seeds`; any other seed axis is a list.
    """
    values = dataclasses.asdict(spec.config)
    seed_axis = spec.axis("seed")
    from_count = seed_axis is not None and list(seed_axis.values) == list(
        range(spec.config.seed, spec.config.seed + spec.config.seeds)
    )
    for axis in spec.axes:
        if axis.path == "seed" and from_count:
            continue
        node = values
        *parents, leaf = axis.path.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = list(axis.values)
    if seed_axis is not None and not from_count:
        values["seeds"] = 1
    return {"experiment": spec.experiment, "scale": spec.scale, **_plain(values)}


class _Dumper(yaml.SafeDumper):
    """Mappings as blocks, lists on one line: `activation: [tanh, relu]`."""


_Dumper.add_representer(
    list, lambda dumper, data: dumper.represent_sequence("tag:yaml.org,2002:seq", data, flow_style=True)
)


def runnable_yaml(spec: RunSpec) -> str:
    """`runnable(spec)` as YAML, under a comment naming the run."""
    head = (
        f"# {spec.experiment} at scale {spec.scale}, config hash {spec.hash}\n"
        "# `gradlab run THIS_FILE` runs it again; a key you delete takes the experiment's own value.\n"
    )
    return head + yaml.dump(runnable(spec), Dumper=_Dumper, sort_keys=False, width=100)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
