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

import os
import re
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gradlab import results, sums
from gradlab.config import Plan
from gradlab.errors import LapackOnCpuWarning, ResultsError, SweepTooLarge  # noqa: F401 (SweepTooLarge is re-exported)


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


def _all_finite(tree) -> jax.Array:
    """Whether every float in `tree` is finite, read as one sum per leaf.

    A NaN or an infinity anywhere makes the sum non-finite. A sum is one pass over memory (a dot
    with ones: gradlab/sums.py); `all(isfinite(x))` makes XLA:CPU write a boolean copy of every
    leaf first, which cost 10% of workload W's step. Only a leaf whose finite entries sum beyond
    float32's 3.4e38 reads as non-finite too, and such a state has diverged by any measure.
    """
    totals = [sums.total(x) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)]
    return jnp.isfinite(sum(totals)) if totals else jnp.bool_(True)


def _silence(metrics: dict, healthy) -> dict:
    return jax.tree.map(lambda m: jnp.where(healthy, m, jnp.nan) if jnp.issubdtype(m.dtype, jnp.inexact) else m, metrics)


def split_hp(hp_host: dict) -> tuple[dict, dict]:
    """(varying, constant): a field with one value over the group is a Python constant.

    Constants let XLA drop what they switch off (an init scheme that is not swept compiles only
    its own distribution); `seed` always varies, so vmap always has an axis to map.
    """
    varying, constant = {}, {}
    for path, values in hp_host.items():
        if path != "seed" and np.all(values == values[0]):
            constant[path] = values[0].item()
        else:
            varying[path] = values
    return varying, constant


def _point_init(trial: Trial, constant: dict):
    def init(hp):
        hp = {**constant, **hp}
        state = trial.init(hp, jax.random.PRNGKey(hp["seed"]))
        return state, jnp.int32(-1)

    return init


def _point_chunk(trial: Trial, chunk: int, total: int, constant: dict):
    """`chunk` steps of one point from step t0: the new carry and the metrics, shape (chunk, ...).

    A point whose state or loss goes non-finite records that step as its first bad one and
    reports NaN metrics from then on. Its state is not rolled back: nothing reads a diverged
    point's state, and choosing between the new and the old state of every point on every step
    rewrote the whole state once more (12% of workload W's step). Steps past `total` (in a last
    chunk that `total` does not fill) run, and their metrics are dropped with the padding.
    """

    def run(hp, carry, t0):
        hp = {**constant, **hp}

        def body(carry, i):
            state, bad = carry
            t = t0 + i
            state, metrics = trial.step(hp, state)
            metrics = jax.tree.map(jnp.asarray, metrics)  # a metric of constants may be a Python number
            ok = _all_finite(state) & _all_finite(metrics.get("loss", jnp.float32(0)))
            healthy = bad < 0
            bad = jnp.where((t < total) & healthy & ~ok, t, bad)
            return (state, bad), _silence(metrics, healthy)

        return jax.lax.scan(body, carry, jnp.arange(chunk, dtype=jnp.int32))

    return run


LANE_MULTIPLE = 8  # one AVX2 vector of float32: see lanes_per_device


def lanes_per_device(points: int, devices: int) -> int:
    """How many lanes (vmapped points) each device's program holds: a multiple of 8.

    XLA:CPU vectorises the vmapped (lane) axis 8 floats at a time, and the order in which it
    rounds a program's sums may depend on the lane count: measured on AVX2 with jaxlib 0.10.2
    (YNNPACK off, see gradlab/__init__.py), 2 to 128 lanes gave a point the same bits and 1 lane
    did not. A multiple of 8 keeps a point's numbers independent of how many devices, processes
    or other points share its program (1 and 4 devices agree bit for bit, and so does a sweep
    split into batches) with room to spare. Padding costs at most 7 idle lanes per device;
    padded lanes repeat the last point and are dropped from the results.
    """
    lanes = -(-max(points, 1) // devices)
    return -(-lanes // LANE_MULTIPLE) * LANE_MULTIPLE


def _pad(hp: dict, total: int) -> dict:
    n = len(next(iter(hp.values())))
    return {k: np.concatenate([v, np.repeat(v[-1:], total - n)]) for k, v in hp.items()}


def _put(tree, sharding):
    """Host arrays -> global arrays laid out by `sharding`; every process passes the same values."""
    return jax.tree.map(lambda a: jax.make_array_from_callback(a.shape, sharding, lambda index: a[index]), tree)


def _get(tree):
    """Global arrays -> host numpy arrays, gathered from every process when there are several."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        tree = multihost_utils.process_allgather(tree, tiled=True)
    return jax.tree.map(np.asarray, jax.device_get(tree))


def _same_on_every_process(value: int, what: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        seen = np.asarray(multihost_utils.process_allgather(np.int64(value)))
        if np.any(seen != seen[0]):
            raise ResultsError(f"the processes disagree on {what} ({sorted(set(seen.tolist()))}); "
                               "--out must be a folder every host sees, or rerun with --fresh")


def default_dims(name: str, shape: tuple) -> tuple[str, ...]:
    if len(shape) == 1:
        return ("layer",)
    return tuple(f"{name}_{i}" for i in range(len(shape)))


class CompiledGroup(NamedTuple):
    """A static group's compiled init and chunk programs, for batches of lanes x devices points.

    The whole group is one batch unless it did not fit in memory (fit_group).
    """

    init: Any
    chunk: Any
    carry_shape: Any
    sharding: NamedSharding
    varying: dict  # host values of the fields that vary over the group's points, unpadded
    lanes: int  # lanes per device in one batch
    compile_seconds: float

    @property
    def points(self) -> int:
        return len(next(iter(self.varying.values())))

    @property
    def batch(self) -> int:
        return self.lanes * self.sharding.mesh.size

    @property
    def batches(self) -> int:
        return -(-self.points // self.batch)

    def hp(self, b: int = 0):
        """The (padded, sharded) swept values of batch b."""
        part = {k: v[b * self.batch:(b + 1) * self.batch] for k, v in self.varying.items()}
        return _put(_pad(part, self.batch), self.sharding)


def compile_group(trial: Trial, hp_host: dict, steps: int, chunk: int, devices, lanes: int | None = None) -> CompiledGroup:
    """Lower and compile a group's init and chunk programs for `lanes` points per device (no step is run)."""
    mesh = jax.sharding.Mesh(np.asarray(devices), ("sweep",))
    sharding = NamedSharding(mesh, PartitionSpec("sweep"))
    varying, constant = split_hp(hp_host)
    varying = {k: np.asarray(v, jax.dtypes.canonicalize_dtype(np.asarray(v).dtype)) for k, v in varying.items()}
    lanes = lanes or lanes_per_device(len(hp_host["seed"]), len(devices))
    hp = {k: jax.ShapeDtypeStruct((lanes * len(devices),), v.dtype, sharding=sharding) for k, v in varying.items()}
    start = time.perf_counter()
    point_init = jax.vmap(_point_init(trial, constant))
    init = jax.jit(point_init, out_shardings=sharding).lower(hp).compile()
    carry_shape = jax.eval_shape(point_init, hp)
    carry_shape = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), carry_shape)
    chunk_fn = jax.jit(
        jax.vmap(_point_chunk(trial, chunk, steps, constant), in_axes=(0, 0, None)),
        out_shardings=(sharding, sharding),
        donate_argnums=(1,),
    )
    compiled = chunk_fn.lower(hp, carry_shape, jax.ShapeDtypeStruct((), jnp.int32)).compile()
    if devices[0].platform == "cpu":
        _warn_of_lapack(init, compiled)
    return CompiledGroup(init, compiled, carry_shape, sharding, varying, lanes, time.perf_counter() - start)


def _warn_of_lapack(*programs) -> None:
    """LapackOnCpuWarning, naming the kernels, if a compiled CPU program calls LAPACK."""
    kernels = sorted({k for p in programs for k in re.findall(r'custom_call_target="(lapack_\w+)"', p.as_text())})
    if kernels:
        warnings.warn(LapackOnCpuWarning(
            f"the sweep calls LAPACK on the CPU ({', '.join(kernels)}), whose batched kernels can hang two at a "
            "time in jaxlib 0.10; for orthogonal weights (flax's default recurrent init) pass "
            "gradlab.inits.orthogonal as the initializer"), stacklevel=3)


def program_bytes(compiled) -> int:
    """Bytes a compiled program holds on one device: arguments, outputs and temporaries."""
    memory = compiled.memory_analysis()
    if memory is None:
        return 0
    return sum(int(getattr(memory, f"{kind}_size_in_bytes", 0)) for kind in ("argument", "output", "temp"))


def group_bytes(group: CompiledGroup) -> int:
    return max(program_bytes(group.init), program_bytes(group.chunk))


def device_bytes(device) -> int | None:
    """Memory one device can give a program (free host RAM for a CPU device), if known."""
    stats = getattr(device, "memory_stats", lambda: None)()
    if stats and "bytes_limit" in stats:
        return int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    if device.platform == "cpu":
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // len(jax.local_devices(backend="cpu"))
        except (ValueError, OSError):
            return None
    return None


def available_bytes(devices) -> int | None:
    """The memory every device of the sweep can give (the least over the processes)."""
    mine = [d for d in devices if d.process_index == jax.process_index()] or list(devices)
    have = device_bytes(mine[0])
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        every = np.asarray(multihost_utils.process_allgather(np.int64(-1 if have is None else have)))
        have = None if np.any(every < 0) else int(every.min())
    return have


def fit_group(trial: Trial, hp_host: dict, steps: int, chunk: int, devices, memory: int | None = None) -> CompiledGroup:
    """Compile a group with as many lanes per device as fit in `memory` bytes per device.

    All points go in one batch when they fit; otherwise the group runs in batches of points, one
    compiled program for all of them, with a multiple of 8 lanes per device while 8 lanes fit (so
    the numbers do not change), fewer when not. SweepTooLarge when one lane does not fit.
    `memory` defaults to what the devices have free.
    """
    group = compile_group(trial, hp_host, steps, chunk, devices)
    have = memory if memory is not None else available_bytes(devices)
    if have is None:
        return group
    compile_seconds = group.compile_seconds
    while (need := group_bytes(group)) > have:
        if group.lanes == 1:
            raise SweepTooLarge(
                f"one point of the sweep needs {size(need)} per device but {size(have)} is free; "
                "shrink the model (model.width, model.depth, data.examples, batch size)"
            )
        guess = int(have // (need / group.lanes))  # need / lanes over-counts a lane's share: a safe guess
        lanes = min(group.lanes - 1, max(1, guess))
        if lanes >= LANE_MULTIPLE:
            lanes -= lanes % LANE_MULTIPLE
        group = compile_group(trial, hp_host, steps, chunk, devices, lanes)
        compile_seconds += group.compile_seconds
    return group._replace(compile_seconds=compile_seconds)


def size(n: float) -> str:
    """Bytes in the unit a person reads: 0.3 MiB, 2.1 GiB."""
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"


def split_note(group: CompiledGroup) -> str:
    exact = "bit-identical to one batch" if group.lanes % LANE_MULTIPLE == 0 else (
        f"{group.lanes} lanes per device, so the last bits may differ from an unsplit run")
    return (f"{group.points} points do not fit in memory at once: running {group.batches} batches of "
            f"{group.batch} points ({size(group_bytes(group))} per device each; {exact})")


def _checkpoint_arrays(t: int, carry, metrics: dict, points: int) -> dict:
    arrays = {"t": np.asarray(t)}
    for i, leaf in enumerate(jax.tree.leaves(_get(carry))):
        arrays[f"state_{i:04d}"] = leaf
    for name, chunks in metrics.items():
        arrays[f"metric.{name}"] = np.concatenate(chunks, axis=1) if chunks else np.zeros((points, 0))
    return arrays


def _restore(path: Path, group: CompiledGroup):
    arrays = results.load_checkpoint(path)
    leaves_shape, treedef = jax.tree.flatten(group.carry_shape)
    leaves = [arrays.get(f"state_{i:04d}") for i in range(len(leaves_shape))]
    if any(a is None or a.shape != s.shape for a, s in zip(leaves, leaves_shape)):
        raise ResultsError(f"{path}: checkpoint does not match this program; rerun with --fresh")
    carry = _put(jax.tree.unflatten(treedef, leaves), group.sharding)
    metrics = {k[len("metric."):]: [v] for k, v in arrays.items() if k.startswith("metric.")}
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
):
    """Run one static group to the end; returns (metrics (points, steps, ...), first bad step, compile s).

    Each batch of points checkpoints after every chunk (only process 0 writes; every process reads,
    so with several hosts --out must be a folder they all see).
    """
    group = compiled or fit_group(trial, hp_host, steps, chunk, devices)
    writer = jax.process_index() == 0
    merged, bad = {}, []
    for b in range(group.batches):
        path = batch_checkpoint(checkpoint, group, b)
        hp = group.hp(b)
        if path is not None and path.exists():
            t, carry, metrics = _restore(path, group)
        else:
            t, carry, metrics = 0, group.init(hp), {}
        _same_on_every_process(t, f"the checkpoint step of {path}")
        if on_chunk and t:
            on_chunk(t)
        while t < steps:
            carry, out = group.chunk(hp, carry, jnp.int32(t))
            n = min(chunk, steps - t)
            for name, value in _get(out).items():
                metrics.setdefault(name, []).append(value[:, :n])
            t += n
            if path is not None:
                arrays = _checkpoint_arrays(t, carry, metrics, group.batch)
                if writer:
                    results.save_checkpoint(path, arrays)
            if on_chunk:
                on_chunk(n)
        real = min(group.batch, group.points - b * group.batch)
        bad.append(_get(carry[1])[:real])
        for k, v in metrics.items():
            merged.setdefault(k, []).append(np.concatenate(v, axis=1)[:real])
    merged = {k: np.concatenate(v, axis=0) for k, v in merged.items()}
    return merged, np.concatenate(bad), group.compile_seconds


# The dims that index a model's parts, in order of preference: an MLP's layers, or the parameter
# leaves of a user's model (gradlab.usermodels). first_bad_layer indexes the first one present.
LAYER_DIMS = ("layer", "param")


def first_bad_layers(metrics: dict, dims: dict, bad_step: np.ndarray) -> np.ndarray:
    """The first layer with a non-finite statistic at each point's first bad step (-1: none)."""
    out = np.full(bad_step.shape, -1, np.int32)
    layer_dim = next((d for d in LAYER_DIMS if (d,) in dims.values()), None)
    layered = [m for name, m in metrics.items() if dims[name] == (layer_dim,)]
    for idx in np.ndindex(bad_step.shape):
        if bad_step[idx] < 0:
            continue
        at = [m[idx][bad_step[idx]] for m in layered]
        bad = np.zeros(at[0].shape, bool) if at else np.zeros(0, bool)
        for a in at:
            bad |= ~np.isfinite(a)
        if bad.any():
            out[idx] = int(np.argmax(bad))
    return out


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
        metrics, bad, seconds = run_group(trial, group.hp, steps, chunk, devices, ckpt, tick, compiled)
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
