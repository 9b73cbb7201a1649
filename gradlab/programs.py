"""A static group's compiled programs: the vmapped, sharded init and chunk of a Trial, how many
lanes each device holds, and how many fit in its memory.

The engine (gradlab.engine) runs these programs chunk by chunk; this module only builds them.
"""

from __future__ import annotations

import os
import re
import time
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from gradlab import sums
from gradlab.errors import LapackOnCpuWarning, ResultsError, SweepTooLarge

if TYPE_CHECKING:
    from gradlab.engine import Trial


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
    return jax.tree.map(
        lambda m: jnp.where(healthy, m, jnp.nan) if jnp.issubdtype(m.dtype, jnp.inexact) else m, metrics
    )


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
    (YNNPACK off, see gradlab.runtime), 2 to 128 lanes gave a point the same bits and 1 lane
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
            raise ResultsError(
                f"the processes disagree on {what} ({sorted(set(seen.tolist()))}); "
                "--out must be a folder every host sees, or rerun with --fresh"
            )


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
        part = {k: v[b * self.batch : (b + 1) * self.batch] for k, v in self.varying.items()}
        return _put(_pad(part, self.batch), self.sharding)


def compile_group(
    trial: Trial, hp_host: dict, steps: int, chunk: int, devices, lanes: int | None = None
) -> CompiledGroup:
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
        warnings.warn(
            LapackOnCpuWarning(
                f"the sweep calls LAPACK on the CPU ({', '.join(kernels)}), whose batched kernels can hang two at a "
                "time in jaxlib 0.10; for orthogonal weights (flax's default recurrent init) pass "
                "gradlab.inits.orthogonal as the initializer"
            ),
            stacklevel=3,
        )


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
    exact = (
        "bit-identical to one batch"
        if group.lanes % LANE_MULTIPLE == 0
        else (f"{group.lanes} lanes per device, so the last bits may differ from an unsplit run")
    )
    return (
        f"{group.points} points do not fit in memory at once: running {group.batches} batches of "
        f"{group.batch} points ({size(group_bytes(group))} per device each; {exact})"
    )
