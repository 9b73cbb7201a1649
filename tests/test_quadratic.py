"""B1 quadratic: GD on w0^2 + 4 w1^2 against its closed form, its stability edge 2/8, and
the other optimizers against loops written out in numpy."""

import contextlib
import io
import math
from pathlib import Path

import numpy as np
import pytest

from gradlab import api, cli
from gradlab.experiments import quadratic

F32_MAX = float(np.finfo(np.float32).max)
START = (3.0, 2.0)


def eta32(lr):
    """The learning rate as the float32 the compiled program holds."""
    return float(np.float32(lr))


@pytest.fixture(scope="module")
def gd_bowl(tiny_scale):
    """The tiny scale: plain GD on the bowl at 0.15, 0.24, 0.26 around the edge 0.25, 600 updates (long
    enough for 0.26 to overflow)."""
    return tiny_scale("quadratic")[0]


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """A small sweep through the command line: (exit code, printed text, dataset, out folder)."""
    out = tmp_path_factory.mktemp("cli")
    argv = [
        "run",
        "quadratic",
        "optim.name=[sgd, momentum, adamw]",
        "surface=[bowl, rosenbrock]",
        "optim.lr=[0.001, 0.01, 0.15, 0.26]",
        "optim.weight_decay=[0, 0.1]",
        "steps=60",
        "--out",
        str(out),
        "--quiet",
        "--check",
    ]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = cli.main(argv)
    run_dir = next((out / "runs").iterdir())
    return code, printed.getvalue(), api.load(run_dir), out


def final_w(ds, **sel):
    return ds["w"].sel(sel).isel(step=-1).values.astype(float)


def test_gd_ends_at_the_closed_form(gd_bowl):
    ds = gd_bowl.dataset
    eta, t = eta32(0.15), 30
    expected = np.array([(1 - 2 * eta) ** t * START[0], (1 - 8 * eta) ** t * START[1]])
    w_30 = ds["w"].sel({"optim.lr": 0.15}).isel(step=t - 1).values.astype(float)  # step i holds w after i+1 updates
    np.testing.assert_allclose(w_30, expected, rtol=1e-5)
    loss_30 = float(ds["loss"].sel({"optim.lr": 0.15}).isel(step=t - 1))
    assert loss_30 == pytest.approx(expected[0] ** 2 + 4 * expected[1] ** 2, rel=1e-5)


def test_gd_diverges_just_above_two_over_lambda_max(gd_bowl):
    ds = gd_bowl.dataset
    assert not ds["diverged"].sel({"optim.lr": 0.24}) and not ds["diverged"].sel({"optim.lr": 0.15})
    assert np.all(np.abs(final_w(ds, **{"optim.lr": 0.24})) < 1e-6)
    # eta = 0.26: |w1| = 2 |1 - 8 eta|^n; the loss 4 w1^2 first exceeds float32's max at update n.
    growth = abs(1 - 8 * eta32(0.26))
    w1_30 = float(ds["w"].sel({"optim.lr": 0.26}).isel(step=29, coord=1))
    assert abs(w1_30) == pytest.approx(START[1] * growth**30, rel=1e-4) and abs(w1_30) > 10 * START[1]
    n = math.ceil(math.log(F32_MAX / (4 * START[1] ** 2)) / (2 * math.log(growth)))
    assert int(ds["first_bad_step"].sel({"optim.lr": 0.26})) == n - 1
    assert bool(ds["diverged"].sel({"optim.lr": 0.26}))


def test_checks_show_the_edge(gd_bowl):
    checks = {c.name: c for c in gd_bowl.checks}
    assert len(checks) == 3, checks
    edge = next(c for c in checks.values() if c.name.startswith("GD bowl, eta=0.26 > 0.25"))
    assert edge.measured == pytest.approx(abs(1 - 8 * eta32(0.26)), rel=1e-3)


def test_cli_prints_passing_checks_and_draws_the_figure(cli_run):
    code, printed, ds, out = cli_run
    assert code == 0, printed
    table = [line for line in printed.splitlines() if line.startswith("GD bowl")]
    assert len(table) == 3 and all(line.rstrip().endswith("pass") for line in table), printed
    assert (out / "figures" / "quadratic.png").stat().st_size > 10_000
    fig = api.plot(ds)
    (legend,) = fig.legends  # one legend for the figure: each optimizer's rate and steps on both surfaces
    labels = [t.get_text() for t in legend.get_texts()]
    assert any(label.startswith("GD: bowl: η=") and "steps" in label for label in labels), labels
    assert any(label.startswith("AdamW: bowl:") and "wd=0.1" in label for label in labels), labels


def momentum_path(start, grad, lr, mu, steps):
    """Heavy ball as optax.sgd(momentum) writes it: m = g + mu m; w -= lr m."""
    w, m, out = np.array(start), np.zeros(2), []
    for _ in range(steps):
        m = grad(w) + mu * m
        w = w - lr * m
        out.append(w)
    return np.array(out)


def adamw_path(start, grad, lr, wd, steps, b1=0.9, b2=0.999, eps=1e-8):
    """AdamW (Loshchilov & Hutter 2019, decay coupled to lr as in optax): w -= lr (m^/(sqrt v^ + eps) + wd w)."""
    w, m, v, out = np.array(start), np.zeros(2), np.zeros(2), []
    for t in range(1, steps + 1):
        g = grad(w)
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g**2
        w = w - lr * ((m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps) + wd * w)
        out.append(w)
    return np.array(out)


GRADS = {
    "bowl": lambda w: np.array([2 * w[0], 8 * w[1]]),
    "rosenbrock": lambda w: np.array([-2 * (1 - w[0]) - 400 * w[0] * (w[1] - w[0] ** 2), 200 * (w[1] - w[0] ** 2)]),
}
STARTS = {"bowl": START, "rosenbrock": (-1.2, 1.0)}


@pytest.mark.parametrize("surface, momentum_lr", [("bowl", 0.01), ("rosenbrock", 0.001)])
def test_momentum_and_adamw_follow_their_update_rules(cli_run, surface, momentum_lr):
    ds = cli_run[2]
    sel = {"surface": surface, "optim.name": "momentum", "optim.lr": momentum_lr, "optim.weight_decay": 0.0}
    want = momentum_path(STARTS[surface], GRADS[surface], eta32(momentum_lr), eta32(0.9), ds.sizes["step"])
    assert np.all(np.isfinite(want))
    np.testing.assert_allclose(ds["w"].sel(sel).values, want, rtol=1e-4, atol=1e-6)
    sel = {"surface": surface, "optim.name": "adamw", "optim.lr": 0.01, "optim.weight_decay": 0.1}
    got = ds["w"].sel(sel).values
    want = adamw_path(STARTS[surface], GRADS[surface], eta32(0.01), eta32(0.1), ds.sizes["step"])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_each_vmapped_lane_equals_its_own_run(cli_run, tmp_path):
    ds = cli_run[2]
    alone = api.run(
        "quadratic",
        overrides=["surface=rosenbrock", "optim.name=adamw", "optim.lr=0.15", "optim.weight_decay=0.1", "steps=60"],
        out=tmp_path,
        progress=False,
    )
    lane = ds["w"].sel({"surface": "rosenbrock", "optim.name": "adamw", "optim.lr": 0.15, "optim.weight_decay": 0.1})
    np.testing.assert_array_equal(alone["w"].values, lane.values)


def test_cli_start_override_is_a_value_not_a_sweep(tmp_path: Path):
    argv = [
        "run",
        "quadratic",
        "optim.name=sgd",
        "surface=bowl",
        "optim.lr=0.15",
        "optim.weight_decay=0",
        "steps=30",
        "start=[3, 2]",
        "--out",
        str(tmp_path),
        "--quiet",
        "--no-figure",
        "--check",
    ]
    with contextlib.redirect_stdout(io.StringIO()):
        assert cli.main(argv) == 0


def test_every_optimizer_has_a_legend_label():
    from gradlab.config import OPTIMIZERS

    assert set(OPTIMIZERS) <= set(quadratic.LABELS)


def test_analysis_helpers_the_paths_are_read_with():
    """analysis.settling_step (Path2D.steps_to) and analysis.growth_per_step on hand-made sequences."""
    from gradlab import analysis

    assert analysis.settling_step([5.0, 0.5, 2.0, 0.1, 0.05], 1.0) == 3
    assert analysis.settling_step([0.5, 0.1], 1.0) == 0
    assert analysis.settling_step([0.5, 2.0], 1.0) is None and analysis.settling_step([0.5, np.nan], 1.0) is None
    assert analysis.settling_step([np.nan, 0.5], 1.0) == 1
    x = 2.0 * (-3.0) ** np.arange(6)  # |x| = 2, 6, 18, 54, 162, 486: a factor 3 a step
    assert analysis.growth_per_step(x) == pytest.approx(3.0, rel=1e-12)
    # past `high` (and inf, NaN) the last entry still within range decides: 54 = 2 * 3^3 at t = 3
    assert analysis.growth_per_step(np.append(x, [np.inf, np.nan]), high=100.0) == pytest.approx(3.0, rel=1e-12)
    assert analysis.growth_per_step([1.0, 0.5, 0.0], low=1e-30) == pytest.approx(0.5)  # the zero is not counted
    assert np.isnan(analysis.growth_per_step([1.0, np.inf]))
