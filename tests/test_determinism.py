"""Same config and seed, same numbers: across runs, chunk lengths, batches, devices and processes.

Bit for bit on the CPU: the engine gives every device a multiple of 8 lanes (engine.lanes_per_device)
in a program compiled for that one device (programs.compile_group), so a point's arithmetic does not
depend on what else shares its program or on how many devices there are. Multi-step training across
device counts, chunk lengths and a resume on another device count: tests/test_faults.py.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from cli_sweeps import MOMENTUM_NET, assert_identical, finish, results_of

from gradlab import config, engine, trials
from gradlab.config import ExperimentConfig

BASE = """
steps: 12
chunk_steps: 4
model: {depth: 3, width: 16, activation: tanh}
optim: {name: momentum, lr: 0.05}
data: {examples: 32, input_dim: 8}
"""


def spec_of(tmp_path, overrides=()):
    path = tmp_path / "exp.yaml"
    path.write_text(BASE)
    return config.load("exp", ExperimentConfig, list(overrides), path=path)


def sweep(spec, **kw):
    return engine.run_sweep(trials.supervised_mlp, config.plan(spec), progress=False, **kw)


def assert_same(a, b):
    assert a.metrics.keys() == b.metrics.keys()
    for name in a.metrics:
        np.testing.assert_array_equal(a.metrics[name], b.metrics[name], err_msg=name)
    np.testing.assert_array_equal(a.first_bad_step, b.first_bad_step)


def test_two_runs_are_identical_and_seeds_differ(tmp_path):
    spec = spec_of(tmp_path, ["seeds=2"])
    a, b = sweep(spec), sweep(spec)
    assert_same(a, b)
    assert not np.array_equal(a.metrics["loss"][0], a.metrics["loss"][1])
    assert not np.array_equal(a.metrics["grad_norm"][0, 0], a.metrics["grad_norm"][1, 0])


@pytest.mark.parametrize("chunk", [3, 6, 5])
def test_chunk_lengths_change_nothing(tmp_path, chunk):
    """3 and 6 divide the 12 steps; with 5 the last chunk runs 3 steps past the end, dropped."""
    reference = sweep(spec_of(tmp_path, ["optim.lr=[0.01, 0.1]", "chunk_steps=12"]))
    assert_same(sweep(spec_of(tmp_path, ["optim.lr=[0.01, 0.1]", f"chunk_steps={chunk}"])), reference)


def test_healthy_points_are_the_same_with_or_without_diverging_ones(tmp_path):
    healthy = sweep(spec_of(tmp_path, ["optim.lr=[0.01, 0.05]"]))
    mixed = sweep(spec_of(tmp_path, ["optim.lr=[0.01, 0.05, 1.0e+5, 1.0e+7]"]))
    assert mixed.first_bad_step.tolist()[:2] == [-1, -1]
    bad = mixed.first_bad_step[2:]
    assert np.all((bad >= 0) & (bad < 12)), bad
    for i, step in zip((2, 3), bad):
        assert np.all(np.isnan(mixed.metrics["loss"][i, step + 1 :]))
        assert np.all(np.isfinite(mixed.metrics["loss"][i, :step]))
        assert mixed.first_bad_layer[i] >= 0
    for name in healthy.metrics:
        np.testing.assert_array_equal(mixed.metrics[name][:2], healthy.metrics[name], err_msg=name)


def test_a_sweep_split_into_batches_to_fit_memory_is_bit_identical(tmp_path):
    """20 points need 24 lanes on one device; with room for 8 lanes they run as 3 batches of 8."""
    spec = spec_of(tmp_path, ["optim.lr={logspace: [-3, -1, 20]}"])
    group = config.plan(spec).groups[0]
    trial = trials.supervised_mlp(group.config)
    devices = jax.local_devices()[:1]
    need = {
        lanes: engine.group_bytes(engine.compile_group(trial, group.hp, 12, 4, devices, lanes)) for lanes in (8, 16, 24)
    }
    assert need[8] < need[16] < need[24]
    whole = sweep(spec, devices=devices)
    notes = []
    split = sweep(spec, devices=devices, memory=(need[8] + need[16]) // 2, on_note=notes.append)
    assert len(notes) == 1 and "3 batches of 8 points" in notes[0] and "bit-identical" in notes[0], notes
    assert_same(split, whole)
    with pytest.raises(engine.SweepTooLarge, match="one point of the sweep needs"):
        sweep(spec, devices=devices, memory=1000)


# Through the CLI in subprocesses: the host device count is fixed before jax starts.
SWEEP = [
    *MOMENTUM_NET,
    "optim.lr={logspace: [-3, -1, 32]}",
    "seeds=1",
    "steps=24",
    "chunk_steps=8",
    "--quiet",
    "--no-figure",
]


def gradlab(*args):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    return subprocess.Popen(
        [sys.executable, "-m", "gradlab", "run", "gradient_flow", *SWEEP, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_four_host_devices_and_two_processes_agree(tmp_path):
    """1 device, 4 host devices, and 2 processes x 2 devices joined by jax.distributed on 127.0.0.1.

    32 points: 32 lanes on one device against 8 on each of four, where YNNPACK's reductions (off
    since gradlab/__init__.py) rounded the norms differently.
    """
    finish(gradlab("--devices", "1", "--out", str(tmp_path / "one")))
    finish(gradlab("--devices", "4", "--out", str(tmp_path / "four")))
    port = free_port()
    hosts = [
        "--devices",
        "2",
        "--coordinator",
        f"127.0.0.1:{port}",
        "--num-processes",
        "2",
        "--out",
        str(tmp_path / "two"),
    ]
    procs = [gradlab(*hosts, "--process-id", str(i)) for i in (0, 1)]
    outs = [finish(p) for p in procs]
    assert "results:" in outs[0] and "process 1 of 2: done" in outs[1] and "results:" not in outs[1]

    one, four, two = (results_of(tmp_path / name) for name in ("one", "four", "two"))
    assert (one.attrs["device_count"], four.attrs["device_count"], two.attrs["device_count"]) == (1, 4, 4)
    assert two.attrs["process_count"] == 2
    assert one.attrs["deterministic_ops"] == "false"  # not asked for; the CPU is deterministic anyway
    assert_identical(one, four)
    assert_identical(one, two)
