"""A static group's compiled programs: the vmapped init and chunk of a Trial, compiled once per
device, how many lanes each device holds, and how many fit in its memory.

Every device runs its own single-device program over its own block of lanes: one program
partitioned over several devices (a sharded jit, shard_map or pmap) rounded some sums differently
from the same program on one device (measured with jaxlib 0.10.2 on XLA:CPU), so a point's bits
depended on the device count. A block of lanes runs the same code whatever the device count.

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
    did not. A multiple of 8, in one single-device program per device (compile_group), keeps a
    point's numbers independent of how many devices, processes or other points share its
    program (1, 2 and 4 devices agree bit for bit after training steps, and so does a sweep
    split into batches) with room to spare. Padding costs at most 7 idle lanes per device;
    padded lanes repeat the last point and are dropped from the results.
    """
    lanes = -(-max(points, 1) // devices)
    return -(-lanes // LANE_MULTIPLE) * LANE_MULTIPLE


def _pad(hp: dict, total: int) -> dict:
    n = len(next(iter(hp.values())))
    return {k: np.concatenate([v, np.repeat(v[-1:], total - n)]) for k, v in hp.items()}


def _get(tree):
    """Device arrays -> host numpy arrays."""
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


class OnEachDevice:
    """The same program compiled for each local device; called with one argument list per device.

    A plain argument (not a list) goes to every device. `as_text`, `cost_analysis` and
    `memory_analysis` are those of one device's program (they are all the same program).
    """

    def __init__(self, programs):
        self.programs = tuple(programs)

    def __call__(self, *args):
        return [p(*(a[i] if isinstance(a, list) else a for a in args)) for i, p in enumerate(self.programs)]

    def __getattr__(self, name):
        return getattr(self.programs[0], name)


def ordered(devices) -> list:
    """Devices in the order their lanes take in a batch: by process, then id (the same on every process)."""
    return sorted(devices, key=lambda d: (d.process_index, d.id))


class CompiledGroup(NamedTuple):
    """A static group's compiled init and chunk programs, for batches of lanes x devices points.

    Device i of `devices` holds lanes [i * lanes, (i + 1) * lanes) of each batch. The whole group
    is one batch unless it did not fit in memory (fit_group).
    """

    init: OnEachDevice
    chunk: OnEachDevice
    carry_shape: Any  # one device's carry: leaves (lanes, ...)
    devices: tuple  # every device of the sweep, in lane order (ordered)
    varying: dict  # host values of the fields that vary over the group's points, unpadded
    lanes: int  # lanes per device in one batch
    compile_seconds: float

    @property
    def points(self) -> int:
        return len(next(iter(self.varying.values())))

    @property
    def batch(self) -> int:
        return self.lanes * len(self.devices)

    @property
    def batches(self) -> int:
        return -(-self.points // self.batch)

    @property
    def local(self) -> list[int]:
        """Positions in `devices` of this process's devices."""
        return [i for i, d in enumerate(self.devices) if d.process_index == jax.process_index()]

    def hp(self, b: int = 0) -> list:
        """The swept values of batch b (padded), one dict per local device."""
        part = {k: v[b * self.batch : (b + 1) * self.batch] for k, v in self.varying.items()}
        return self.put(_pad(part, self.batch))

    def put(self, tree) -> list:
        """Host arrays of a whole batch (rows = lanes) -> each local device's block of them."""
        rows = [(slice(i * self.lanes, (i + 1) * self.lanes), self.devices[i]) for i in self.local]
        return [jax.tree.map(lambda a, at=at, on=on: jax.device_put(a[at], on), tree) for at, on in rows]

    def gather(self, blocks: list):
        """Each local device's block -> host arrays of the whole batch, from every process."""
        host = jax.tree.map(lambda *parts: np.concatenate(parts), *[_get(b) for b in blocks])
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            host = _get(multihost_utils.process_allgather(host, tiled=True))
        return host

    def advance(self, hp: list, carry: list, t: int) -> tuple[list, list]:
        """One chunk from step t on every local device: (carries, metrics), one per device."""
        done = self.chunk(hp, carry, np.int32(t))
        return [c for c, _ in done], [m for _, m in done]


def compile_group(
    trial: Trial, hp_host: dict, steps: int, chunk: int, devices, lanes: int | None = None
) -> CompiledGroup:
    """Lower a group's init and chunk programs for `lanes` points per device and compile them for
    each local device (the compiles run side by side; no step is run)."""
    from concurrent.futures import ThreadPoolExecutor

    devices = ordered(devices)
    local = [d for d in devices if d.process_index == jax.process_index()]
    varying, constant = split_hp(hp_host)
    varying = {k: np.asarray(v, jax.dtypes.canonicalize_dtype(np.asarray(v).dtype)) for k, v in varying.items()}
    lanes = lanes or lanes_per_device(len(hp_host["seed"]), len(devices))
    point_init = jax.vmap(_point_init(trial, constant))
    point_chunk = jax.vmap(_point_chunk(trial, chunk, steps, constant), in_axes=(0, 0, None))
    start = time.perf_counter()
    lowered, carry_shape = [], None
    for device in local:
        on = jax.sharding.make_single_device_sharding(device)
        hp = {k: jax.ShapeDtypeStruct((lanes,), v.dtype, sharding=on) for k, v in varying.items()}
        shape = jax.eval_shape(point_init, hp)
        shape = jax.tree.map(lambda s, on=on: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=on), shape)
        carry_shape = carry_shape or shape
        t0 = jax.ShapeDtypeStruct((), jnp.int32, sharding=on)
        lowered.append(jax.jit(point_init).lower(hp))
        lowered.append(jax.jit(point_chunk, donate_argnums=(1,)).lower(hp, shape, t0))
    with ThreadPoolExecutor(max(1, min(len(lowered), os.cpu_count() or 1))) as pool:
        programs = list(pool.map(lambda program: program.compile(), lowered))
    init, compiled = OnEachDevice(programs[0::2]), OnEachDevice(programs[1::2])
    if local[0].platform == "cpu":
        _warn_of_lapack(init, compiled)
    return CompiledGroup(init, compiled, carry_shape, tuple(devices), varying, lanes, time.perf_counter() - start)


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
    """Bytes in the unit a person reads: 512 bytes, 3.0 KiB, 0.3 MiB, 2.1 GiB (never a 0.0 for a nonzero size)."""
    if n >= 2**30:
        return f"{n / 2**30:.2f} GiB"
    if n >= 2**20:
        return f"{n / 2**20:.1f} MiB"
    return f"{n / 2**10:.1f} KiB" if n >= 2**10 else f"{int(n)} bytes"


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
