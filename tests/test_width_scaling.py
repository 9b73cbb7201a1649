"""A6 at a small size: the metrics against closed forms and models.apply, one step at a time, and the
coordinate-check slopes of a two-width sweep against their theory windows."""

import jax
import numpy as np
import pytest

from gradlab import analysis, api, config, inits, models
from gradlab.errors import ConfigError
from gradlab.experiments import width_scaling as ws

LR = 1e-3


def point(overrides, index=0):
    """(trial, hp, config) of one sweep point, called directly (no engine)."""
    spec = api.resolve(
        "width_scaling", ["model.width=32", "seeds=1", "steps=2", "chunk_steps=2", f"optim.lr={LR}", *overrides]
    )
    group = config.plan(spec).groups[0]
    hp = {k: v[index].item() for k, v in group.hp.items()}
    return ws.trial(group.config), hp, group.config


@pytest.mark.parametrize("residual", [False, True])
def test_layer_outputs_are_what_models_apply_computes(residual):
    """Every layer's RMS against models.apply's act_rms taps, and the output itself, with a masked block."""
    spec = models.MLPSpec(in_dim=5, out_dim=3, depth=3, width=8, activation="tanh")
    hyper = models.MLPHyper(
        depth=2,
        residual=residual,
        init=inits.scheme_index("lecun_normal"),
        init_std=0.01,
        init_gain=1.0,
        bias_std=0.1,
        leaky_slope=0.01,
    )
    params = models.init(jax.random.PRNGKey(3), spec, hyper)
    x = jax.random.normal(jax.random.PRNGKey(4), (7, 5))
    out, taps = models.apply(params, x, spec, hyper)
    _, outputs = models.layer_values(params, x, spec, hyper)
    # The same float32 operations in the same order: equal up to a few roundings.
    np.testing.assert_allclose(outputs[2], out, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(models.per_layer_rms(outputs), taps["act_rms"], rtol=1e-6)
    np.testing.assert_array_equal(outputs[1][2], outputs[1][1])  # block 2 is past the active depth


def test_sgd_first_step_against_the_mse_gradient_written_out():
    """Step 0 records no change; the readout's first SGD update is -lr h^T 2(f - y)/B, and the
    output change after it equals models.apply at theta_1 minus at theta_0."""
    trial, hp, cfg = point(["optimizer=sgd", "parametrization=sp"])
    assert hp["optimizer"] == ws.OPTIMIZERS.index("sgd")
    state0 = trial.init(hp, jax.random.PRNGKey(0))
    state1, m0 = trial.step(hp, state0)
    _, m1 = trial.step(hp, state1)
    assert np.all(np.asarray(m0["act_change_rms"]) == 0) and float(m0["readout_change_rms"]) == 0

    h = np.asarray(state0.start_outputs[1][-1], float)  # last hidden layer at init, (B, W)
    w, b = (np.asarray(state0.train.params["output"][k], float) for k in ("w", "b"))
    y = np.asarray(state0.train.data.y, float)
    chi = 2.0 * (h @ w + b - y) / y.size  # d mean((f - y)^2) / df
    dw, db = -LR * h.T @ chi, -LR * chi.sum(axis=0)
    rms = lambda a: np.sqrt(np.mean(np.square(a)))  # noqa: E731
    # float32 forward and update against float64 arithmetic: relative 1e-5 covers the roundings.
    np.testing.assert_allclose(float(m0["update_rms"][-1]), rms(dw), rtol=1e-5)
    np.testing.assert_allclose(float(m1["readout_change_rms"]), rms(h @ dw + db), rtol=1e-4)

    spec, hyper = models.MLPSpec.from_config(cfg.model, cfg.data.input_dim, 1), models.MLPHyper.from_hp(hp)
    x = state0.train.data.x[: cfg.probe_examples]
    f0, _ = models.apply(state0.train.params, x, spec, hyper)
    f1, _ = models.apply(state1.train.params, x, spec, hyper)
    # The change is ~1e-3 of f ~ 1: float32 rounding of f (~1e-7) is 1e-4 of it.
    np.testing.assert_allclose(float(m1["act_change_rms"][-1]), rms(np.asarray(f1 - f0, float)), rtol=1e-3)


def test_adam_first_update_is_lr_per_entry_at_every_layer():
    """Adam's first step is lr g / (|g| + eps) (its bias corrections cancel at step 1): every entry
    moves by lr, up to eps/|g| ~ 1e-8 / 1e-4; the per-entry RMS is lr at every layer."""
    trial, hp, _ = point(["optimizer=[sgd, adam]", "parametrization=sp"], index=1)
    assert hp["optimizer"] == ws.OPTIMIZERS.index("adam")
    state0 = trial.init(hp, jax.random.PRNGKey(0))
    _, m0 = trial.step(hp, state0)
    np.testing.assert_allclose(np.asarray(m0["update_rms"]), LR, rtol=1e-3)


def test_mup_first_updates_follow_the_table():
    """muP at width 32, base width 8 (m = 4), by hand: SGD's readout update is -(lr / m) h^T chi and the
    readout init SP's x m^(-1/2); Adam moves every entry by lr x its layer's scale: input 1, hidden and
    readout 1/m (Tensor Programs V, Tab. 3)."""
    over = ["optimizer=[sgd, adam]", "parametrization=[sp, mup]", "model.base_width=8"]
    sgd_sp, hp_sp, _ = point(over, index=0)  # points: optimizer outer, parametrization, seed
    sgd_mup, hp, _ = point(over, index=1)
    assert hp["parametrization"] == 2 and hp["optimizer"] == 0  # PARAMETRIZATIONS = (sp, ntk, mup)
    state0 = sgd_mup.init(hp, jax.random.PRNGKey(0))
    w_sp = np.asarray(sgd_sp.init(hp_sp, jax.random.PRNGKey(0)).train.params["output"]["w"])
    np.testing.assert_allclose(np.asarray(state0.train.params["output"]["w"]), 0.5 * w_sp, rtol=1e-6)
    _, m0 = sgd_mup.step(hp, state0)
    h = np.asarray(state0.start_outputs[1][-1], float)
    w, b = (np.asarray(state0.train.params["output"][k], float) for k in ("w", "b"))
    y = np.asarray(state0.train.data.y, float)
    chi = 2.0 * (h @ w + b - y) / y.size
    np.testing.assert_allclose(float(m0["update_rms"][-1]), np.sqrt(np.mean(np.square(LR / 4 * h.T @ chi))), rtol=1e-5)

    adam, hp_adam, _ = point(over, index=3)
    assert hp_adam["optimizer"] == 1 and hp_adam["parametrization"] == 2
    _, m0 = adam.step(hp_adam, adam.init(hp_adam, jax.random.PRNGKey(0)))
    np.testing.assert_allclose(np.asarray(m0["update_rms"]), LR * np.array([1, 0.25, 0.25, 0.25]), rtol=1e-3)


def test_fit_slope_and_bias_limits():
    widths = np.array([64, 128, 256, 1024])
    scale = np.array([[0.5], [2.0], [3.0]])  # a per-seed constant factor moves no slope
    slope, err = analysis.seed_slope(np.log(widths), np.log(scale * widths**0.75))
    assert abs(slope - 0.75) < 1e-12 and err < 1e-12
    assert analysis.finite_width_bias(widths, 1e-9) < 1e-9  # no sub-leading term: no bias
    # A term n^(p - 1) dominating at every width lowers the slope by exactly 1.
    assert abs(analysis.finite_width_bias(widths, 1e12) - 1.0) < 1e-6
    # Two widths 128, 256 with crossover 128: RMS^2 ~ n^(2p) (1 + (128/n)^2) has slope p - ln(2/1.25) / (2 ln 2)
    # (the n^(p - 1) term; the n^(p - 1/2) one lowers it by ln(2/1.5) / (2 ln 2) only).
    assert analysis.finite_width_bias([128, 256], 128) == pytest.approx(np.log(2 / 1.25) / (2 * np.log(2)), rel=1e-12)


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.norm=layernorm", "model.norm"),
        ("probe_examples=100", "probe_examples"),
        ("optim.name=adam", "optim.name"),
    ],
)
def test_config_errors_name_the_key(override, key):
    with pytest.raises(ConfigError, match=key):
        point([override])


@pytest.fixture(scope="module")
def sweep(tiny_scale):
    """The tiny scale: widths 256 and 2048, 8 seeds, 2 steps."""
    return tiny_scale("width_scaling")


def test_two_width_sweep_makes_every_check_with_one_compile_per_width(sweep):
    outcome, out = sweep
    ds = outcome.dataset
    assert ds.attrs["static_groups"] == 2  # the optimizer and the seeds are vmapped
    assert [str(o) for o in ds["optimizer"].values] == ["sgd", "adam"]
    # init RMS of 2 hidden layers; 5 SP slopes per optimizer; muP: 3 layers' |slope| per optimizer
    assert len(outcome.checks) == 2 + 2 * 5 + 2 * 3
    assert (out / "figures" / "width_scaling.png").exists() and (out / "figures" / "width_scaling_updates.png").exists()


def test_sgd_output_change_grows_with_width_and_adam_faster(sweep):
    """From width 256 to 2048 (8x) SGD's output change grows like n (between n^(1/2) and n, see
    finite_width_bias) and Adam's like n^(3/2): Adam's ratio exceeds SGD's."""
    ds = sweep[0].dataset
    output = {opt: ws.series(ds, "act_change_rms", opt, ws.layer_index(ds)["output"], 1) for opt in ("sgd", "adam")}
    ratio = {opt: np.exp(np.mean(np.log(output[opt][:, 1] / output[opt][:, 0]))) for opt in ("sgd", "adam")}
    assert 8**0.5 < ratio["sgd"] <= 8**1.25
    assert ratio["adam"] > ratio["sgd"]
