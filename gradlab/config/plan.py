"""The sweep plan: static groups (one compiled program each) of vmapped points, and the run length."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradlab.config.schema import (
    Axis,
    FieldInfo,
    RunSpec,
    field_info,
    get_path,
    replace_path,
    sweep_mode,
)


@dataclass(frozen=True)
class Group:
    """One compiled program: a config for its static values and the traced points it vmaps."""

    index: tuple[int, ...]  # position along the static axes
    config: Any  # static axes at this group's values; `max` fields at their largest value
    hp: dict[str, np.ndarray]  # every traced field, one entry per point: shape (points,)
    points: int


@dataclass(frozen=True)
class Plan:
    """What the engine runs: every group for `steps` steps, compiled in chunks of `chunk_steps`."""

    static_axes: tuple[Axis, ...]
    traced_axes: tuple[Axis, ...]
    groups: tuple[Group, ...]
    steps: int
    chunk_steps: int  # at most steps

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
        shape = tuple(len(a.values) for a in traced)
        points = math.prod(shape)
        hp = {}
        for path in traced_paths:  # the points in C order over the traced axes, built as arrays (no per-point loop)
            f = fields[path]
            axis_i = next((i for i, a in enumerate(traced) if a.path == path), None)
            if axis_i is None:
                hp[path] = np.repeat(_encode(f, [get_path(spec.config, path)]), points)
            else:
                along = _encode(f, list(traced[axis_i].values))
                reps = math.prod(shape[axis_i + 1 :])
                hp[path] = np.tile(np.repeat(along, reps), math.prod(shape[:axis_i]))
        groups.append(Group(index, cfg, hp, points))
    steps = spec.config.steps
    return Plan(static, traced, tuple(groups), steps, min(spec.config.chunk_steps, steps))


def _encode(f: FieldInfo, values: list) -> np.ndarray:
    if sweep_mode(f) == "choice":
        return np.asarray([f.metadata["choices"].index(v) for v in values], np.int32)
    if f.type is bool:
        return np.asarray(values, np.bool_)
    if f.type is int:
        return np.asarray(values, np.int32)
    return np.asarray(values, np.float32)
