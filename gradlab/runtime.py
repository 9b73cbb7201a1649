"""Runtime set-up of a run: XLA flags, host devices, the compilation cache, jax.distributed.

Nothing here runs on import. The CLI's `run` and `reproduce`, `gradlab.api.execute` and
`api.reproduce` call `setup()` before their first computation (the CLI also `distributed()`);
the tests and benchmarks call the parts they need. XLA reads XLA_FLAGS once, when jax starts
its backend, so flags and device counts set after that are left out, never half-applied.

Environment variables read (also in `ENVIRONMENT`, for the CLI's help):
  XLA_FLAGS                  XLA's own flags. gradlab adds --xla_cpu_experimental_ynn_fusion_type=
                             (where the installed jaxlib knows it) and
                             --xla_force_host_platform_device_count=N, unless they are named already.
  GRADLAB_CACHE_DIR          folder of gradlab's persistent compilation cache.
  XDG_CACHE_HOME             base of per-user caches when GRADLAB_CACHE_DIR is unset (default ~/.cache).
  JAX_COMPILATION_CACHE_DIR  jax's own compilation cache folder: where set, gradlab uses it as it is.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import sys
from importlib import metadata, util
from pathlib import Path

from gradlab.errors import SetupError

ENVIRONMENT = (
    ("XLA_FLAGS", "XLA's flags; gradlab adds the YNNPACK-off flag and the host device count unless named"),
    ("GRADLAB_CACHE_DIR", "folder of gradlab's compilation cache (default $XDG_CACHE_HOME/gradlab/jax)"),
    ("XDG_CACHE_HOME", "base of per-user caches (default ~/.cache)"),
    ("JAX_COMPILATION_CACHE_DIR", "jax's own compilation cache folder; where set, gradlab uses it as it is"),
)

YNN_FLAG = "xla_cpu_experimental_ynn_fusion_type"
DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"
# One XLA host device unless --devices says otherwise: one already keeps every core busy, and
# workload W ran no faster on 2 devices of a 2-core machine (README). The hangs once seen in C4
# rnn_bptt with 2 devices were most likely the one caught later with 1 device, in a debugger:
# jaxlib 0.10.2's batched LAPACK QR (flax's orthogonal init) deadlocking its own thread pool.
# rnn_bptt now calls no LAPACK.
DEFAULT_HOST_DEVICES = 1
MIN_CACHED_COMPILE_SECONDS = 0.5  # faster compiles are not worth a file
DISTRIBUTED_TIMEOUT_SECONDS = 120

_known_flags: dict[tuple[str, str], bool] = {}


def setup(devices: int | None = None, cache: bool = True) -> None:
    """What a run needs before its first computation: XLA flags, host devices, compilation cache.

    Flags and devices are left as they are once jax's backend has started; the cache still applies.

    Args:
      devices: CPU host devices to split the machine into (default `DEFAULT_HOST_DEVICES`).
      cache: whether to turn on the persistent compilation cache (`compilation_cache()`).
    """
    xla_cpu_defaults()
    host_devices(devices)
    if cache:
        compilation_cache()


def backend_started() -> bool:
    """Whether jax has started its backend, after which XLA_FLAGS and the device count are fixed."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    if bridge is None:
        return False
    started = getattr(bridge, "backends_are_initialized", None)
    if started is None:  # a jax without it: once imported, assume it is too late
        return True
    return bool(started())


def xla_cpu_defaults() -> None:
    """XLA:CPU without YNNPACK fusions, unless XLA_FLAGS names it or the jaxlib lacks the flag.

    jaxlib 0.10 hands dots with a batch dimension (every vmapped layer of a sweep) and reductions
    to YNNPACK. Its batched dots ran at 50 GFLOP/s where Eigen reaches 120 on the same 2-core CPU
    (workload W took 1.5x longer), and its reductions rounded differently once a program held 32
    or more sweep points, so a point's norms depended on how many points shared its device.
    Without it, 2 to 128 lanes give the same bits. A jaxlib that does not know a flag in XLA_FLAGS
    refuses to start, hence `xla_knows_flag`; after the backend started this does nothing.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "ynn_fusion_type" in flags or backend_started() or not xla_knows_flag(YNN_FLAG):
        return
    os.environ["XLA_FLAGS"] = f"{flags} --{YNN_FLAG}=".strip()


def xla_knows_flag(name: str) -> bool:
    """Whether every XLA library jax may load accepts `name` in XLA_FLAGS; found without loading one.

    A library that parses XLA_FLAGS holds the text "XLA_FLAGS" and each flag it registers as a C
    string. The flag's name also appears in DebugOptions' proto descriptor, even where the flag
    itself is gone, but there it is followed by a field tag, never by a NUL byte, so only the name
    followed by NUL counts (checked against what jaxlib 0.10.2 accepts and refuses for 33 names,
    13 of them descriptor-only). The scan takes 0.02-0.04 s where the flag is there (early in
    jaxlib 0.10.2's and 0.12's 330 MB library), 0.4 s where it is not (jaxlib 0.6.2), and is done
    once per jaxlib version in a process. No XLA library found: False, and XLA is left as it is.
    """
    try:
        version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return False
    key = (name, version)
    if key not in _known_flags:
        _known_flags[key] = _libraries_know(name, _xla_library_candidates())
    return _known_flags[key]


def _libraries_know(name: str, libraries: list[Path]) -> bool:
    """True where one library parses XLA_FLAGS and every one that does registers `name`."""
    flag, marker = name.encode() + b"\0", b"XLA_FLAGS"
    preceding = set(b"\0 -")  # a C string of its own, or the end of "--name" in a longer one
    parsers = 0
    for path in libraries:
        try:
            with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
                at = data.find(flag)
                while at > 0 and data[at - 1] not in preceding:
                    at = data.find(flag, at + 1)
                if data.find(marker) == -1:
                    continue  # no XLA_FLAGS parser in this one
                if at <= 0:
                    return False  # this XLA would refuse the flag
                parsers += 1
        except (OSError, ValueError):  # unreadable or empty: not a library jax can load either
            continue
    return parsers > 0


def _xla_library_candidates() -> list[Path]:
    """Shared libraries of jaxlib, of PJRT plugins (jax_plugins, entry points) and of libtpu."""
    packages = {"jaxlib", "jax_plugins", "libtpu"}
    try:
        packages |= {ep.value.split(":")[0].split(".")[0] for ep in metadata.entry_points(group="jax_plugins")}
    except Exception:  # noqa: BLE001 (a broken distribution's metadata must not stop a run)
        pass
    folders = set()
    for package in packages:
        try:
            spec = util.find_spec(package)  # top-level names only: nothing is imported
        except (ImportError, ValueError):
            continue
        if spec is not None:
            folders |= {Path(p).resolve() for p in spec.submodule_search_locations or ()}
    return sorted({p.resolve() for folder in folders for p in folder.rglob("*") if _is_library(p)})


def _is_library(path: Path) -> bool:
    name = path.name
    return (name.endswith((".so", ".dylib", ".pyd", ".dll")) or ".so." in name) and path.is_file()


def host_devices(n: int | None = None) -> None:
    """Split the CPU into n XLA devices (default `DEFAULT_HOST_DEVICES`); GPU and TPU runs ignore it.

    Raises:
      SetupError: n < 1; n given while XLA_FLAGS already sets a count; n given after jax's backend
        started with another CPU device count.
    """
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise SetupError(f"--devices must be >= 1, got {n!r}")
    flags = os.environ.get("XLA_FLAGS", "")
    if DEVICE_COUNT_FLAG in flags:
        if n is not None:
            raise SetupError(f"--devices conflicts with {DEVICE_COUNT_FLAG} in XLA_FLAGS")
        return
    if backend_started():
        if n is not None and n != _cpu_device_count():
            raise SetupError(
                f"{n} host devices asked for after jax's backend started; call "
                f"gradlab.runtime.host_devices({n}) before any jax computation"
            )
        return  # too late to change; the caller's process chose
    count = n if n is not None else DEFAULT_HOST_DEVICES
    os.environ["XLA_FLAGS"] = f"{flags} --{DEVICE_COUNT_FLAG}={count}".strip()


def _cpu_device_count() -> int:
    import jax

    try:
        return len(jax.local_devices(backend="cpu"))
    except RuntimeError:  # no CPU backend
        return 0


def default_cache_base() -> Path | None:
    """GRADLAB_CACHE_DIR, else $XDG_CACHE_HOME/gradlab/jax, else ~/.cache/gradlab/jax (None: no home)."""
    if os.environ.get("GRADLAB_CACHE_DIR"):
        return Path(os.environ["GRADLAB_CACHE_DIR"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "gradlab" / "jax"
    try:
        return Path.home() / ".cache" / "gradlab" / "jax"
    except (RuntimeError, KeyError):  # no home folder to be found
        return None


def cache_folder(base: Path | None = None) -> Path | None:
    """The cache's folder for this jax version and XLA_FLAGS, under `base` (default_cache_base()).

    An executable compiled under other flags (another host device count, YNNPACK on) is never
    loaded by a run under these.
    """
    base = base if base is not None else default_cache_base()
    if base is None:
        return None
    try:
        jax_version = metadata.version("jax")
    except metadata.PackageNotFoundError:
        jax_version = "unknown"
    flags = " ".join(sorted(os.environ.get("XLA_FLAGS", "").split()))
    return Path(base) / f"jax-{jax_version}-{hashlib.sha256(flags.encode()).hexdigest()[:12]}"


def compilation_cache(folder: str | os.PathLike | None = None) -> Path | None:
    """Reruns skip XLA compilation: a persistent compilation cache, unless the user chose one.

    A cache folder set already (JAX_COMPILATION_CACHE_DIR, jax.config's jax_compilation_cache_dir)
    or jax's cache turned off (jax_enable_compilation_cache) is left as it is. A folder that cannot
    be written means no cache: slower, not wrong.

    Args:
      folder: where to keep it (default `cache_folder()`, one per user, jax version and XLA_FLAGS).

    Returns:
      The folder jax's cache uses now, or None where there is none.
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache as jax_cache

    # jax.config's options are attributes it sets at runtime, which its stubs cannot name.
    if not jax.config.jax_enable_compilation_cache:  # pyright: ignore[reportAttributeAccessIssue]
        return None
    configured = jax.config.jax_compilation_cache_dir  # pyright: ignore[reportAttributeAccessIssue]
    chosen = os.environ.get("JAX_COMPILATION_CACHE_DIR") or configured
    if chosen:
        return Path(chosen)
    folder = Path(folder) if folder is not None else cache_folder()
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    if not os.access(folder, os.W_OK | os.X_OK):
        return None
    jax_cache.set_cache_dir(str(folder))  # jax opens it at the next compile, even after earlier ones
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_CACHED_COMPILE_SECONDS)
    return folder


def distributed(
    coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None
) -> bool:
    """Join a jax.distributed cluster when a coordinator is given (before jax touches a device).

    Args:
      coordinator: HOST:PORT of process 0, the same on every host.
      num_processes: how many processes take part.
      process_id: this process, 0 to num_processes - 1.

    Returns:
      Whether this process joined a cluster (False when none of the three is given).

    Raises:
      SetupError: some but not all three given, a malformed address or id, or no coordinator answering.
    """
    given = {"--coordinator": coordinator, "--num-processes": num_processes, "--process-id": process_id}
    if all(v is None for v in given.values()):
        return False
    if coordinator is None or num_processes is None or process_id is None:
        missing = [k for k, v in given.items() if v is None]
        raise SetupError(
            f"several hosts need --coordinator, --num-processes and --process-id together; missing {', '.join(missing)}"
        )
    host, _, port = coordinator.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise SetupError(f"--coordinator must be HOST:PORT (e.g. 10.0.0.1:8476), got {coordinator!r}")
    if num_processes < 1:
        raise SetupError(f"--num-processes must be >= 1, got {num_processes}")
    if not 0 <= process_id < num_processes:
        raise SetupError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
    import jax

    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk through gloo
    except (AttributeError, ValueError):
        pass
    try:
        jax.distributed.initialize(
            coordinator, num_processes, process_id, initialization_timeout=DISTRIBUTED_TIMEOUT_SECONDS
        )
    except Exception as e:  # jaxlib raises its own runtime errors; the first line says what went wrong
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise SetupError(f"could not join the coordinator at {coordinator}: {first}") from None
    return True
