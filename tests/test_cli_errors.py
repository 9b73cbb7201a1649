"""Mistakes a user makes on the command line: one line on stderr, exit 2, no traceback."""

import os
import subprocess
import sys

import pytest
from cli_sweeps import TINY


def gradlab(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "gradlab", *args], capture_output=True, text=True, cwd=cwd, env=env, timeout=300
    )


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["run", "gradient_flw"], ["unknown experiment 'gradient_flw'", "did you mean 'gradient_flow'", "known:"]),
        (["run", "gradient_flow", "model.dept=3"], ["gradient_flow.yaml", "model.dept", "did you mean 'model.depth'"]),
        (["run", "gradient_flow", "model.depth=abc"], ["model.depth"]),
        (["run", "gradient_flow", "optim.lr=-1"], ["optim.lr", "must be > 0"]),
        (["run", "gradient_flow", "model.depth=0"], ["model.depth", "must be >= 1"]),
        (["run", "gradient_flow", "model.init=glorot"], ["model.init", "allowed: zero, normal, lecun_normal"]),
        (["run", "gradient_flow", "model.activation=swish"], ["model.activation", "allowed: tanh"]),
        (["run", "gradient_flow", "model.norm=batch"], ["model.norm", "allowed: none, layernorm, rmsnorm"]),
        (["run", "gradient_flow", "optim.name=lamb"], ["optim.name", "allowed: sgd"]),
        (["run", "gradient_flow", "optim.lr={uniform: [1, 2]}"], ["optim.lr", "logspace"]),
        (["run", "gradient_flow", "--scale", "huge"], ["--scale 'huge'", "allowed: quick, paper"]),
        (["run", "gradient_flow", "--bogus"], ["unrecognized arguments: --bogus"]),
        (["run"], ["EXPERIMENT|FILE"]),
        (["run", "gradient_flow", "optim.lr=0"], ["optim.lr", "must be > 0"]),
        (["run", "gradient_flow", "optim.lr=.nan"], ["optim.lr", "finite"]),
        (["run", "gradient_flow", "optim.lr=.inf"], ["optim.lr", "finite"]),
        (["run", "gradient_flow", "model.width=0"], ["model.width", "must be >= 1"]),
        (["run", "gradient_flow", "seeds=3000000000"], ["seeds", "must be <= 2147483647"]),
        (["run", "gradient_flow", "seed=2147483640", "seeds=100"], ["seeds", "PRNG"]),
        (["run", "gradient_flow", "optim.schedule=cosin"], ["optim.schedule", "did you mean 'cosine'"]),
        (["run", "gradient_flow", "optim.lr={logspace: [-1, -4, 8]}"], ["optim.lr", "lo <= hi"]),
        (["run", "gradient_flow", "optim.lr={logspace: [-4, -1, 0]}"], ["optim.lr", "count n"]),
        (["run", "gradient_flow", "model.norm=[none, 3]"], ["model.norm", "one type"]),
        (["run", "gradient_flow", "model=3"], ["model"]),
        (["run", "gradient_flow", "steps"], ["expected key=value"]),
        (["run", "gradient_flow", "--devices", "0"], ["--devices must be >= 1"]),
        (["run", "gradient_flow", "--devices", "two"], ["--devices", "invalid int"]),
        (["show", "nope"], ["unknown experiment 'nope'"]),
        (["plot", "/nonexistent/run"], ["no results here"]),
        (["frobnicate"], ["invalid choice"]),
        (["run", "gradient_flow", "--max-memory", "-1"], ["--max-memory must be a positive number of GiB"]),
        (
            ["run", "gradient_flow", "--num-processes", "2"],
            ["--coordinator, --num-processes and --process-id together", "missing --coordinator, --process-id"],
        ),
        (
            ["run", "gradient_flow", "--coordinator", "localhost", "--num-processes", "2", "--process-id", "0"],
            ["--coordinator must be HOST:PORT"],
        ),
        (
            ["run", "gradient_flow", "--coordinator", "127.0.0.1:9", "--num-processes", "2", "--process-id", "2"],
            ["--process-id must be in 0..1"],
        ),
        (
            ["run", "gradient_flow", "--coordinator", "127.0.0.1:9", "--num-processes", "0", "--process-id", "0"],
            ["--num-processes must be >= 1"],
        ),
        (["reproduce", "--only", "gradient_flow", "nope"], ["unknown experiment 'nope'"]),
        (["reproduce", "--scale", "huge"], ["--scale 'huge'", "allowed: quick, paper"]),
        (["show", "gradient_flow", "optim.momentum=1.5"], ["optim.momentum"]),
    ],
)
def test_config_and_usage_errors(args, needles):
    assert_one_line_error(gradlab(*args), *needles)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: [1, 2\n")
    assert_one_line_error(gradlab("run", "gradient_flow", "--config", str(bad)), str(bad), "malformed YAML at line")


def test_unwritable_output_folder_and_output_that_is_a_file(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert_one_line_error(gradlab("run", "gradient_flow", *TINY, "--out", str(a_file)), str(a_file))
    assert a_file.read_text() == "keep me"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_one_line_error(gradlab("run", "gradient_flow", *TINY, "--out", str(locked)), "not writable")


def test_a_small_run_prints_checks_results_and_figure(tmp_path):
    result = gradlab("run", "gradient_flow", *TINY, "--quiet", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "results:" in result.stdout and "figure:" in result.stdout
    assert (tmp_path / "figures" / "gradient_flow.png").stat().st_size > 10_000
    again = gradlab("run", "gradient_flow", "--quiet", "--out", str(tmp_path), *TINY)  # options first: the same run
    assert "reused stored results" in again.stdout


def test_devices_conflicting_with_xla_flags():
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    result = subprocess.run(
        [sys.executable, "-m", "gradlab", "run", "gradient_flow", "--devices", "4"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert_one_line_error(result, "--devices conflicts with xla_force_host_platform_device_count")


def test_config_file_missing_directory_and_anchor_bomb(tmp_path):
    assert_one_line_error(
        gradlab("run", "gradient_flow", "--config", str(tmp_path / "none.yaml")), "no such config file"
    )
    assert_one_line_error(gradlab("run", "gradient_flow", "--config", str(tmp_path)), "is a directory")
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(
        "a: &a [x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
        "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
    )
    assert_one_line_error(gradlab("run", "gradient_flow", "--config", str(bomb)), "aliases are not allowed")


def test_a_sweep_too_large_for_memory_is_refused_in_one_line(tmp_path):
    result = gradlab(
        "run",
        "gradient_flow",
        "model.width=40000",
        "model.depth=20",
        *TINY[2:3],
        *TINY[5:],
        "--quiet",
        "--out",
        str(tmp_path),
    )
    assert_one_line_error(result, "GiB per device", "free")


def _small_run(tmp_path):
    result = gradlab("run", "gradient_flow", *TINY, "--quiet", "--no-figure", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    (path,) = list((tmp_path / "runs").glob("*/results.nc"))
    return path


def test_a_truncated_results_file_is_reported_not_overwritten(tmp_path):
    path = _small_run(tmp_path)
    path.write_bytes(path.read_bytes()[:200])
    before = path.read_bytes()
    assert_one_line_error(
        gradlab("run", "gradient_flow", *TINY, "--quiet", "--out", str(tmp_path)), "corrupt or truncated", "--fresh"
    )
    assert path.read_bytes() == before
    fresh = gradlab("run", "gradient_flow", *TINY, "--quiet", "--no-figure", "--fresh", "--out", str(tmp_path))
    assert fresh.returncode == 0, fresh.stderr


def test_results_from_another_gradlab_version_are_refused(tmp_path):
    import xarray as xr

    path = _small_run(tmp_path)
    ds = xr.load_dataset(path, engine="h5netcdf")
    ds.attrs["results_format"] = 99
    ds.to_netcdf(path, engine="h5netcdf")
    assert_one_line_error(gradlab("plot", str(path.parent)), "results format 99", "--fresh")


def test_ctrl_c_exits_130_keeps_the_checkpoint_and_says_how_to_resume(tmp_path):
    import signal
    import time

    args = [
        "run",
        "gradient_flow",
        *TINY,
        "steps=4000",
        "chunk_steps=5",
        "--quiet",
        "--no-figure",
        "--out",
        str(tmp_path),
    ]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradlab", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list(tmp_path.glob("runs/*/ckpt/*.npz")):
        time.sleep(0.1)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "rerun the same command to resume" in err
    (ckpt,) = list(tmp_path.glob("runs/*/ckpt/*.npz"))
    import numpy as np

    with np.load(ckpt) as f:
        assert 0 < int(f["t"]) < 4000
    assert not list(tmp_path.rglob("*.tmp"))
