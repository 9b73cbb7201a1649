"""A5 at a small size: orthogonal linear nets are isometries, the stored Jacobian is the product
of the layers' W_l diag(phi'(z_l)) written out in numpy, and the spectral variance follows
free probability (r = L for a Gaussian linear net)."""

import jax
import numpy as np
import pytest

from gradlab import api, config
from gradlab.experiments import jacobian_spectrum as js

WIDTH = 32  # the tiny scale: width 32, depths 1, 4, 8, 8 seeds, input_dim 16


@pytest.fixture(scope="module")
def outcome(tiny_scale):
    return tiny_scale("jacobian_spectrum")[0]


def test_all_five_checks_are_made(outcome):
    assert outcome.dataset.sizes["col"] == WIDTH
    assert len(outcome.checks) == 5, outcome.checks


def test_orthogonal_linear_net_is_an_isometry(outcome):
    jac = outcome.dataset["jacobian"].sel({"model.activation": "linear", "model.init": "orthogonal"})
    jac = jac.isel(step=0).values.astype(np.float64).reshape(-1, WIDTH, WIDTH)
    # J^T J = I to float32 rounding: every singular value is 1 (no SVD needed for this).
    gram_error = np.abs(np.einsum("bij,bik->bjk", jac, jac) - np.eye(WIDTH)).max()
    assert gram_error <= 2 * js.isometry_tolerance(8, WIDTH)
    gauss = outcome.dataset["jacobian"].sel(
        {"model.activation": "linear", "model.init": "lecun_normal", "model.depth": 8}
    )
    s = np.linalg.svd(gauss.isel(step=0).values.astype(np.float64), compute_uv=False)
    assert s.max() / s.min() > 10  # the Gaussian product is far from isometric: the test can tell them apart


def test_jacobian_is_the_product_of_layer_factors():
    """Rebuild one point's net and multiply out W_l diag(tanh'(z_l)) in numpy."""
    spec = config.load(
        "jacobian_spectrum",
        js.Config,
        ["model.activation=tanh", "model.init=lecun_normal", "model.depth=4", "seeds=1"],
        "tiny",
    )
    group = config.plan(spec).groups[0]
    trial = js.trial(group.config)
    hp = {k: v[0] for k, v in group.hp.items()}
    state = jax.jit(trial.init)(hp, jax.random.PRNGKey(0))
    _, metrics = jax.jit(trial.step)(hp, state)
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), state.params)
    x = np.asarray(state.x, np.float64)[0]
    h = np.tanh(x @ p["input"]["w"] + p["input"]["b"])
    product = np.eye(WIDTH)
    for w, b in zip(p["hidden"]["w"][:4], p["hidden"]["b"][:4]):
        z = h @ w + b
        product = product @ w @ np.diag(1 - np.tanh(z) ** 2)  # d h_l / d h_0 in row-vector form
        h = np.tanh(z)
    # jacfwd gives J[out, in]; the row-vector product above is its transpose.
    np.testing.assert_allclose(np.asarray(metrics["jacobian"][0]), product.T, rtol=1e-4, atol=1e-5)


def test_gaussian_linear_variance_grows_like_depth(outcome):
    m = outcome.measured
    mean, se, theory = m.mean, m.se, m.theory
    a, i = m.activations.index("linear"), m.schemes.index("lecun_normal")
    depths = np.asarray(m.depths, float)
    # Marchenko-Pastur: E[(s^2)^2] / E[s^2]^2 = L + 1 for a product of L square Gaussian factors
    # (Fuss-Catalan moments), so r = L; corrections are O(L^2 / N) at width N.
    np.testing.assert_allclose(theory[a, i, 0], depths)
    assert np.all(np.abs(mean[a, i, 0] - depths) <= 4 * se[a, i, 0] + depths**2 / WIDTH)
    o = m.schemes.index("orthogonal")
    t = m.activations.index("tanh")
    assert np.all(mean[t, o, 0] < 0.5 * mean[t, i, 0])  # orthogonal tanh stays narrower at every depth


def test_critical_gains_give_chi_1_equal_one():
    from gradlab import meanfield

    for act, gain in js.CRITICAL_GAIN.items():
        q = 1e-8 if act == "tanh" else 1.0  # tanh: chi_1 = 1 on the critical line's end q* -> 0
        assert meanfield.chi_1(gain**2, q, act) == pytest.approx(1.0, abs=1e-6), act


def test_critical_gain_of_an_unknown_activation_is_refused_before_anything_runs():
    from gradlab.errors import ConfigError

    with pytest.raises(ConfigError, match=": model.activation: critical_gain=true knows linear, tanh, relu"):
        api.resolve("jacobian_spectrum", ["model.activation=[tanh, sigmoid]"], "tiny")
    assert api.resolve("jacobian_spectrum", ["model.activation=sigmoid", "critical_gain=false"], "tiny")
