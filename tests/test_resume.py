"""Kills never cost results: SIGKILL mid-chunk or mid-checkpoint-write, a full disk, a failed write.

Every run goes through the real CLI in a subprocess. Faults are injected by a small launcher that
patches one function (numpy.savez, Dataset.to_netcdf) before calling gradlab's main.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
from cli_sweeps import MOMENTUM_NET, assert_identical, finish, results_of

SWEEP = [
    *MOMENTUM_NET,
    "optim.lr=[0.01, 0.03, 0.1]",
    "seeds=1",
    "steps=40",
    "chunk_steps=4",
    "--quiet",
    "--no-figure",
]

LAUNCH = """
import errno, os, signal, sys
import numpy as np, xarray as xr
fault, at = sys.argv[1], int(sys.argv[2])
calls = []
if fault == "kill-mid-checkpoint":
    savez = np.savez
    def half_then_die(file, **arrays):
        calls.append(1)
        if len(calls) == at:
            file.write(b"PK\\x03\\x04 half a checkpoint")
            file.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        savez(file, **arrays)
    np.savez = half_then_die
elif fault == "disk-full-on-results":  # results are encoded in memory, then written as bytes
    import pathlib
    def full(self, data):
        with open(self, "wb") as f:
            f.write(b"\\x89HDF partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    pathlib.Path.write_bytes = full
elif fault == "disk-full-on-checkpoint":
    def full(file, **arrays):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    np.savez = full
from gradlab import cli
sys.exit(cli.main(sys.argv[3:]))
"""


def env():
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONWARNINGS": "ignore"}


def gradlab(*args):
    return subprocess.Popen(
        [sys.executable, "-m", "gradlab", "run", "gradient_flow", *SWEEP, *args],
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def with_fault(fault, at, *args):
    return subprocess.run(
        [sys.executable, "-c", LAUNCH, fault, str(at), "run", "gradient_flow", *SWEEP, *args],
        env=env(),
        capture_output=True,
        text=True,
        timeout=600,
    )


def one_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


def test_sigkill_mid_chunk_or_mid_checkpoint_write_then_rerun_is_bit_identical(tmp_path):
    reference = gradlab("--out", str(tmp_path / "ref"))

    # (1) SIGKILL from outside, while a chunk runs.
    victim = gradlab("--out", str(tmp_path / "mid-chunk"))
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        if list((tmp_path / "mid-chunk").glob("runs/*/ckpt/group-*.ckpt.npz")):
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=60)  # waits, and closes its pipes (else a ResourceWarning at collection)
    assert not list((tmp_path / "mid-chunk").glob("runs/*/results.nc"))

    # (2) SIGKILL inside the third checkpoint write: half a temporary file, the second checkpoint intact.
    killed = with_fault("kill-mid-checkpoint", 3, "--out", str(tmp_path / "mid-write"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    (ckpt,) = list((tmp_path / "mid-write").glob("runs/*/ckpt/group-0000.ckpt.npz"))
    with np.load(ckpt) as f:
        assert int(f["t"]) == 8  # two chunks of 4
    assert len(list(ckpt.parent.glob(".*.tmp"))) == 1

    finish(reference)
    for folder in ("mid-chunk", "mid-write"):
        finish(gradlab("--out", str(tmp_path / folder)))
        assert_identical(results_of(tmp_path / "ref"), results_of(tmp_path / folder))
        assert not list((tmp_path / folder).rglob("*.tmp")), folder
        assert not list((tmp_path / folder).glob("runs/*/ckpt"))


def test_a_full_disk_is_one_line_and_the_previous_results_survive(tmp_path):
    out = tmp_path / "out"
    finish(gradlab("--out", str(out)))
    (path,) = list(out.glob("runs/*/results.nc"))
    before = path.read_bytes()

    failed = with_fault("disk-full-on-results", 0, "--fresh", "--out", str(out))
    assert failed.returncode == 2
    line = one_line(failed.stderr)
    assert str(path) in line and "No space left on device" in line and "previous file is untouched" in line, line
    assert path.read_bytes() == before
    assert not list(out.rglob("*.tmp"))

    failed = with_fault("disk-full-on-checkpoint", 0, "--out", str(tmp_path / "other"))
    assert failed.returncode == 2
    line = one_line(failed.stderr)
    assert "group-0000.ckpt.npz" in line and "No space left on device" in line, line
    assert not list((tmp_path / "other").rglob("*.tmp"))
