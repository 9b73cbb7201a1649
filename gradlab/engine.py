"""The engine: a Trial is what one sweep point does; run_sweep runs every point at once.

A Trial is a pair of pure functions, like an optax GradientTransformation:
  init(hp, key)   -> state
  step(hp, state) -> (state, metrics)
where `hp` maps each traced config path ("optim.lr", "seed", ...) to a scalar. The engine
vmaps both over the sweep points of a static group, scans `step` over chunks of steps under
one jit, shards the points over the devices, checkpoints after every chunk, and isolates
divergence: a point whose state or loss goes non-finite records its first bad step and
reports NaN metrics from then on; the other points are untouched.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from gradlab import results
from gradlab.config import Plan
from gradlab.errors import ResultsError, SweepTooLarge  # noqa: F401 (SweepTooLarge is re-exported)
from gradlab.programs import (  # noqa: F401 (re-exported: the engine's public names)
    LANE_MULTIPLE,
    CompiledGroup,
    _same_on_every_process,
    available_bytes,
    compile_group,
    default_dims,
    device_bytes,
    fit_group,
    group_bytes,
    lanes_per_device,
    program_bytes,
    size,
    split_note,
)


class Trial(NamedTuple):
    """One sweep point's (init, step) pair and how to label its metrics.

    metric_dims names the trailing dims of a metric (after `step`); a metric not listed gets
    ("layer",) when it is a vector and (name_0, name_1, ...) otherwise.
    """

    init: Callable[[dict, jax.Array], Any]
    step: Callable[[dict, Any], tuple[Any, dict]]
    metric_dims: dict[str, tuple[str, ...]] = {}


@dataclass
class SweepResult:
    """Host arrays of a finished sweep, indexed (*static axes, *traced axes, step, ...)."""

    axes: list[tuple[str, tuple]]
    metrics: dict[str, np.ndarray]
    metric_dims: dict[str, tuple[str, ...]]
    first_bad_step: np.ndarray
    first_bad_layer: np.ndarray
    compile_seconds: float = 0.0
    run_seconds: float = 0.0
    device_kind: str = ""
    device_count: int = 1
    groups: int = 1
    processes: int = 1
    notes: list[str] = field(default_factory=list)


def _checkpoint_arrays(t: int, carry: dict, metrics: dict, points: int) -> dict:
    arrays = {"t": np.asarray(t)}
    for i, leaf in enumerate(jax.tree.leaves(carry)):
        arrays[f"state_{i:04d}"] = leaf
    for name, chunks in metrics.items():
        arrays[f"metric.{name}"] = np.concatenate(chunks, axis=1) if chunks else np.zeros((points, 0))
    return arrays


def _identity(group: CompiledGroup, tag: str) -> dict:
    """What a checkpoint must match to be resumed: the run (config hash, group), the gradlab that
    wrote it, and the state's tree structure, dtypes and per-point shapes (not the device count)."""
    from gradlab import __version__

    leaves, treedef = jax.tree.flatten(group.carry_shape)
    return {
        "run": tag,
        "gradlab": __version__,
        "tree": str(treedef),
        "leaves": [[str(np.dtype(s.dtype)), list(s.shape[1:])] for s in leaves],
    }


def _rows(a: np.ndarray, real: int, batch: int) -> np.ndarray:
    """A checkpointed array's first `real` points, padded to `batch` by repeating the last one (as
    the padded lanes do), so a checkpoint resumes on another device count."""
    return np.concatenate([a[:real], np.repeat(a[real - 1 : real], batch - real, axis=0)])


def _restore(path: Path, group: CompiledGroup, tag: str, real: int):
    """(t, carry, metrics) from a checkpoint, or the reason it cannot be resumed."""
    try:
        arrays, meta = results.read_checkpoint(path)
    except ResultsError as e:
        return str(e).rsplit("checkpoint is ", 1)[-1].replace("; rerun with --fresh", "")
    want = _identity(group, tag)
    wrong = [k for k in want if meta.get(k) != want[k]]
    if wrong:
        return f"it was written for another {' and '.join(wrong)}"
    leaves_shape, treedef = jax.tree.flatten(group.carry_shape)
    leaves = [arrays.get(f"state_{i:04d}", np.zeros(0)) for i in range(len(leaves_shape))]
    if any(a.shape[1:] != s.shape[1:] or a.shape[0] < real for a, s in zip(leaves, leaves_shape)):
        return "it holds other points"
    carry = group.put(jax.tree.unflatten(treedef, [_rows(a, real, group.batch) for a in leaves]))
    metrics = {k[len("metric.") :]: [_rows(v, real, group.batch)] for k, v in arrays.items() if k.startswith("metric.")}
    return int(arrays["t"]), carry, metrics


def batch_checkpoint(checkpoint: Path | None, group: CompiledGroup, b: int) -> Path | None:
    if checkpoint is None or group.batches == 1:
        return checkpoint
    return checkpoint.with_name(checkpoint.name.replace(".ckpt.npz", f".batch-{b:04d}-of-{group.batches:04d}.ckpt.npz"))


def run_group(
    trial: Trial,
    hp_host: dict,
    steps: int,
    chunk: int,
    devices,
    checkpoint: Path | None = None,
    on_chunk: Callable[[int], None] | None = None,
    compiled: CompiledGroup | None = None,
    tag: str = "",
    on_note: Callable[[str], None] | None = None,
):
    """Run one static group to the end; returns (metrics (points, steps, ...), first bad step, compile s).

    Each batch of points checkpoints after every chunk (only process 0 writes; every process reads,
    so with several hosts --out must be a folder they all see). A checkpoint resumes only when it
    was written for the same run (`tag`), by the same gradlab, for a state of the same structure,
    and reads back with its checksum; otherwise it is discarded with a note and the batch starts over.
    """
    group = compiled or fit_group(trial, hp_host, steps, chunk, devices)
    writer = jax.process_index() == 0
    merged, bad = {}, []
    for b in range(group.batches):
        path = batch_checkpoint(checkpoint, group, b)
        hp = group.hp(b)
        real = min(group.batch, group.points - b * group.batch)
        restored = _restore(path, group, tag, real) if path is not None and path.exists() else None
        if isinstance(restored, str):
            if on_note is not None and writer:
                on_note(f"checkpoint {path} discarded ({restored}); starting the group over")
            restored = None
        t, carry, metrics = restored or (0, group.init(hp), {})
        _same_on_every_process(t, f"the checkpoint step of {path}")
        if on_chunk and t:
            on_chunk(t)
        while t < steps:
            carry, out = group.advance(hp, carry, t)
            n = min(chunk, steps - t)
            for name, value in group.gather(out).items():
                metrics.setdefault(name, []).append(value[:, :n])
            t += n
            if path is not None:
                arrays = _checkpoint_arrays(t, group.gather(carry), metrics, group.batch)
                if writer:
                    results.save_checkpoint(path, arrays, _identity(group, tag))
            if on_chunk:
                on_chunk(n)
        bad.append(group.gather([c[1] for c in carry])[:real])
        for k, v in metrics.items():
            merged.setdefault(k, []).append(np.concatenate(v, axis=1)[:real])
    merged = {k: np.concatenate(v, axis=0) for k, v in merged.items()}
    return merged, np.concatenate(bad), group.compile_seconds


# The dims that index a model's parts, in order of preference: an MLP's layers, or the parameter
# leaves of a user's model (gradlab.usermodels). first_bad_layer indexes the first one present.
LAYER_DIMS = ("layer", "param")


def first_bad_layers(metrics: dict, dims: dict, bad_step: np.ndarray) -> np.ndarray:
    """The first layer with a non-finite statistic at each point's first bad step (-1: none).

    Array operations over the diverged points only: a sweep of millions of points takes no Python loop per point.
    """
    out = np.full(bad_step.size, -1, np.int32)
    layer_dim = next((d for d in LAYER_DIMS if (d,) in dims.values()), None)
    points = bad_step.size
    layered = [m.reshape((points,) + m.shape[bad_step.ndim :]) for n, m in metrics.items() if dims[n] == (layer_dim,)]
    (where,) = np.nonzero(bad_step.reshape(-1) >= 0)
    if layered and where.size:
        at = bad_step.reshape(-1)[where]  # each diverged point at its first bad step: (diverged, layer)
        bad = np.zeros((where.size, max(m.shape[-1] for m in layered)), bool)
        for m in layered:
            bad[:, : m.shape[-1]] |= ~np.isfinite(m[where, at])
        out[where] = np.where(bad.any(axis=1), np.argmax(bad, axis=1), -1)
    return out.reshape(bad_step.shape)


def run_sweep(
    trial_fn: Callable[[Any], Trial],
    plan: Plan,
    *,
    checkpoint_dir: Path | None = None,
    progress: bool = True,
    devices=None,
    stop: Callable[[], bool] | None = None,
    memory: int | None = None,
    on_note: Callable[[str], None] | None = None,
    tag: str = "",
) -> SweepResult:
    """Run every group of the plan; metrics come back labelled by the sweep axes.

    Args:
      trial_fn: config of a static group -> Trial.
      plan: the sweep plan (config.plan): its groups, axes, steps and chunk_steps.
      checkpoint_dir: where each group checkpoints after every chunk; a rerun resumes there.
      progress: show a progress bar over all steps of all groups.
      devices: the devices to shard the points over (default: every device of every process).
      stop: polled after every chunk's checkpoint; when it returns True the sweep raises
        KeyboardInterrupt, leaving a checkpoint to resume from.
      memory: bytes per device a group may use (default: what the devices have free); a group
        that needs more runs in batches of points (fit_group).
      on_note: called with each note as it is made (e.g. that a group runs in batches).
      tag: names the run in its checkpoints (the config hash); a checkpoint of another is discarded.
    """
    from tqdm.auto import tqdm

    devices = list(devices) if devices is not None else jax.devices()
    steps, chunk = plan.steps, min(plan.chunk_steps, plan.steps)
    static_shape = tuple(len(a.values) for a in plan.static_axes)
    traced_shape = tuple(len(a.values) for a in plan.traced_axes)
    bar = tqdm(total=steps * len(plan.groups), disable=not progress, unit="step", leave=False)
    per_group, compile_seconds, notes = [], 0.0, []
    start = time.perf_counter()
    for g, group in enumerate(plan.groups):
        bar.set_description(f"group {g + 1}/{len(plan.groups)}")
        ckpt = checkpoint_dir / f"group-{g:04d}.ckpt.npz" if checkpoint_dir is not None else None
        trial = trial_fn(group.config)

        def tick(n):
            bar.update(n)
            if stop is not None and stop():
                raise KeyboardInterrupt

        compiled = fit_group(trial, group.hp, steps, chunk, devices, memory)
        if compiled.batches > 1:
            notes.append(f"group {g + 1}: {split_note(compiled)}")
            if on_note is not None:
                on_note(notes[-1])
            bar.total += steps * (compiled.batches - 1)
            bar.refresh()
        metrics, bad, seconds = run_group(trial, group.hp, steps, chunk, devices, ckpt, tick, compiled, tag, on_note)
        compile_seconds += seconds
        per_group.append((group.index, trial, metrics, bad))
    bar.close()

    dims = {}
    for _, trial, metrics, _ in per_group:
        for name, m in metrics.items():
            dims[name] = trial.metric_dims.get(name) or default_dims(name, m.shape[2:])
    full = {}
    for name in dims:
        tails = [m[name].shape[1:] for _, _, m, _ in per_group if name in m]
        tail = tuple(max(s) for s in zip(*tails))
        dtype = np.result_type(*[m[name].dtype for _, _, m, _ in per_group if name in m])
        fill = np.nan if np.issubdtype(dtype, np.inexact) else -1
        full[name] = np.full(static_shape + traced_shape + tail, fill, dtype)
    bad_full = np.full(static_shape + traced_shape, -1, np.int32)
    for index, _, metrics, bad in per_group:
        for name, m in metrics.items():
            m = m.reshape(traced_shape + m.shape[1:])
            full[name][index + tuple(slice(0, s) for s in m.shape)] = m
        bad_full[index] = bad.reshape(traced_shape)
    device = devices[0]
    return SweepResult(
        axes=[(a.path, a.values) for a in plan.static_axes + plan.traced_axes],
        metrics=full,
        metric_dims=dims,
        first_bad_step=bad_full,
        first_bad_layer=first_bad_layers(full, dims, bad_full),
        compile_seconds=compile_seconds,
        run_seconds=time.perf_counter() - start - compile_seconds,
        device_kind=getattr(device, "device_kind", device.platform),
        device_count=len(devices),
        groups=len(plan.groups),
        processes=jax.process_count(),
        notes=notes,
    )
