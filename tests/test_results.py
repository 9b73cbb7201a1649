"""Run folders and labelled results: atomic writes, save/load, refused files, axes, folders, temporaries."""

import os
import types

import numpy as np
import pytest
import xarray as xr

from gradlab import results
from gradlab.errors import ResultsError

CONFIG = {
    "seed": 0,
    "steps": 3,
    "model": {"depth": 2, "width": 8, "norm": "layernorm", "residual": False},
    "optim": {"name": "sgd", "lr": 0.1},
}
SPEC = {"experiment": "toy", "scale": "tiny", "config": CONFIG, "axes": {"optim.lr": [0.1, 0.3], "seed": [0, 1, 2]}}


def sweep():
    """What engine.run_sweep returns, made by hand: 2 learning rates x 3 seeds, 3 steps, 4 layers."""
    rng = np.random.default_rng(0)
    first_bad = np.array([[-1, -1, -1], [-1, 2, -1]], np.int32)
    return types.SimpleNamespace(
        axes=[("optim.lr", [0.1, 0.3]), ("seed", [0, 1, 2])],
        metrics={
            "loss": rng.standard_normal((2, 3, 3)).astype(np.float32),
            "grad_norm": rng.random((2, 3, 3, 4)).astype(np.float32),
        },
        metric_dims={"loss": (), "grad_norm": ("layer",)},
        first_bad_step=first_bad,
        first_bad_layer=np.where(first_bad >= 0, 1, -1).astype(np.int32),
        device_kind="cpu",
        device_count=1,
        processes=1,
        notes=["a note", "another"],
        compile_seconds=1.5,
        run_seconds=0.25,
        groups=1,
    )


REFERENCE = {"constant_loss": 0.4375, "curve": np.array([3.0, 2.0, 1.0]), "grid": np.arange(6.0).reshape(2, 3)}


def dataset():
    return results.build_dataset(sweep(), SPEC, "0123456789ab", reference=REFERENCE)


def leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


# ----------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize("error", [ValueError("the writer failed"), OSError(28, "No space left on device")])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, error):
    path = tmp_path / "results.nc"
    path.write_bytes(b"the old results")

    def write(tmp):
        with open(tmp, "wb") as f:
            f.write(b"half of the new")
        raise error

    expected = ResultsError if isinstance(error, OSError) else ValueError
    with pytest.raises(expected) as raised:
        results.atomic_write(path, write)
    if expected is ResultsError:
        message = str(raised.value)
        assert "No space left on device" in message and "previous file is untouched" in message
        assert "\n" not in message
    assert path.read_bytes() == b"the old results"
    assert os.listdir(tmp_path) == ["results.nc"]


def test_a_completed_write_replaces_the_file_with_the_usual_permissions(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    results.write_text(path, "new text\n")
    assert path.read_text() == "new text\n"
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("damage", ["cut to 40 bytes", "cut in half", "a flipped byte in the data"])
def test_checkpoint_round_trip_and_a_damaged_checkpoint_is_one_line(tmp_path, damage):
    arrays = {"t": np.int64(4), "w": np.linspace(-1, 1, 12, dtype=np.float32).reshape(3, 4)}
    path = tmp_path / "group-0000.ckpt.npz"
    results.save_checkpoint(path, arrays)
    back = results.load_checkpoint(path)
    assert set(back) == {"t", "w"} and int(back["t"]) == 4
    np.testing.assert_array_equal(back["w"], arrays["w"])
    raw = bytearray(path.read_bytes())
    if damage == "cut to 40 bytes":
        raw = raw[:40]
    elif damage == "cut in half":
        raw = raw[: len(raw) // 2]
    else:  # the last entry of w, inside the archive's first member data after "t"
        at = bytes(raw).index(np.float32(1.0).tobytes())
        raw[at + 2] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ResultsError, match="checkpoint is unreadable") as raised:
        results.load_checkpoint(path)
    assert "\n" not in str(raised.value)


# ----------------------------------------------------------------------------- save and load


def test_build_dataset_labels_every_array():
    ds = dataset()
    raw = sweep()
    assert ds["loss"].dims == ("optim.lr", "seed", "step")
    assert ds["grad_norm"].dims == ("optim.lr", "seed", "step", "layer")
    np.testing.assert_array_equal(ds["optim.lr"].values, [0.1, 0.3])
    np.testing.assert_array_equal(ds["step"].values, [0, 1, 2])
    np.testing.assert_array_equal(ds["layer"].values, [0, 1, 2, 3])
    np.testing.assert_array_equal(ds["loss"].sel({"optim.lr": 0.3, "seed": 1}).values, raw.metrics["loss"][1, 1])
    np.testing.assert_array_equal(ds["diverged"].values, [[False, False, False], [False, True, False]])
    assert ds["ref.constant_loss"].dims == () and float(ds["ref.constant_loss"]) == 0.4375
    assert ds["ref.grid"].dims == ("ref.grid.0", "ref.grid.1")
    assert ds.attrs["results_format"] == results.RESULTS_FORMAT and ds.attrs["notes"] == "a note\nanother"


def test_save_then_load_gives_the_same_dataset(tmp_path):
    ds = dataset()
    run = tmp_path / "runs" / "toy-0123456789ab"
    results.ensure_dir(run)
    results.save(ds, run / results.RESULTS_FILE)
    assert leftovers(run) == []
    back = results.load(run)  # a run folder; the file itself works too
    xr.testing.assert_identical(back, results.load(run / results.RESULTS_FILE))
    assert set(back.data_vars) == set(ds.data_vars)
    for name in ds.data_vars:
        assert back[name].dims == ds[name].dims, name
        assert back[name].dtype == ds[name].dtype, name
        np.testing.assert_array_equal(back[name].values, ds[name].values, err_msg=name)
    for name in ds.coords:
        np.testing.assert_array_equal(back[name].values, ds[name].values, err_msg=name)
    np.testing.assert_array_equal(back["ref.curve"].values, [3.0, 2.0, 1.0])
    assert back.attrs["config_hash"] == "0123456789ab" and back.attrs["compile_seconds"] == 1.5
    assert results.config_of(back) == SPEC


def test_a_truncated_results_file_is_one_line(tmp_path):
    path = tmp_path / results.RESULTS_FILE
    results.save(dataset(), path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ResultsError, match="corrupt or truncated.*--fresh") as raised:
        results.load(tmp_path)
    assert "\n" not in str(raised.value)


def test_a_missing_results_file_says_to_run_first(tmp_path):
    with pytest.raises(ResultsError, match="no results here"):
        results.load(tmp_path)


@pytest.mark.parametrize("version", [results.RESULTS_FORMAT - 1, results.RESULTS_FORMAT + 1, None])
def test_a_results_file_of_another_format_is_refused(tmp_path, version):
    ds = dataset()
    if version is None:
        del ds.attrs["results_format"]
    else:
        ds.attrs["results_format"] = version
    path = tmp_path / results.RESULTS_FILE
    ds.to_netcdf(path, engine="h5netcdf")
    with pytest.raises(ResultsError) as raised:
        results.load(path)
    message = str(raised.value)
    assert f"results format {version} was written by another gradlab" in message
    assert f"reads {results.RESULTS_FORMAT}" in message and "\n" not in message


# ----------------------------------------------------------------------------- axes and config


def test_with_axes_adds_unswept_axes_at_their_config_value():
    ds = dataset()
    full = results.with_axes(ds, ["optim.lr", "model.norm", "model.depth", "seed"])
    assert full.sizes["model.norm"] == 1 and full.sizes["model.depth"] == 1
    assert full["model.norm"].values.tolist() == ["layernorm"] and full["model.depth"].values.tolist() == [2]
    assert set(full["loss"].dims) == {"optim.lr", "seed", "step", "model.norm", "model.depth"}
    np.testing.assert_array_equal(
        full["loss"].sel({"model.norm": "layernorm", "model.depth": 2}).transpose("optim.lr", "seed", "step").values,
        ds["loss"].values,
    )
    np.testing.assert_array_equal(
        full["grad_norm"].isel({"model.norm": 0, "model.depth": 0}).transpose(*ds["grad_norm"].dims).values,
        ds["grad_norm"].values,
    )
    for name in REFERENCE:  # reference numbers keep their own dims, none of the sweep's
        assert full[f"ref.{name}"].dims == ds[f"ref.{name}"].dims
        np.testing.assert_array_equal(full[f"ref.{name}"].values, REFERENCE[name])
    assert "model.norm" not in ds.dims  # the input is not changed


def test_with_axes_leaves_swept_axes_alone():
    ds = dataset()
    same = results.with_axes(ds, ["optim.lr", "seed"])
    xr.testing.assert_identical(same[list(ds.data_vars)], ds)


def test_run_config_is_the_resolved_config():
    ds = dataset()
    assert results.run_config(ds) == CONFIG
    assert results.run_config(ds)["model"]["width"] == 8


# ----------------------------------------------------------------------------- folders


def test_ensure_dir_creates_nested_folders(tmp_path):
    path = tmp_path / "a" / "b" / "c"
    assert results.ensure_dir(path) == path and path.is_dir()
    assert results.ensure_dir(path) == path  # again: it exists, fine


def test_ensure_dir_on_a_file_or_below_a_file_is_one_line(tmp_path):
    afile = tmp_path / "taken"
    afile.write_text("x")
    with pytest.raises(ResultsError, match="exists and is not a folder"):
        results.ensure_dir(afile)
    with pytest.raises(ResultsError, match="cannot create the output folder") as raised:
        results.ensure_dir(afile / "below")
    assert "\n" not in str(raised.value)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any folder whatever its mode")
def test_ensure_dir_on_a_read_only_folder_is_one_line(tmp_path):
    folder = tmp_path / "read-only"
    folder.mkdir(mode=0o500)
    try:
        with pytest.raises(ResultsError, match="cannot create the output folder"):
            results.ensure_dir(folder / "sub")
        with pytest.raises(ResultsError, match="not writable"):
            results.ensure_dir(folder)
    finally:
        folder.chmod(0o700)


def test_ensure_dir_refuses_a_folder_it_may_not_write(tmp_path, monkeypatch):
    """As any user (root included): the permission check itself, with os.access denying writes."""
    folder = tmp_path / "out"
    folder.mkdir()
    real_access = os.access
    monkeypatch.setattr(results.os, "access", lambda p, mode: not (mode & os.W_OK) and real_access(p, mode))
    with pytest.raises(ResultsError, match="the output folder is not writable; choose another --out"):
        results.ensure_dir(folder)


def test_remove_stale_temporaries_removes_ours_only(tmp_path):
    run = tmp_path / "run"
    ckpt = results.ensure_dir(run / "ckpt")
    ours = [run / ".results.nc.abc123.tmp", run / ".config.yaml.x.tmp", ckpt / ".group-0000.ckpt.npz.q.tmp"]
    theirs = [
        run / "results.nc",
        run / "notes.tmp",
        run / ".hidden",
        ckpt / "group-0000.ckpt.npz",
        run / "sub" / ".deeper.x.tmp",
    ]
    for path in ours + theirs:
        path.parent.mkdir(exist_ok=True)
        path.write_text("x")
    removed = results.remove_stale_temporaries(run)
    assert sorted(removed) == sorted(ours)
    assert not any(p.exists() for p in ours) and all(p.exists() for p in theirs)
    assert results.remove_stale_temporaries(run) == []
    assert results.remove_stale_temporaries(tmp_path / "never-made") == []
