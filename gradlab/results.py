"""Run folders and labelled results: atomic writes, resume, provenance. Imports no jax.

A run folder is `<out>/runs/<experiment>-<config hash>/` holding
  config.yaml     the resolved config
  results.nc      an xarray Dataset (netCDF via h5netcdf), written once the sweep is done
  ckpt/           per-group checkpoints while the sweep runs (removed after results.nc lands)
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import zipfile
import zlib
from importlib import metadata
from pathlib import Path

import numpy as np
import xarray as xr

from gradlab.errors import ResultsError

RESULTS_FORMAT = 2  # 2: experiments' reference numbers stored as ref.<name> variables
_UMASK = os.umask(0)
os.umask(_UMASK)
RESULTS_FILE = "results.nc"


def run_dir(out: str | os.PathLike, experiment: str, config_hash: str) -> Path:
    return Path(out) / "runs" / f"{experiment}-{config_hash}"


def ensure_dir(path: Path) -> Path:
    """Create a folder (and parents) we can write into, or raise ResultsError saying why."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ResultsError(f"{path}: exists and is not a folder; choose another --out") from None
    except OSError as e:
        raise ResultsError(f"{path}: cannot create the output folder ({e.strerror}); choose another --out") from None
    if not path.is_dir():
        raise ResultsError(f"{path}: exists and is not a folder; choose another --out")
    if not os.access(path, os.W_OK | os.X_OK):
        raise ResultsError(f"{path}: the output folder is not writable; choose another --out")
    return path


def os_error_in(error: BaseException | None) -> OSError | None:
    """The OSError behind an exception, if any: one raised while handling it counts (matplotlib
    raises AttributeError while it handles a full disk)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, OSError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync it, then rename over `path`; never leaves a partial file.

    Any OSError (a full disk, a read-only or unwritable folder, a name too long), even one that
    the writer turned into another exception, becomes one ResultsError line.
    """
    path = Path(path)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; a result is as readable as any file
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            _remove(tmp)
        cause = os_error_in(e)
        if cause is None or isinstance(e, KeyboardInterrupt):
            raise
        raise ResultsError(
            f"{path}: could not be written ({cause.strerror or cause}); the previous file is untouched"
        ) from None
    try:
        dir_fd = os.open(path.parent, os.O_RDONLY)
        os.fsync(dir_fd)
        os.close(dir_fd)
    except OSError:
        pass


def _remove(path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def remove_stale_temporaries(run: Path) -> list[Path]:
    """Delete the temporary files a killed writer left in a run folder (ours only: `.NAME.*.tmp`)."""
    removed = []
    for folder in (run, run / "ckpt"):
        for tmp in folder.glob(".*.tmp") if folder.is_dir() else []:
            _remove(tmp)
            removed.append(tmp)
    return removed


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def checksum(arrays: dict[str, np.ndarray]) -> str:
    """A CRC-32 of every array's name, dtype, shape and bytes, in name order."""
    crc = 0
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        crc = zlib.crc32(f"{name}:{a.dtype.str}:{a.shape}".encode(), crc)
        crc = zlib.crc32(a.tobytes(), crc)
    return f"{crc:08x}"


def save_checkpoint(path: Path, arrays: dict[str, np.ndarray], meta: dict | None = None) -> None:
    """Write a checkpoint atomically with `meta` (what it belongs to) and a checksum of its arrays."""
    meta = {**(meta or {}), "checksum": checksum(arrays)}

    def write(tmp):
        with open(tmp, "wb") as f:
            # numpy's stub matches **arrays against savez's allow_pickle: bool.
            np.savez(f, **arrays, meta=np.asarray(json.dumps(meta, sort_keys=True)))  # pyright: ignore[reportArgumentType]

    atomic_write(path, write)


def read_checkpoint(path: Path) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, meta) of a checkpoint whose checksum holds; ResultsError for one unreadable or damaged."""
    try:  # our own handle: np.load leaks its file when the zip is damaged (a ResourceWarning)
        with open(path, "rb") as handle, np.load(handle, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as e:  # BadZipFile: a truncated checkpoint
        raise ResultsError(f"{path}: checkpoint is unreadable ({type(e).__name__}); rerun with --fresh") from None
    try:
        meta = json.loads(str(arrays.pop("meta")))
    except (KeyError, ValueError):
        raise ResultsError(f"{path}: checkpoint is unreadable (no config hash, version or checksum)") from None
    if not isinstance(meta, dict) or meta.get("checksum") != checksum(arrays):
        raise ResultsError(f"{path}: checkpoint is unreadable (its checksum does not match its contents)")
    return arrays, meta


def load_checkpoint(path: Path) -> dict[str, np.ndarray]:
    """The arrays of a checkpoint whose checksum holds (read_checkpoint without its meta)."""
    return read_checkpoint(path)[0]


def versions() -> dict[str, str]:
    """{"version_<package>": version} of gradlab and the libraries its numbers depend on."""
    from gradlab import __version__

    found = {"version_gradlab": __version__}
    for package in ("jax", "jaxlib", "optax", "numpy", "xarray"):
        try:
            found[f"version_{package}"] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[f"version_{package}"] = "unknown"
    return found


def provenance(command: str | None = None) -> dict[str, str]:
    """Versions, command line, git commit: what makes a result reproducible."""
    info = {"command": command if command is not None else " ".join(sys.argv), "python": platform.python_version()}
    info.update(versions())
    flags = os.environ.get("XLA_FLAGS", "")
    info["xla_flags"] = flags
    info["deterministic_ops"] = _deterministic_ops(flags)
    info["git_commit"] = _git_commit()
    return info


def _deterministic_ops(flags: str) -> str:
    """Whether XLA was asked for deterministic GPU kernels ("true"/"false"); the CPU always is."""
    for flag in flags.split():
        if flag.startswith("--xla_gpu_deterministic_ops="):
            return flag.split("=", 1)[1].lower()
    return "false"


def _git_commit() -> str:
    here = Path(__file__).resolve().parent.parent
    if not (here / ".git").exists():
        return ""
    try:
        out = subprocess.run(["git", "-C", str(here), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        return out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def build_dataset(
    sweep, spec_dict: dict, config_hash: str, extra_attrs: dict | None = None, reference: dict | None = None
) -> xr.Dataset:
    """An xarray Dataset with dims (*sweep axes, step, ...), provenance in its attrs.

    `reference` holds numbers computed once for the whole run (an experiment's `reference(cfg)`),
    stored as variables "ref.<name>" with dims "ref.<name>.<i>" of their own.
    """
    axis_names = [name for name, _ in sweep.axes]
    coords = {name: np.asarray(values) for name, values in sweep.axes}
    data_vars = {}
    for name, array in sweep.metrics.items():
        dims = axis_names + ["step"] + list(sweep.metric_dims[name])
        data_vars[name] = (dims, array)
    steps = next(iter(sweep.metrics.values())).shape[len(axis_names)] if sweep.metrics else 0
    coords["step"] = np.arange(steps)
    layers = [a.shape[-1] for n, a in sweep.metrics.items() if sweep.metric_dims[n][-1:] == ("layer",)]
    if layers:
        coords["layer"] = np.arange(max(layers))
    data_vars["first_bad_step"] = (axis_names, sweep.first_bad_step)
    data_vars["first_bad_layer"] = (axis_names, sweep.first_bad_layer)
    data_vars["diverged"] = (axis_names, sweep.first_bad_step >= 0)
    for name, value in (reference or {}).items():
        value = np.asarray(value)
        data_vars[f"ref.{name}"] = ([f"ref.{name}.{i}" for i in range(value.ndim)], value)
    ds = xr.Dataset(data_vars, coords=coords)
    ds.attrs.update(
        experiment=spec_dict["experiment"],
        scale=spec_dict["scale"],
        config_hash=config_hash,
        config=json.dumps(spec_dict, sort_keys=True),
        results_format=RESULTS_FORMAT,
        device_kind=sweep.device_kind,
        device_count=sweep.device_count,
        process_count=sweep.processes,
        notes="\n".join(sweep.notes),
        compile_seconds=sweep.compile_seconds,
        run_seconds=sweep.run_seconds,
        static_groups=sweep.groups,
        **provenance(),
        **(extra_attrs or {}),
    )
    return ds


def save(ds: xr.Dataset, path: Path) -> None:
    """Write ds as netCDF: encoded in memory first, so a full disk meets a plain file write (one
    line) and never an HDF5 file half open (whose clean-up at exit could crash the process)."""
    encoded = ds.to_netcdf(engine="h5netcdf")  # a memoryview of xarray's buffer on current xarray
    data = bytes(encoded)
    if isinstance(encoded, memoryview):
        encoded.release()  # else the buffer, still exported, complains when it is freed at exit (Python 3.13)
    atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def load(run: str | os.PathLike) -> xr.Dataset:
    """The Dataset of a run folder (or a results file), loaded into memory."""
    path = Path(run)
    if path.is_dir():
        path = path / RESULTS_FILE
    if not path.exists():
        raise ResultsError(f"{path}: no results here (run the experiment first)")
    try:
        ds = xr.load_dataset(path, engine="h5netcdf")
    except Exception as e:  # h5py/netCDF raise many types for a damaged file
        raise ResultsError(
            f"{path}: results file is corrupt or truncated ({type(e).__name__}); rerun with --fresh"
        ) from None
    version = ds.attrs.get("results_format")
    if version != RESULTS_FORMAT:
        raise OtherFormatError(
            f"{path}: results format {version} was written by another gradlab"
            f" (this one reads {RESULTS_FORMAT}); rerun with --fresh"
        )
    return ds


class OtherFormatError(ResultsError):
    """A results file of another results format (made by an older or newer gradlab)."""


VERSIONED = ("gradlab", "jax", "jaxlib")  # a stored result made under others is reused with a note


def version_note(ds: xr.Dataset) -> str:
    """One line when ds was made by another gradlab, jax or jaxlib than this one; "" otherwise."""
    now = versions()  # not provenance(): no git subprocess on every reuse
    moved = [
        f"{p} {ds.attrs.get(f'version_{p}', 'unknown')} (now {now[f'version_{p}']})"
        for p in VERSIONED
        if ds.attrs.get(f"version_{p}") != now[f"version_{p}"]
    ]
    if not moved:
        return ""
    return f"reusing results stored by {', '.join(moved)}; --fresh runs it again"


def config_of(ds: xr.Dataset) -> dict:
    return json.loads(ds.attrs["config"])


def run_config(ds: xr.Dataset) -> dict:
    """The resolved config of the run that made ds, as nested dicts (what config.yaml holds)."""
    return config_of(ds)["config"]


def with_axes(ds: xr.Dataset, names: list[str]) -> xr.Dataset:
    """ds with every named sweep axis as a dim: one not swept becomes a length-1 dim at its value.

    Figures and checks index by axis name whether or not the user swept it.
    """
    spec = config_of(ds)
    reference = [name for name in ds.data_vars if str(name).startswith("ref.")]
    kept = ds[reference]
    ds = ds.drop_vars(reference)
    for name in names:
        if name not in ds.dims:
            value = spec["config"]
            for part in name.split("."):
                value = value[part]
            ds = ds.expand_dims({name: [value]})
    return ds.merge(kept)  # reference numbers keep their own dims


def clear_checkpoints(run: Path) -> None:
    shutil.rmtree(run / "ckpt", ignore_errors=True)


LOCK_FILE = ".lock"


class RunLock:
    """An OS lock (flock) on a run folder while a process writes it; the OS releases it when the
    process exits, however it exits. A second writer is refused in one line (ResultsError)."""

    def __init__(self, run: Path):
        self.run = Path(run)
        self.fd: int | None = None

    def __enter__(self) -> RunLock:
        import fcntl

        path = self.run / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666 & ~_UMASK)
        except OSError as e:
            raise ResultsError(f"{path}: cannot open the run folder's lock ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ResultsError(
                f"{self.run}: another gradlab process (pid {holder}) is writing this run; "
                "wait for it to finish (a rerun then reuses its results)"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the last descriptor releases the lock
            self.fd = None


def locked(run: Path) -> bool:
    """Whether another process holds the run folder's lock."""
    import fcntl

    try:
        fd = os.open(Path(run) / LOCK_FILE, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except OSError:
        return True
    finally:
        os.close(fd)


def remove_orphaned_checkpoints(out: str | os.PathLike) -> list[Path]:
    """Delete the ckpt/ folders of finished runs (results.nc present) that no process is writing:
    a run killed between storing its results and clearing its checkpoints leaves one behind."""
    removed = []
    for ckpt in sorted(Path(out).glob("runs/*/ckpt")):
        run = ckpt.parent
        if (run / RESULTS_FILE).exists() and not locked(run):
            clear_checkpoints(run)
            removed.append(ckpt)
    return removed
