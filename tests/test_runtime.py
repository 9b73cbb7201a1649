"""Runtime set-up: XLA flags only where the jaxlib knows them, host devices, the compilation cache.

What depends on a fresh process (XLA_FLAGS read when jax starts, jax.config's cache folder) runs
in `python -c` subprocesses with a clean environment; the rest patches os.environ in-process.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from gradlab import runtime
from gradlab.errors import GradlabError, SetupError

REPO = Path(__file__).resolve().parents[1]
YNN = f"--{runtime.YNN_FLAG}="


def python(code: str, tmp_path: Path, **env) -> dict:
    """Run `code` in a fresh interpreter with PATH, HOME and `env` only; its last line of output, as JSON."""
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path / "home"), "JAX_PLATFORMS": "cpu", **env}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=clean, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def fresh(monkeypatch):
    """os.environ without XLA_FLAGS, as if jax had not started its backend and knew the YNNPACK flag."""
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    monkeypatch.setattr(runtime, "backend_started", lambda: False)
    monkeypatch.setattr(runtime, "xla_knows_flag", lambda name: True)
    return monkeypatch


def test_ynn_flag_is_added_once(fresh):
    runtime.xla_cpu_defaults()
    runtime.xla_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == YNN
    runtime.setup(cache=False)
    assert os.environ["XLA_FLAGS"].split().count(YNN) == 1


def test_ynn_flag_is_not_added_where_jaxlib_lacks_it_or_jax_started(fresh):
    fresh.setattr(runtime, "xla_knows_flag", lambda name: False)
    runtime.xla_cpu_defaults()
    assert "XLA_FLAGS" not in os.environ
    fresh.setattr(runtime, "xla_knows_flag", lambda name: True)
    fresh.setattr(runtime, "backend_started", lambda: True)
    runtime.xla_cpu_defaults()
    assert "XLA_FLAGS" not in os.environ


@pytest.mark.parametrize("flags", [f"--{runtime.YNN_FLAG}=dot", "--xla_dump_to=/tmp/x --xla_cpu_ynn_fusion_type_x=1"])
def test_a_ynn_setting_in_xla_flags_is_respected(fresh, flags):
    fresh.setenv("XLA_FLAGS", flags)
    runtime.xla_cpu_defaults()
    assert os.environ["XLA_FLAGS"] == flags


def test_the_flag_added_is_one_the_installed_jaxlib_accepts(tmp_path):
    """In a fresh process: added exactly where the scan finds it, and jax then starts and computes."""
    out = python(
        "import json, os; from gradlab import runtime; runtime.xla_cpu_defaults(); runtime.xla_cpu_defaults()\n"
        "import jax, jax.numpy as jnp; total = float(jax.jit(jnp.sum)(jnp.ones(8)))\n"
        "print(json.dumps([os.environ.get('XLA_FLAGS', ''), runtime.xla_knows_flag(runtime.YNN_FLAG), total]))",
        tmp_path,
    )
    flags, known, total = out
    assert flags.split().count(YNN) == (1 if known else 0) and total == 8.0


def test_the_scan_knows_real_flags_and_not_made_up_ones():
    assert runtime.xla_knows_flag("xla_dump_to")  # every XLA since its first jaxlib
    assert not runtime.xla_knows_flag("xla_cpu_no_such_flag_at_all")


def _library(folder: Path, name: str, body: bytes) -> Path:
    path = folder / name
    path.write_bytes(b"\x7fELF" + bytes(64) + body + bytes(64))
    return path


def test_the_scan_counts_registered_flags_not_proto_field_names(tmp_path):
    """A flag is a NUL-terminated C string; a DebugOptions field (even one no longer a flag) is not."""
    registered = _library(tmp_path, "a.so", b"XLA_FLAGS\0Help text.\0xla_new_flag\0xla_other\0")
    descriptor = _library(tmp_path, "b.so", b"XLA_FLAGS\0\x12R\n\x0bxla_new_flag\x18\xa6\x03 \x03(\x0e")
    dashed = _library(tmp_path, "c.so", b"XLA_FLAGS\0set --xla_new_flag\0")
    longer = _library(tmp_path, "d.so", b"XLA_FLAGS\0not_xla_new_flag\0")
    unrelated = _library(tmp_path, "e.so", b"no xla here\0")
    assert runtime._libraries_know("xla_new_flag", [registered, unrelated])
    assert runtime._libraries_know("xla_new_flag", [dashed])
    assert not runtime._libraries_know("xla_new_flag", [descriptor])
    assert not runtime._libraries_know("xla_new_flag", [longer])
    assert not runtime._libraries_know("xla_new_flag", [registered, descriptor])  # every XLA must know it
    assert not runtime._libraries_know("xla_new_flag", [unrelated])  # no XLA found: leave XLA alone
    assert not runtime._libraries_know("xla_new_flag", [tmp_path / "missing.so"])


def test_import_gradlab_leaves_xla_flags_unchanged(tmp_path):
    code = (
        "import json, os; import gradlab, gradlab.api, gradlab.cli, gradlab.runtime\n"
        "print(json.dumps(os.environ.get('XLA_FLAGS')))"
    )
    assert python(code, tmp_path) is None
    assert python(code, tmp_path, XLA_FLAGS="--xla_dump_to=/nowhere") == "--xla_dump_to=/nowhere"


def test_host_devices_sets_the_count_once_and_refuses_bad_input(fresh):
    with pytest.raises(SetupError, match=r"--devices must be >= 1, got 0"):
        runtime.host_devices(0)
    runtime.host_devices(3)
    assert os.environ["XLA_FLAGS"] == f"--{runtime.DEVICE_COUNT_FLAG}=3"
    runtime.host_devices()  # the count in XLA_FLAGS stands
    assert os.environ["XLA_FLAGS"] == f"--{runtime.DEVICE_COUNT_FLAG}=3"
    with pytest.raises(SetupError, match="--devices conflicts with xla_force_host_platform_device_count"):
        runtime.host_devices(4)
    assert issubclass(SetupError, GradlabError)


def test_host_devices_default_and_after_the_backend_started(fresh):
    runtime.host_devices()
    assert os.environ["XLA_FLAGS"] == f"--{runtime.DEVICE_COUNT_FLAG}={runtime.DEFAULT_HOST_DEVICES}"
    fresh.delenv("XLA_FLAGS")
    fresh.setattr(runtime, "backend_started", lambda: True)
    fresh.setattr(runtime, "_cpu_device_count", lambda: 2)  # this process's backend stays as it is
    runtime.host_devices()  # too late, and nothing asked for: left as it is
    runtime.host_devices(2)  # too late, but what it asks for is there
    assert "XLA_FLAGS" not in os.environ
    with pytest.raises(SetupError, match="3 host devices asked for after jax's backend started"):
        runtime.host_devices(3)


def test_cache_folder_changes_with_xla_flags_and_not_with_their_order(monkeypatch, tmp_path):
    monkeypatch.setenv("XLA_FLAGS", "--a=1 --b=2")
    first = runtime.cache_folder(tmp_path)
    monkeypatch.setenv("XLA_FLAGS", "--b=2 --a=1")
    assert runtime.cache_folder(tmp_path) == first
    monkeypatch.setenv("XLA_FLAGS", "--a=1 --b=3")
    assert runtime.cache_folder(tmp_path) != first
    assert first.parent == tmp_path and first.name.startswith("jax-")


def test_cache_base_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("GRADLAB_CACHE_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert runtime.default_cache_base() == tmp_path / "xdg" / "gradlab" / "jax"
    monkeypatch.setenv("GRADLAB_CACHE_DIR", str(tmp_path / "mine"))
    assert runtime.default_cache_base() == tmp_path / "mine"
    monkeypatch.delenv("GRADLAB_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert runtime.default_cache_base() == tmp_path / "home" / ".cache" / "gradlab" / "jax"


CACHE = (
    "import json, jax; from gradlab import runtime\n"
    "chosen = runtime.compilation_cache()\n"
    "print(json.dumps([str(chosen) if chosen else None, jax.config.jax_compilation_cache_dir]))"
)


def test_compilation_cache_goes_to_gradlab_cache_dir(tmp_path):
    chosen, in_jax = python(CACHE, tmp_path, GRADLAB_CACHE_DIR=str(tmp_path / "ours"))
    assert chosen == in_jax and Path(chosen).parent == tmp_path / "ours" and Path(chosen).is_dir()


def test_a_users_jax_compilation_cache_dir_is_respected(tmp_path):
    user = str(tmp_path / "users")
    assert python(CACHE, tmp_path, JAX_COMPILATION_CACHE_DIR=user, GRADLAB_CACHE_DIR=str(tmp_path / "ours")) == [
        user,
        user,
    ]
    assert not (tmp_path / "ours").exists()
    code = f"import jax; jax.config.update('jax_compilation_cache_dir', {user!r})\n" + CACHE
    assert python(code, tmp_path, GRADLAB_CACHE_DIR=str(tmp_path / "ours")) == [user, user]
    assert not (tmp_path / "ours").exists()


def test_an_unwritable_cache_folder_means_no_cache(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("")
    assert python(CACHE, tmp_path, GRADLAB_CACHE_DIR=str(a_file / "cache")) == [None, None]


@pytest.mark.parametrize(
    "args, message",
    [
        (("10.0.0.1:8476", None, None), "missing --num-processes, --process-id"),
        (("localhost", 2, 0), "--coordinator must be HOST:PORT"),
        (("localhost:99999", 2, 0), "--coordinator must be HOST:PORT"),
        (("localhost:8476", 0, 0), "--num-processes must be >= 1, got 0"),
        (("localhost:8476", 2, 2), r"--process-id must be in 0\.\.1, got 2"),
    ],
)
def test_distributed_checks_its_arguments_before_joining(args, message):
    with pytest.raises(SetupError, match=message):
        runtime.distributed(*args)
    assert runtime.distributed() is False


def test_the_environment_read_is_documented():
    names = [name for name, _ in runtime.ENVIRONMENT]
    assert names == ["XLA_FLAGS", "GRADLAB_CACHE_DIR", "XDG_CACHE_HOME", "JAX_COMPILATION_CACHE_DIR"]
    assert all(name in runtime.__doc__ and meaning for name, meaning in runtime.ENVIRONMENT)
