"""A2 at the quick width (64) and depth (30): signal statistics at init against closed forms
and a mean-field recursion integrated with scipy (not the module's Gauss-Hermite), the He et
al. training picture, and zero init's symmetry checked on the trained weights' singular values."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate

from gradlab import api, config, data
from gradlab.experiments import init_schemes

WIDTH, DEPTH, SEEDS = 64, 30, 2  # the quick preset's width and depth


def slope_tol(width, layers, seeds):
    """4 sigma of a fitted slope of a random walk with step variance 5/width (ReLU's per-layer
    fluctuation of E[h^2]; continuum OLS: Var = 1.2 sigma^2 / layers), plus one step's log bias."""
    return 4 * math.sqrt(5 / width * 1.2 / layers / seeds) + 5 / (2 * width)


def hidden_moments(ds, activation, scheme):
    """Seed-mean E[h^2] at init over layers 0 (input projection) .. DEPTH."""
    sel = {"scheme": scheme}
    if "model.activation" in ds.dims:
        sel["model.activation"] = activation
    point = ds["act_rms"].sel(sel).isel(step=0)
    if "optimizer" in point.dims:
        point = point.isel(optimizer=0)
    return (point.transpose("seed", "layer").values.astype(float) ** 2).mean(axis=0)[: DEPTH + 1]


def fit(y):
    return float(np.polyfit(np.arange(len(y)), np.log(y), 1)[0])


@pytest.fixture(scope="module")
def relu(tiny_scale):
    """The tiny scale: ReLU, schemes zero, xavier_normal, he_normal, both optimizers, 2 seeds."""
    return tiny_scale("init_schemes")[0]


def test_relu_second_moment_changes_by_sigma_w2_over_2_per_layer(relu):
    tol = slope_tol(WIDTH, DEPTH, SEEDS)
    he = hidden_moments(relu.dataset, "relu", "he_normal")
    xavier = hidden_moments(relu.dataset, "relu", "xavier_normal")
    # He: sigma_w^2 = 2, E[relu(z)^2] = Var(z)/2 -> factor 1; Xavier on square layers: sigma_w^2 = 1 -> factor 1/2.
    assert abs(fit(he[1:]) - math.log(1.0)) <= tol
    assert abs(fit(xavier[1:]) - math.log(0.5)) <= tol
    assert he[-1] / xavier[-1] > 2.0 ** (DEPTH - 8)  # 2^30 apart in expectation; far beyond any fluctuation


def test_xavier_stalls_he_trains_and_adam_hides_the_difference(relu):
    ds = relu.dataset
    cfg = api.resolve("init_schemes", ["model.activation=relu"], "quick").config
    y = np.asarray(data.make(cfg.data).y, float)
    constant = float(np.mean((y - y.mean()) ** 2))  # MSE of the best constant prediction, full batch

    def final(optimizer, scheme):
        return float(np.median(ds["loss"].sel(optimizer=optimizer, scheme=scheme).isel(step=-1).values)) / constant

    assert final("momentum", "xavier_normal") > 0.9  # gradients ~2^-15 of He's: nothing but the bias moves
    assert final("momentum", "he_normal") < 0.25
    assert final("adam", "xavier_normal") < 0.25
    # Zero init under ReLU: relu(0) = 0, so every weight gradient is exactly 0 and only the output
    # bias learns: the loss goes to the constant's and the weights stay exactly zero.
    zero = ds.sel(scheme="zero").isel(step=-1)
    assert float(np.max(zero["weight_norm_after"].values)) == 0.0
    assert float(np.max(zero["loss"].values)) / constant > 0.99
    checks = {c.name: c for c in relu.checks}
    assert {"He + ReLU: slope of ln E[h^2] per layer", "Xavier + ReLU: slope of ln E[h^2] per layer"} <= set(checks)
    assert {p.name for p in relu.figures} >= {"init_schemes.png", "init_schemes_training.png"}


def tanh_mean_field(sigma_w2, m0, layers):
    """m_l = E[tanh(sqrt(sigma_w2 m_{l-1}) z)^2], integrated with scipy quad over the normal density."""
    m = [m0]
    for _ in range(layers):
        q = sigma_w2 * m[-1]
        density = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
        m.append(integrate.quad(lambda z: np.tanh(math.sqrt(q) * z) ** 2 * density(z), -12, 12, limit=200)[0])
    return np.asarray(m)


def test_tanh_standard_init_shrinks_the_signal_normalized_keeps_it(tmp_path):
    overrides = [
        "model.activation=tanh",
        "scheme=[standard, xavier_uniform]",
        "optimizer=momentum",
        f"seeds={SEEDS}",
        "steps=1",
    ]
    ds = api.execute("init_schemes", overrides, "quick", out=tmp_path, progress=False, draw=False).dataset
    tol = slope_tol(WIDTH, DEPTH, SEEDS)
    # Glorot & Bengio eq. 1: U[-1/sqrt(n), 1/sqrt(n)] has Var = 1/(3n): sigma_w^2 = 1/3; eq. 16 on a
    # square layer: sigma_w^2 = 1.
    for scheme, sigma_w2 in [("standard", 1 / 3), ("xavier_uniform", 1.0)]:
        m = hidden_moments(ds, "tanh", scheme)
        theory = tanh_mean_field(sigma_w2, m[0], DEPTH)
        assert abs(fit(m[1:]) - fit(theory[1:])) <= tol, scheme
    assert fit(hidden_moments(ds, "tanh", "standard")[10:]) == pytest.approx(math.log(1 / 3), abs=tol)  # linear regime


def test_zero_init_trains_yet_every_weight_matrix_stays_rank_one():
    """sigmoid(0) = 1/2, so a zero-init sigmoid net learns; its units stay identical. Run the Trial by
    hand, then look at the trained weights' singular values (numpy, outside the compiled step)."""
    overrides = [
        "model.activation=sigmoid",
        "model.depth=4",
        "model.width=16",
        "scheme=[zero, he_normal]",
        "optimizer=momentum",
        "optim.lr=0.1",
        "seeds=1",
        "steps=100",
    ]
    spec = api.resolve("init_schemes", overrides, "quick")
    group = config.plan(spec).groups[0]
    trial = init_schemes.trial(group.config)
    step = jax.jit(trial.step)
    schemes = spec.axis("scheme")
    assert schemes is not None
    for point, scheme in enumerate(schemes.values):
        hp = {k: jnp.asarray(v[point]) for k, v in group.hp.items()}
        state = trial.init(hp, jax.random.PRNGKey(int(hp["seed"])))
        for _ in range(100):
            state, metrics = step(hp, state)
        w = np.asarray(state.params["hidden"]["w"], np.float64)  # (depth, n, n)
        sv = np.linalg.svd(w, compute_uv=False)
        if scheme == "zero":
            assert np.all(sv[:, 0] > 0)  # every hidden layer moved away from zero ...
            assert np.all(sv[:, 1] <= 1e-6 * sv[:, 0])  # ... and is rank 1
            np.testing.assert_allclose(w, w[:, :1, :1] * np.ones_like(w), rtol=1e-6)  # all entries equal
            assert float(np.max(metrics["unit_spread_after"])) <= init_schemes.SYMMETRY_TOL
        else:
            assert np.all(sv[:, 1] > 0.1 * sv[:, 0])
            assert float(np.min(metrics["unit_spread_after"][:-1])) > 0.5
