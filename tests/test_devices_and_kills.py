"""Sweeps sharded over several host devices, and a sweep killed mid-run then resumed.

Both run the real CLI in a subprocess: the host device count is fixed before jax starts.
"""

import os
import signal
import subprocess
import sys
import time

import numpy as np
import xarray as xr

SWEEP = ["model.width=16", "model.depth=3", "data.examples=32", "data.input_dim=8", "model.activation=tanh",
         "model.norm=none", "model.residual=false", "optim.name=momentum", "optim.lr=[0.01, 0.03, 0.1]",
         "seeds=1", "steps=40", "chunk_steps=4", "--quiet", "--no-figure"]


def gradlab(*args, **kw):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen([sys.executable, "-m", "gradlab", "run", "gradient_flow", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def results_of(out):
    (path,) = list((out / "runs").glob("gradient_flow-*/results.nc"))
    return xr.load_dataset(path, engine="h5netcdf")


def assert_identical(a, b, rtol=0.0):
    for name in a.data_vars:
        if rtol:
            np.testing.assert_allclose(a[name].values, b[name].values, rtol=rtol, atol=0, err_msg=name)
        else:
            np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


def test_one_and_four_host_devices_agree(tmp_path):
    """Bit for bit: the engine pads every device to a multiple of 8 lanes, the width XLA:CPU
    vectorises the lane axis by, so a point's rounding does not depend on the device count."""
    runs = {n: gradlab(*SWEEP, "--devices", str(n), "--out", str(tmp_path / str(n))) for n in (1, 4)}
    for n, proc in runs.items():
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
    one, four = results_of(tmp_path / "1"), results_of(tmp_path / "4")
    assert one.attrs["device_count"] == 1 and four.attrs["device_count"] == 4
    assert_identical(one, four)  # bit for bit: 8 lanes per device either way (engine._pad)
    np.testing.assert_array_equal(one["first_bad_step"].values, four["first_bad_step"].values)


def test_sigkill_mid_sweep_then_rerun_is_bit_identical(tmp_path):
    reference = gradlab(*SWEEP, "--out", str(tmp_path / "ref"))
    _, err = reference.communicate(timeout=600)
    assert reference.returncode == 0, err

    victim = gradlab(*SWEEP, "--out", str(tmp_path / "killed"))
    ckpt_dir = None
    deadline = time.time() + 300
    while time.time() < deadline and victim.poll() is None:
        found = list((tmp_path / "killed").glob("runs/*/ckpt/group-*.ckpt.npz"))
        if found:
            ckpt_dir = found[0].parent
            break
        time.sleep(0.05)
    assert victim.poll() is None, "the run ended before it could be killed"
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert ckpt_dir is not None and not (ckpt_dir.parent / "results.nc").exists()

    resumed = gradlab(*SWEEP, "--out", str(tmp_path / "killed"))
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err
    assert_identical(results_of(tmp_path / "ref"), results_of(tmp_path / "killed"))
    assert not list((tmp_path / "killed").rglob("*.tmp"))
