"""Helpers for tests that run `gradlab run gradient_flow` in subprocesses and compare results."""

import numpy as np
import xarray as xr

MOMENTUM_NET = [  # a 3-block tanh net under momentum: the sweeps the determinism and resume tests compare
    "model.width=16",
    "model.depth=3",
    "data.examples=32",
    "data.input_dim=8",
    "model.activation=tanh",
    "model.norm=none",
    "model.residual=false",
    "optim.name=momentum",
]

TINY = [  # gradient_flow small enough to compile in a second or two
    "model.width=8",
    "model.depth=2",
    "seeds=1",
    "data.examples=16",
    "data.input_dim=4",
    "model.activation=tanh",
    "model.norm=none",
    "model.residual=false",
]


def finish(proc):
    """Wait for a gradlab subprocess; it must exit 0. Returns its stdout."""
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    return out


def results_of(out):
    (path,) = list((out / "runs").glob("gradient_flow-*/results.nc"))
    return xr.load_dataset(path, engine="h5netcdf")


def assert_identical(a, b):
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
