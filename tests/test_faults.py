"""Faults a user meets, done for real: device counts, two writers, damaged and foreign checkpoints, a
full disk (RLIMIT_FSIZE), closed pipes, huge sweeps, files that are not what they claim, SIGTERM.

Runs go through the CLI in subprocesses where the fault is a process's (device count, limits,
signals); a launcher patches one gradlab function to set the fault at the right moment.
"""

import os
import signal
import subprocess
import sys
import time
from typing import Any

import cli_sweeps
import numpy as np
import pytest
import xarray as xr

import gradlab
from gradlab import api, config, engine, results
from gradlab.check import Check
from gradlab.errors import ArgumentError, ConfigError, ResultsError

TINY = [*cli_sweeps.TINY, "optim.lr=0.05", "steps=8", "chunk_steps=2"]

# Before it runs gradlab's main: `kill-after-checkpoint N` SIGKILLs the process once N checkpoints are
# written; `fsize-on NAME` sets RLIMIT_FSIZE to 1000 bytes (SIGXFSZ ignored: writes fail with EFBIG)
# as gradlab.results.save or gradlab.plotting.save starts, so the disk is "full" for that write only.
LAUNCH = """
import os, resource, signal, sys
fault, arg = sys.argv[1], sys.argv[2]
from gradlab import plotting, results
if fault == "kill-after-checkpoint":
    save, done = results.save_checkpoint, []
    def save_then_die(*a, **k):
        save(*a, **k)
        done.append(1)
        if len(done) == int(arg):
            os.kill(os.getpid(), signal.SIGKILL)
    results.save_checkpoint = save_then_die
elif fault == "fsize-on":
    module = results if arg == "results" else plotting
    original = module.save
    def full(*a, **k):
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, resource.RLIM_INFINITY))
        return original(*a, **k)
    module.save = full
from gradlab import cli
sys.exit(cli.main(sys.argv[3:]))
"""


def env():
    return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | {"PYTHONWARNINGS": "ignore"}


def gradlab_cli(*args, fault=None, stdout: Any = subprocess.PIPE, timeout=300):
    head = [sys.executable, "-c", LAUNCH, *fault] if fault else [sys.executable, "-m", "gradlab"]
    return subprocess.run([*head, *args], env=env(), stdout=stdout, stderr=subprocess.PIPE, text=True, timeout=timeout)


def one_line(result, code=2):
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == code and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def stored(out):
    (path,) = list((out / "runs").glob("*/results.nc"))
    return path


def assert_same_results(a, b):
    a, b = xr.load_dataset(a, engine="h5netcdf"), xr.load_dataset(b, engine="h5netcdf")
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)


# (1) The same bits on any device count, after optimizer steps.

LR_SWEEP = ["optim.name=[sgd, adam]", "telemetry=layers", "steps=12", "chunk_steps=4"]
LR_SWEEP += ["optim.lr={logspace: [-3, 0, 8]}"]

ON_TWO_DEVICES = """
import sys
import numpy as np
from gradlab import api, config, engine, experiments, results, runtime
runtime.setup(2)
import jax
overrides = sys.argv[2:]
module = experiments.get("lr_sweep")
def sweep(devices, extra=(), **kw):
    spec = api.resolve("lr_sweep", list(overrides) + list(extra), "tiny")
    return engine.run_sweep(module.trial, config.plan(spec), progress=False, devices=devices, **kw)
one, two = jax.devices()[:1], jax.devices()[:2]
assert len(two) == 2
runs = {"one": sweep(one), "two": sweep(two)}
# Interrupted after its first chunk of 4 steps on one device, resumed on two in chunks of 6 (4 -> 10 -> 12).
ckpt = results.ensure_dir(__import__("pathlib").Path(sys.argv[1]))
calls = []
def stop():
    calls.append(1)
    return len(calls) == 1
try:
    sweep(one, checkpoint_dir=ckpt, stop=stop)
except KeyboardInterrupt:
    pass
assert int(np.load(ckpt / "group-0000.ckpt.npz")["t"]) == 4
runs["resumed_on_two"] = sweep(two, ["chunk_steps=6"], checkpoint_dir=ckpt)
np.savez(sys.argv[1] + "/out.npz", **{f"{k}.{n}": v for k, r in runs.items() for n, v in r.metrics.items()})
"""


def test_one_and_two_devices_chunk_lengths_and_a_resume_on_another_device_count_agree(tmp_path):
    """Adam and SGD, clipping on and off, per-layer telemetry, 12 steps: every metric bit for bit, on
    one device, on two, and resumed on two (in chunks of another length) from one device's checkpoint."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", ON_TWO_DEVICES, str(folder), *LR_SWEEP], env=env(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(folder / "out.npz") as f:
        got = {k: f[k] for k in f.files}
    names = sorted({k.split(".", 1)[1] for k in got})
    assert {"loss", "grad_norm", "update_norm", "act_rms"} <= set(names), names
    for run in ("two", "resumed_on_two"):
        for name in names:
            np.testing.assert_array_equal(got[f"{run}.{name}"], got[f"one.{name}"], err_msg=f"{run}: {name}")
    loss = got["one.loss"]  # (optimizer, lr, warmup, clip, step): training moved the loss
    assert np.isfinite(loss[..., 0]).all() and np.nanmin(loss[..., -1] / loss[..., 0]) < 0.9


def test_a_cli_run_killed_on_one_device_resumes_on_two_bit_for_bit(tmp_path):
    """20 points: 24 lanes on one device, 16 on each of two (the checkpoint's padding is redone)."""
    lrs = "optim.lr={logspace: [-3, 0, 5]}"
    args = ["run", "lr_sweep", "--scale", "tiny", "optim.name=adam", *LR_SWEEP[1:-1], lrs, "--quiet", "--no-figure"]
    ref = gradlab_cli(*args, "--devices", "1", "--out", str(tmp_path / "ref"))
    assert ref.returncode == 0, ref.stderr
    killed = gradlab_cli(*args, "--devices", "1", "--out", str(tmp_path / "run"), fault=("kill-after-checkpoint", "1"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    resumed = gradlab_cli(*args, "--devices", "2", "--out", str(tmp_path / "run"))
    assert resumed.returncode == 0, resumed.stderr
    assert_same_results(stored(tmp_path / "ref"), stored(tmp_path / "run"))
    assert xr.load_dataset(stored(tmp_path / "run"), engine="h5netcdf").attrs["device_count"] == 2


# (2) Size caps before anything is built; no per-point Python loop.


def test_a_billion_seeds_is_refused_at_once_even_for_a_dry_run():
    start = time.perf_counter()
    line = one_line(gradlab_cli("run", "lr_sweep", "seeds=1000000000", "--dry-run", timeout=120))
    assert "seeds" in line and "at most 4096" in line, line
    assert time.perf_counter() - start < 60
    line = one_line(gradlab_cli("show", "lr_sweep", "optim.lr={logspace: [-4, 1, 4096]}", "seeds=4096"))
    assert "268435456 points" in line and f"at most {2**24}" in line, line


def test_a_two_million_point_plan_is_built_as_arrays_in_the_order_of_the_axes():
    start = time.perf_counter()
    spec = api.resolve("lr_sweep", ["optim.lr={logspace: [-4, 1, 4096]}", "seeds=31"], "tiny")
    (group,) = config.plan(spec).groups
    assert group.points == 4096 * 2 * 2 * 31 and time.perf_counter() - start < 30
    lr, seed = group.hp["optim.lr"], group.hp["seed"]
    # C order over (lr, warmup, clip, seed): the seed runs fastest, lr slowest.
    np.testing.assert_array_equal(seed[:62], np.tile(np.arange(31), 2))
    np.testing.assert_array_equal(lr[:: 2 * 2 * 31], np.float32(np.logspace(-4, 1, 4096)))
    assert np.all(lr[: 4 * 31] == lr[0]) and group.hp["clip"][:62].tolist() == [False] * 31 + [True] * 31


def test_first_bad_layers_of_two_million_points_takes_seconds_and_matches_a_loop():
    """Every point diverged (the worst case): a per-point Python loop took 11 s here, arrays take 0.1 s."""
    n = 2_000_000
    rng = np.random.default_rng(0)
    bad = rng.integers(0, 3, n).astype(np.int32)
    layer = rng.integers(0, 4, n)
    grad = rng.normal(size=(n, 3, 4)).astype(np.float32)
    grad[np.arange(n), bad, layer] = np.nan
    grad[: n // 2, :, 3] = np.inf  # half the points: layer 3 is bad too, so the first bad one is min(layer, 3)
    start = time.perf_counter()
    got = engine.first_bad_layers({"grad_norm": grad}, {"grad_norm": ("layer",)}, bad)
    assert time.perf_counter() - start < 3
    np.testing.assert_array_equal(got, np.where(np.arange(n) < n // 2, np.minimum(layer, 3), layer))


# (3) One writer per run folder.


def test_a_second_writer_of_the_same_run_is_refused_in_one_line(tmp_path):
    spec = api.resolve("gradient_flow", TINY)
    run = results.ensure_dir(results.run_dir(tmp_path, "gradient_flow", spec.hash))
    holder = subprocess.Popen(
        [sys.executable, "-c", f"import fcntl, os, sys, time; fd = os.open({str(run / '.lock')!r}, os.O_RDWR | "
         "os.O_CREAT); fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'4242'); print('held', flush=True); "
         "time.sleep(120)"],
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        line = one_line(gradlab_cli("run", "gradient_flow", *TINY, "--quiet", "--out", str(tmp_path)))
        assert "another gradlab process (pid 4242) is writing this run" in line, line
        assert not (run / "results.nc").exists()
    finally:
        holder.kill()
        holder.communicate()
    done = gradlab_cli("run", "gradient_flow", *TINY, "--quiet", "--no-figure", "--out", str(tmp_path))
    assert done.returncode == 0, done.stderr  # the OS released the lock with its holder


# (5) Checkpoints that know what they are; stale ones removed.


def test_truncated_foreign_and_orphaned_checkpoints(tmp_path):
    base = ["run", "gradient_flow", *TINY, "--quiet", "--no-figure"]
    assert gradlab_cli(*base, "--out", str(tmp_path / "ref")).returncode == 0
    reference = stored(tmp_path / "ref")

    # A checkpoint of another config (another lr list: same shapes), renamed into this run: discarded.
    other = [a if not a.startswith("optim.lr") else "optim.lr=0.02" for a in base]
    killed = gradlab_cli(*other, "--out", str(tmp_path / "x"), fault=("kill-after-checkpoint", "2"))
    assert killed.returncode == -signal.SIGKILL
    (foreign,) = list((tmp_path / "x").glob("runs/*/ckpt/group-0000.ckpt.npz"))
    for damage in ("foreign", "truncated"):
        out = tmp_path / damage
        killed = gradlab_cli(*base, "--out", str(out), fault=("kill-after-checkpoint", "1"))
        assert killed.returncode == -signal.SIGKILL
        (ckpt,) = list(out.glob("runs/*/ckpt/group-0000.ckpt.npz"))
        ckpt.write_bytes(foreign.read_bytes() if damage == "foreign" else ckpt.read_bytes()[:300])
        resumed = gradlab_cli(*base, "--out", str(out))
        assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stderr
        notes = [line for line in resumed.stdout.splitlines() if "discarded" in line]
        assert len(notes) == 1 and "starting the group over" in notes[0], resumed.stdout
        assert ("another run" if damage == "foreign" else "unreadable") in notes[0], notes[0]
        assert_same_results(reference, stored(out))

    # A finished run's left-over ckpt/ (killed between storing results and clearing): removed by the next run.
    orphan = reference.parent / "ckpt"
    orphan.mkdir()
    (orphan / "group-0000.ckpt.npz").write_bytes(b"old")
    assert "reused stored results" in gradlab_cli(*base, "--out", str(tmp_path / "ref")).stdout
    assert not orphan.exists()


def test_a_checkpoint_records_what_it_belongs_to_and_a_checksum(tmp_path):
    arrays = {"t": np.asarray(3), "state_0000": np.arange(6, dtype=np.float32).reshape(2, 3)}
    path = tmp_path / "group-0000.ckpt.npz"
    results.save_checkpoint(path, arrays, {"run": "abc", "gradlab": gradlab.__version__})
    back, meta = results.read_checkpoint(path)
    assert meta["run"] == "abc" and meta["checksum"] == results.checksum(arrays)
    forged = {**back, "meta": np.asarray('{"run": "abc", "checksum": "00000000"}')}  # contents != checksum
    np.savez(path, **forged)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ResultsError, match="checksum does not match"):
        results.read_checkpoint(path)


# (4, 6) What the OS refuses: one line, exit 2, earlier files intact.


def test_a_full_disk_while_writing_results_or_figures(tmp_path):
    base = ["run", "gradient_flow", *TINY, "--quiet", "--out", str(tmp_path)]
    assert gradlab_cli(*base).returncode == 0
    path = stored(tmp_path)
    before, figure = path.read_bytes(), (tmp_path / "figures" / "gradient_flow.png").read_bytes()

    line = one_line(gradlab_cli(*base, "--fresh", fault=("fsize-on", "results")))
    assert str(path) in line and "File too large" in line and "previous file is untouched" in line, line
    assert path.read_bytes() == before

    line = one_line(gradlab_cli(*base, fault=("fsize-on", "figures")))
    assert "gradient_flow.png" in line and "File too large" in line and "untouched" in line, line
    assert (tmp_path / "figures" / "gradient_flow.png").read_bytes() == figure
    assert not list(tmp_path.rglob("*.tmp"))


def test_closed_pipe_full_stdout_and_a_name_too_long(tmp_path):
    read, write = os.pipe()
    os.close(read)  # the reader left before gradlab wrote a byte
    closed = gradlab_cli("show", "lr_sweep", "--doc", stdout=write)
    os.close(write)
    assert closed.stderr == "", closed.stderr
    with open("/dev/full", "w") as full:
        line = one_line(gradlab_cli("list", stdout=full))
    assert "No space left on device" in line, line
    line = one_line(gradlab_cli("run", "gradient_flow", *TINY, "--quiet", "--out", str(tmp_path / ("x" * 300))))
    assert "File name too long" in line, line


# (7) Stored files are checked against their experiment.


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("small")
    assert gradlab_cli("run", "gradient_flow", *TINY, "--quiet", "--no-figure", "--out", str(out)).returncode == 0
    return stored(out)


def test_plot_and_load_name_what_a_stored_file_lacks(small_run, tmp_path):
    ds = xr.load_dataset(small_run, engine="h5netcdf")
    cases = {
        "no experiment": (ds.drop_attrs(deep=False).assign_attrs(results_format=ds.attrs["results_format"]), "known"),
        "another experiment": (ds.assign_attrs(experiment="lr_sweep"), "the file is for 'lr_sweep'"),
        "no config": (ds.drop_attrs(deep=False).assign_attrs(**{**ds.attrs, "config": "{"}), "config attribute"),
        "no diverged": (ds.drop_vars("diverged"), "lack diverged"),
    }
    for what, (bad, needle) in cases.items():
        run = tmp_path / what / small_run.parent.name
        run.mkdir(parents=True)
        bad.to_netcdf(run / "results.nc", engine="h5netcdf")
        line = one_line(gradlab_cli("plot", str(run), "--out", str(tmp_path / "figs")))
        assert needle in line, (what, line)


# (9) The Python API checks what it is given.


def test_the_python_api_checks_its_arguments(small_run):
    def untyped(value) -> Any:  # what a type checker would refuse, as a user's untyped code passes it
        return value

    for call, needle in [
        (lambda: gradlab.run(untyped(123)), "experiment must be a name or a config file path, got 123"),
        (lambda: gradlab.run(untyped(None)), "got None"),
        (lambda: gradlab.run("gradient_flow", overrides="steps=5"), "overrides=['steps=5']"),
        (lambda: gradlab.plot(untyped(str(small_run.parent))), "gradlab.load(path)"),
        (lambda: gradlab.load(42), "run folder or results file path"),
    ]:
        with pytest.raises(ArgumentError) as raised:
            call()
        assert needle in str(raised.value) and "\n" not in str(raised.value)
    foreign = xr.Dataset({"x": ("i", np.arange(3))}, attrs={"experiment": "nope"})
    with pytest.raises(ResultsError, match="names no known experiment"):
        gradlab.checks(foreign)
    with pytest.raises(ConfigError) as raised:
        gradlab.run("gradient_flow", model__depth=0)
    assert "argument of the call" in str(raised.value) and "command line" not in str(raised.value)


# (8) A check that a narrowed sweep cannot compute is skipped and says so.


def test_mixed_precision_with_dynamic_scaling_alone_skips_what_it_cannot_check(tmp_path):
    notes = []
    outcome = api.execute(
        "mixed_precision", ["loss_scale=dynamic"], "tiny", out=tmp_path, progress=False, on_note=notes.append
    )
    skipped = [c for c in outcome.checks if c.skipped]
    assert {c.name for c in skipped} == {
        "fp16 unscaled: weight-gradient entries that are zero, last quarter",
        "fp16 vs fp32 final loss gaps",
    }
    assert all(c.result == "skipped" and "needs" in c.expected for c in skipped)
    assert any(c.name.startswith("dynamic scale: halvings") and c.passed for c in outcome.checks)
    assert [n for n in notes if n.startswith("no figure:")], notes
    again = api.checks(api.load(outcome.run_dir))  # and again from the stored file
    assert [c.result for c in again] == [c.result for c in outcome.checks]


# (10) The smaller items.


def test_nan_measured_says_no_healthy_point_and_tiny_memory_is_in_bytes():
    assert Check.at_most("edge", float("nan"), 1.0).result == "FAIL: no healthy point"
    assert Check.at_most("edge", 2.0, 1.0).result == "FAIL" and Check.at_most("edge", 0.5, 1.0).result == "pass"
    assert engine.size(1) == "1 bytes" and engine.size(3 * 1024) == "3.0 KiB" and engine.size(2**21) == "2.0 MiB"


def test_sigterm_says_in_one_line_that_a_rerun_resumes(tmp_path):
    args = ["run", "gradient_flow", *TINY[:-2], "steps=4000", "chunk_steps=5", "--quiet", "--out", str(tmp_path)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "gradlab", *args], env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while time.time() < deadline and not list(tmp_path.glob("runs/*/ckpt/*.npz")):
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 143 and len(lines) == 1 and "rerun the same command to resume" in lines[0], err
    assert list(tmp_path.glob("runs/*/ckpt/*.npz")) and not list(tmp_path.rglob("*.tmp"))
