import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from gradlab import inits, models
from gradlab.config import ACTIVATIONS

VARIANTS = (
    [(a, "none", "pre", False) for a in ACTIVATIONS]
    + [
        ("tanh", norm, position, residual)
        for norm, position, residual in itertools.product(("layernorm", "rmsnorm"), ("pre", "post"), (False, True))
    ]
    + [("relu", "none", "pre", True)]
)


def hyper(depth, residual=False, init="lecun_normal"):
    return models.MLPHyper(depth, residual, inits.scheme_index(init), 0.0, 1.0, 0.1, 0.1)


@pytest.mark.parametrize("activation, norm, position, residual", VARIANTS)
def test_gradients_match_finite_differences(activation, norm, position, residual):
    spec = models.MLPSpec(
        3, 2, depth=3, width=5, activation=activation, norm=norm, norm_position=position, dtype="float64"
    )
    with jax.enable_x64(True):
        h = hyper(3, residual)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), models.init(jax.random.PRNGKey(0), spec, h))
        if norm != "none":  # non-trivial norm parameters
            params["hidden"]["scale"] = params["hidden"]["scale"] * 1.3
            params["hidden"]["bias"] = params["hidden"]["bias"] + 0.1
        x = jax.random.normal(jax.random.PRNGKey(1), (4, 3), jnp.float64)
        probes = jax.tree.map(lambda a: a.astype(jnp.float64), models.zero_probes(spec, 4))

        def loss(params, probes):
            out, taps = models.apply(params, x, spec, h, probes)
            return jnp.sum(jnp.sin(out)) + 0.1 * jnp.sum(taps["act_rms"])

        check_grads(loss, (params, probes), order=1, modes=["rev"], atol=1e-5, rtol=1e-5)


def test_masked_depth_equals_the_shallower_net():
    deep = models.MLPSpec(4, 2, depth=6, width=8, activation="tanh", norm="layernorm")
    shallow = models.MLPSpec(4, 2, depth=3, width=8, activation="tanh", norm="layernorm")
    params = models.init(jax.random.PRNGKey(0), deep, hyper(6, True))
    cut = jax.tree.map(lambda a: a, params)
    cut["hidden"] = jax.tree.map(lambda a: a[:3], params["hidden"])
    x = jax.random.normal(jax.random.PRNGKey(1), (5, 4))
    out_masked, taps = models.apply(params, x, deep, hyper(3, True))
    out_shallow, _ = models.apply(cut, x, shallow, hyper(3, True))
    np.testing.assert_allclose(np.asarray(out_masked), np.asarray(out_shallow), rtol=1e-6, atol=1e-6)
    assert np.asarray(models.layer_mask(deep, hyper(3))).tolist() == [True] * 4 + [False] * 3 + [True]


def test_probe_gradient_is_the_backpropagated_signal():
    # For a linear net with residual=0 and one hidden layer, dL/dh_1 = dL/dout @ W_out^T exactly.
    spec = models.MLPSpec(3, 2, depth=1, width=4, activation="linear")
    h = hyper(1)
    params = models.init(jax.random.PRNGKey(0), spec, h)
    x = jax.random.normal(jax.random.PRNGKey(1), (6, 3))
    probes = models.zero_probes(spec, 6)
    grad = jax.grad(lambda p: jnp.sum(models.apply(params, x, spec, h, p)[0] ** 2) / 2)(probes)
    out, _ = models.apply(params, x, spec, h)
    np.testing.assert_allclose(np.asarray(grad["hidden"][0]), np.asarray(out @ params["output"]["w"].T), rtol=1e-5)


def test_residual_block_formula():
    spec = models.MLPSpec(2, 1, depth=1, width=3, activation="tanh", norm="rmsnorm", norm_position="pre")
    h = hyper(1, True)
    params = models.init(jax.random.PRNGKey(0), spec, h)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 2))
    p = params
    h0 = np.tanh(np.asarray(x) @ np.asarray(p["input"]["w"]) + np.asarray(p["input"]["b"]))
    z = h0 / np.sqrt(np.mean(h0**2, -1, keepdims=True) + 1e-6)
    h1 = h0 + np.tanh(z @ np.asarray(p["hidden"]["w"][0]) + np.asarray(p["hidden"]["b"][0]))
    ref = h1 @ np.asarray(p["output"]["w"]) + np.asarray(p["output"]["b"])
    np.testing.assert_allclose(np.asarray(models.apply(params, x, spec, h)[0]), ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation, norm, position, residual", VARIANTS)
@pytest.mark.parametrize("traced", [False, True], ids=["constant", "traced"])
def test_straight_line_blocks_equal_the_scan(activation, norm, position, residual, traced):
    """model.unroll >= depth runs the blocks as straight-line code: same outputs, taps and gradients
    as the scan, with depth and residual as constants of the program or traced (depth masked to 3 of 4)."""
    scan = models.MLPSpec(
        3, 2, depth=4, width=6, activation=activation, norm=norm, norm_position=position, dtype="float64", unroll=1
    )
    line = models.MLPSpec(**{**scan.__dict__, "unroll": 4})
    assert line.unrolled and not scan.unrolled
    with jax.enable_x64(True):
        h = hyper(3, residual)
        params = jax.tree.map(lambda a: a.astype(jnp.float64), models.init(jax.random.PRNGKey(0), scan, h))
        x = jax.random.normal(jax.random.PRNGKey(1), (5, 3), jnp.float64)
        stacked = jax.tree.map(lambda a: a.astype(jnp.float64), models.zero_probes(scan, 5))

        def run(spec, probes):
            def loss(params, probes, h):
                out, taps = models.apply(params, x, spec, h, probes)
                return jnp.sum(jnp.sin(out)) + 0.1 * jnp.sum(taps["act_rms"]), (out, taps)

            grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
            (value, aux), (grads, probe_grads) = (jax.jit(grad) if traced else grad)(params, probes, h)
            # the probes' own form: one stack for the scan, a tuple of layers for straight-line blocks
            assert isinstance(probe_grads["hidden"], tuple) == isinstance(probes["hidden"], tuple)
            delta_rms = models.probe_rms(probe_grads)
            return value, aux, grads, {**probe_grads, "hidden": models.hidden_stack(probe_grads)}, delta_rms

        per_layer = jax.tree.map(lambda a: a.astype(jnp.float64), models.zero_probes(line, 5))
        assert isinstance(per_layer["hidden"], tuple) and len(per_layer["hidden"]) == 4
        reference = run(scan, stacked)
        hidden_rms = np.sqrt(np.mean(np.square(np.asarray(reference[-2]["hidden"])), axis=(1, 2)))
        np.testing.assert_allclose(np.asarray(reference[-1])[1:-1], hidden_rms, rtol=1e-12)
        for probes in (stacked, per_layer):
            for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(run(line, probes))):
                np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("activation, shift", [("sigmoid", 8.0), ("relu", -0.3)], ids=["saturated", "some-dead"])
@pytest.mark.parametrize("unroll", [1, 2], ids=["scan", "straight"])
def test_layer_taps_match_numpy(activation, shift, unroll):
    """act_rms, act_std, preact_rms and dead_frac of every layer against float64 numpy, on 64 x 64
    activations (the sums' matrix-vector path). With sigmoids pushed to ~0.9997 the mean is 3000
    times the spread: a one-pass variance (mean(h^2) - mean^2) in float32 would be noise there."""
    spec = models.MLPSpec(8, 3, depth=2, width=64, activation=activation, unroll=unroll)
    h = hyper(2)
    params = models.init(jax.random.PRNGKey(0), spec, h)
    params["hidden"]["b"] = params["hidden"]["b"] + shift
    x = jax.random.normal(jax.random.PRNGKey(1), (64, 8))
    _, taps = models.apply(params, x, spec, h)

    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    act = {"sigmoid": lambda z: 1 / (1 + np.exp(-z)), "relu": lambda z: np.maximum(z, 0)}[activation]
    pres = [np.asarray(x, np.float64) @ p["input"]["w"] + p["input"]["b"]]
    hs = [act(pres[0])]
    for i in range(2):
        pres.append(hs[-1] @ p["hidden"]["w"][i] + p["hidden"]["b"][i])
        hs.append(act(pres[-1]))
    pres.append(hs[-1] @ p["output"]["w"] + p["output"]["b"])
    hs.append(pres[-1])
    hidden_std = np.std(hs[1])
    if activation == "sigmoid":
        assert np.mean(hs[1]) > 1000 * hidden_std
    else:
        assert 0 < np.mean(np.all(pres[1] <= 0, axis=0)) < 1  # some units dead, not all
    np.testing.assert_allclose(taps["act_rms"], [np.sqrt(np.mean(a**2)) for a in hs], rtol=1e-5)
    np.testing.assert_allclose(taps["act_std"], [np.std(a) for a in hs], rtol=1e-3)
    np.testing.assert_allclose(taps["preact_rms"], [np.sqrt(np.mean(z**2)) for z in pres], rtol=1e-5)
    np.testing.assert_array_equal(taps["dead_frac"], [np.mean(np.all(z <= 0, axis=0)) for z in pres])
