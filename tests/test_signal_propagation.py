"""A4 at a small size: gradient growth per layer against chi_1 computed with scipy's adaptive
quadrature (not the module's Gauss-Hermite), the phases, and the probe's own pieces."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from gradlab import analysis, api, models, trials
from gradlab.experiments import signal_propagation as sp

SW2 = [0.5, 1.0, 2.0, 4.0]  # the tiny scale's grid: model.init_gain, model.bias_std are their square roots
SB2 = [0.0, 0.1, 0.3]


def gauss(f):
    """E[f(z)], z ~ N(0, 1), by adaptive quadrature."""
    return integrate.quad(lambda z: f(z) * np.exp(-z * z / 2) / np.sqrt(2 * np.pi), -12, 12, epsabs=1e-13)[0]


def ln_chi_1_scipy(sw2, sb2):
    q, previous = 1.0, np.inf
    while abs(q - previous) > 1e-12:  # the points tested are off the edge: the map contracts
        previous, q = q, sw2 * gauss(lambda z: np.tanh(np.sqrt(q) * z) ** 2) + sb2
    return np.log(sw2 * gauss(lambda z: (1 - np.tanh(np.sqrt(q) * z) ** 2) ** 2))


@pytest.fixture(scope="module")
def outcome(tiny_scale):
    """The tiny scale: width 128, depth 24 (6 skipped), 4 seeds, the SW2 x SB2 grid."""
    return tiny_scale("signal_propagation")[0]


def test_the_grid_is_the_tiny_scale_and_all_five_checks_are_made(outcome):
    ds = outcome.dataset
    np.testing.assert_allclose(ds["model.init_gain"].values ** 2, SW2, rtol=1e-12)
    np.testing.assert_allclose(ds["model.bias_std"].values ** 2, SB2, rtol=1e-12, atol=1e-15)
    names = [c.name for c in outcome.checks]
    assert len(names) == 5, names
    assert int(outcome.dataset["diverged"].sum()) == 0


def test_fitted_slope_matches_chi_1_from_adaptive_quadrature(outcome):
    ds = outcome.dataset
    tol = sp.tolerance(128, 24 - 6, 4)  # the catalog's 0.015 scaled to width 128, 18 layers, 4 seeds
    assert 0.04 < tol < 0.06
    layers = np.arange(7, 25)
    for sw2, sb2 in [(0.5, 0.3), (2.0, 0.1), (4.0, 0.0), (4.0, 0.3)]:
        delta = ds["delta_rms"].sel({"model.init_gain": np.sqrt(sw2), "model.bias_std": np.sqrt(sb2)}, method="nearest")
        y = np.log(delta.isel(step=0).values[:, layers].astype(float) ** 2)  # (seed, layer)
        slopes = [np.polyfit(layers, row, 1)[0] for row in y]
        assert -np.mean(slopes) == pytest.approx(ln_chi_1_scipy(sw2, sb2), abs=tol), (sw2, sb2)


def test_phases_ordered_and_chaotic(outcome):
    g = outcome.measured
    assert np.all(g.mean_rate[0] < -0.4)  # sigma_w^2 = 0.5: chi_1 <= 0.5, gradients vanish toward the input
    assert np.all(g.mean_rate[-1] > 0.15)  # sigma_w^2 = 4: chaos, they explode
    # Off the edge the measured depth scale of the correlation follows -1/ln chi_1 (ordered phase).
    assert np.isfinite(g.xi_measured[0, 1:]).all()
    np.testing.assert_allclose(1 / g.xi_measured[0, 1:], -g.ln_chi[0, 1:], atol=g.tolerance)


def test_preactivations_are_those_of_models_apply():
    """models.layer_values' pre-activations, the probe's, against models.apply: same readout output."""
    from gradlab import config

    spec_cfg = config.load(
        "signal_propagation",
        sp.Config,
        [
            "model.width=16",
            "model.depth=5",
            "model.init_gain=1.3",
            "model.bias_std=0.4",
            "data.examples=6",
            "skip_layers=1",
        ],
    ).config
    spec = trials.mlp_spec(spec_cfg)
    hyper = models.MLPHyper.from_config(spec_cfg.model)._replace(depth=3)  # masked: 3 of 5 blocks
    params = models.init(jax.random.PRNGKey(3), spec, hyper)
    x = jax.random.normal(jax.random.PRNGKey(4), (6, spec.in_dim))
    out, taps = models.apply(params, x, spec, hyper)
    pre, _ = models.layer_values(params, x, spec, hyper, dtype="float32")
    h_last = jnp.tanh(pre[3])  # the third hidden block's output; blocks 4, 5 are masked
    np.testing.assert_allclose(h_last @ params["output"]["w"] + params["output"]["b"][None], out, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.sqrt(np.mean(np.square(pre), axis=(1, 2)))[:4], taps["preact_rms"][:4], rtol=1e-5)
    # 1 - cos of the disjoint pairs, written with numpy dot products
    p = np.asarray(pre, np.float64)
    cos = (
        np.sum(p[:, 0::2] * p[:, 1::2], -1) / np.linalg.norm(p[:, 0::2], axis=-1) / np.linalg.norm(p[:, 1::2], axis=-1)
    )
    np.testing.assert_allclose(models.decorrelation(pre), np.mean(1 - cos, axis=1), atol=1e-6)


def test_slope_noise_model_against_simulated_random_walks():
    rng = np.random.default_rng(1)
    n = 30
    walks = np.cumsum(rng.standard_normal((20000, n)), axis=1)
    slopes = walks @ analysis.ols_weights(n)
    np.testing.assert_allclose(slopes, np.polyfit(np.arange(n), walks.T, 1)[0], atol=1e-9)
    assert np.std(slopes) == pytest.approx(analysis.random_walk_slope_std(n), rel=0.03)
    assert analysis.random_walk_slope_std(400) == pytest.approx(np.sqrt(6 / (5 * 400)), rel=0.01)  # continuum limit


@pytest.mark.slow
def test_paper_scale_slope_within_0_015(tmp_path):
    out = api.execute("signal_propagation", [], "paper", out=tmp_path, progress=False, draw=False)
    checks = {c.name.split(" (")[0]: c for c in out.checks}
    assert checks["max |slope - ln chi_1|"].measured <= 0.015
    assert all(c.passed for c in out.checks), out.checks


def test_probe_records_supervised_mlps_delta_rms_at_step_0():
    """The probe's own forward/backward against the training Trial's telemetry before its first update."""
    from gradlab import config

    overrides = [
        "model.width=16",
        "model.depth=5",
        "model.init_gain=1.3",
        "model.bias_std=0.4",
        "data.examples=8",
        "data.input_dim=6",
        "skip_layers=1",
    ]
    spec = config.load("signal_propagation", sp.Config, overrides)
    hp = {k: v[0] for k, v in config.plan(spec).groups[0].hp.items()}
    key = jax.random.PRNGKey(7)
    probe = sp.trial(spec.config)
    _, mine = jax.jit(probe.step)(hp, probe.init(hp, key))
    train = trials.supervised_mlp(spec.config)
    _, theirs = jax.jit(train.step)(hp, jax.jit(train.init)(hp, key))
    np.testing.assert_allclose(mine["delta_rms"], theirs["delta_rms"], rtol=1e-5)
    np.testing.assert_allclose(mine["preact_rms"], theirs["preact_rms"], rtol=1e-5)
    assert float(mine["loss"]) == pytest.approx(float(theirs["loss"]), rel=1e-6)


@pytest.mark.parametrize("override, key", [("model.norm=layernorm", "model.norm"), ("skip_layers=22", "skip_layers")])
def test_config_errors_name_the_key_before_anything_runs(override, key):
    from gradlab.errors import ConfigError

    with pytest.raises(ConfigError, match=f": {key}: "):
        api.resolve("signal_propagation", [override], "tiny")
