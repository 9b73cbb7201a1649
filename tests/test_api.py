"""The Python API: execute stores and reuses, fresh recomputes the same numbers, measure/checks/
figures from stored results, resolve's hash, reproduce of one experiment."""

import matplotlib.figure
import matplotlib.pyplot as plt
import numpy as np
import pytest

from gradlab import api, results

# gradient_flow at a few seconds: 2 norms (2 compiles) x residual on/off x 2 seeds, one step.
SMALL = [
    "model.width=8",
    "model.depth=2",
    "seeds=2",
    "data.examples=16",
    "data.input_dim=4",
    "model.activation=tanh",
    "model.norm=[none, layernorm]",
    "model.residual=[false, true]",
]


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    out = tmp_path_factory.mktemp("api")
    return api.execute("gradient_flow", SMALL, "tiny", out=out, progress=False, draw=False), out


def assert_same_numbers(a, b):
    assert set(a.data_vars) == set(b.data_vars)
    for name in a.data_vars:
        np.testing.assert_array_equal(a[name].values, b[name].values, err_msg=name)
        assert a[name].dims == b[name].dims, name


def test_execute_stores_then_reuses(first):
    outcome, out = first
    assert not outcome.cached
    spec = api.resolve("gradient_flow", SMALL, "tiny")
    assert outcome.run_dir == results.run_dir(out, "gradient_flow", spec.hash)
    assert (outcome.run_dir / results.RESULTS_FILE).is_file() and not (outcome.run_dir / "ckpt").exists()
    ds = outcome.dataset
    assert ds["grad_norm"].dims == ("model.norm", "model.residual", "seed", "step", "layer")
    assert ds.sizes["layer"] == 4 and ds.sizes["step"] == 1 and int(ds["diverged"].sum()) == 0
    assert np.all(np.isfinite(ds["grad_norm"].values)) and np.all(ds["grad_norm"].values > 0)

    again = api.execute("gradient_flow", SMALL, "tiny", out=out, progress=False, draw=False)
    assert again.cached and again.run_dir == outcome.run_dir
    assert_same_numbers(again.dataset, ds)
    assert again.checks == outcome.checks and again.measured == outcome.measured


def test_fresh_recomputes_the_same_numbers(first, tmp_path):
    outcome, out = first
    stamp = (outcome.run_dir / results.RESULTS_FILE).stat().st_mtime_ns
    fresh = api.execute("gradient_flow", SMALL, "tiny", out=out, progress=False, draw=False, fresh=True)
    assert not fresh.cached
    assert (outcome.run_dir / results.RESULTS_FILE).stat().st_mtime_ns != stamp  # written anew
    assert_same_numbers(fresh.dataset, outcome.dataset)  # the CPU is deterministic: bit for bit
    elsewhere = api.execute("gradient_flow", SMALL, "tiny", out=tmp_path, progress=False, draw=False)
    assert not elsewhere.cached
    assert_same_numbers(elsewhere.dataset, outcome.dataset)


def test_measure_and_checks_of_a_loaded_dataset_are_the_outcomes(first):
    outcome, _ = first
    stored = api.load(outcome.run_dir)
    assert api.measure(stored) == outcome.measured
    assert api.checks(stored) == outcome.checks
    m = outcome.measured
    assert m.depth == 2 and m.seeds == 2 and m.sigmoid_ratio is None  # too shallow for the sigmoid ratio
    g = stored["grad_norm"].sel({"model.residual": True, "model.norm": "layernorm"}).isel(step=0).values
    hidden = g[..., 1:-1]  # (seed, layer): the hidden blocks
    assert m.even_spread == pytest.approx(np.max(hidden.max(axis=-1) / hidden.min(axis=-1)), rel=1e-12)
    (check,) = outcome.checks
    assert check.measured == m.even_spread and check.passed == (m.even_spread <= 10.0)


def test_figures_of_a_dataset_are_matplotlib_figures_main_first(first):
    outcome, _ = first
    drawn = api.figures(api.load(outcome.run_dir))
    try:
        assert list(drawn)[0] == ""
        assert all(isinstance(fig, matplotlib.figure.Figure) for fig in drawn.values())
        main = drawn[""]
        assert main.axes and any(ax.get_lines() for ax in main.axes)
    finally:
        for fig in drawn.values():
            plt.close(fig)


def test_resolve_hash_is_stable_and_follows_the_config():
    base = api.resolve("gradient_flow", [], "tiny")
    assert base.hash == api.resolve("gradient_flow", [], "tiny").hash
    assert len(base.hash) == 12 and int(base.hash, 16) >= 0
    assert base.config.model.width == 64  # the tiny preset
    assert api.resolve("gradient_flow", ["model.width=64"], "tiny").hash == base.hash  # same resolved config
    changed = {api.resolve("gradient_flow", [o], "tiny").hash for o in ["model.width=32", "seeds=3", "optim.lr=0.02"]}
    assert len(changed) == 3 and base.hash not in changed
    assert api.resolve("gradient_flow", [], "quick").hash != base.hash


def test_reproduce_one_cheap_experiment_at_tiny_scale(tmp_path):
    started, finished = [], []
    rows = api.reproduce(
        "tiny",
        only=["quadratic"],
        out=tmp_path,
        progress=False,
        on_start=lambda i, n, name: started.append((i, n, name)),
        on_done=lambda i, n, row: finished.append((i, n, row.experiment)),
    )
    (row,) = rows
    assert row.experiment == "quadratic" and not row.cached and row.error == ""
    assert row.checks and all(c.passed for c in row.checks) and row.passed, row.checks
    assert row.seconds > 0
    assert started == [(0, 1, "quadratic")] and finished == [(0, 1, "quadratic")]
    assert (tmp_path / "figures" / "quadratic.png").is_file() and (tmp_path / "figures" / "quadratic.pdf").is_file()
    (again,) = api.reproduce("tiny", only=["quadratic"], out=tmp_path, progress=False)
    assert again.cached and again.checks == row.checks
