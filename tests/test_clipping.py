"""C1 at a tiny size: global-norm clipping against its formula on optax's chain and on recorded steps;
the cliff as stored against gradlab.surfaces (tested in test_surfaces.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import analysis, api, surfaces, transforms
from gradlab.config import OptimConfig
from gradlab.errors import ConfigError
from gradlab.experiments import clipping

TAU = 1.0  # the tiny net's |g| stays above it: the branch |g| < tau is tested on the chain above


def sgd_step(clip: str, threshold: float, grads):
    hp = {
        f"optim.{k}": jnp.float32(v)
        for k, v in dict(
            lr=1.0, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_threshold=threshold
        ).items()
    }
    tx = transforms.build(OptimConfig(name="sgd", clip=clip), hp, 10)
    params = jax.tree.map(jnp.ones_like, grads)
    updates, _ = tx.update(grads, tx.init(params), params)
    return updates


@pytest.mark.parametrize("norm", [0.01, 0.5, 0.999, 1.001, 3.0, 1e4])
def test_global_norm_clipped_sgd_step_has_norm_min_of_norm_and_tau(norm):
    """SGD at lr 1 after clip_by_global_norm(tau): update = -g min(1, tau / |g|), so |update| = min(|g|, tau)
    and its direction is -g's. float32 to ~1e-6 relative."""
    tau = 1.0
    rng = np.random.default_rng(int(norm * 1000))
    raw = {"a": rng.normal(size=(7, 5)), "b": rng.normal(size=(3,)), "c": {"d": rng.normal(size=(2, 2, 2))}}
    scale = norm / np.sqrt(sum(np.sum(x**2) for x in jax.tree.leaves(raw)))
    grads = jax.tree.map(lambda x: jnp.asarray(x * scale, jnp.float32), raw)
    updates = sgd_step("global_norm", tau, grads)
    flat_u = np.concatenate([np.ravel(u) for u in jax.tree.leaves(updates)]).astype(float)
    flat_g = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]).astype(float)
    np.testing.assert_allclose(np.linalg.norm(flat_u), min(norm, tau), rtol=2e-6)
    np.testing.assert_allclose(flat_u, -flat_g * min(1.0, tau / np.linalg.norm(flat_g)), rtol=2e-6, atol=1e-12)


def test_value_clipping_bounds_each_entry_and_leaves_small_ones():
    g = {"w": jnp.asarray([[-3.0, 0.05], [0.2, -0.01]])}
    u = np.asarray(sgd_step("value", 0.1, g)["w"])
    np.testing.assert_array_equal(u, -np.array([[-0.1, 0.05], [0.1, -0.01]], np.float32))


@pytest.fixture(scope="module")
def tiny(tiny_scale):
    """The `tiny` scale: width 8, depth 2, 40 steps, no clipping and global norm at lr 0.01, 0.1, 3."""
    return tiny_scale("clipping")


def test_tiny_run_computes_every_check_and_both_figures(tiny):
    outcome, out = tiny
    assert len(outcome.checks) == 7
    assert outcome.dataset.attrs["static_groups"] == 2  # one compile per clipping rule; lr vmapped
    assert (out / "figures" / "clipping_cliff.png").exists()


def test_stored_cliff_is_the_jax_descent_and_surface(tiny):
    """The figure and checks read the cliff from the results: it equals what the jax code gives now."""
    ds = tiny[0].dataset
    for clip, key in ((False, "plain"), (True, "clipped")):
        points, losses = surfaces.descend(surfaces.CLIFF, clip)
        np.testing.assert_array_equal(analysis.reference(ds, f"cliff_{key}"), points)
        np.testing.assert_array_equal(analysis.reference(ds, f"cliff_{key}_loss"), losses)
    stored, fresh = clipping.stored_cliff(ds), surfaces.cliff_surface(surfaces.CLIFF)
    for key in surfaces.CLIFF_KEYS:
        np.testing.assert_array_equal(stored[key], fresh[key])


def test_recorded_updates_follow_the_formula_and_unclipped_sgd_explodes(tiny):
    """Independent of the checks' code: lr 3 without clipping diverges, with global-norm clipping every
    recorded update is lr min(|g|, tau) long, and clip_scale = min(1, tau/|g|)."""
    ds = tiny[0].dataset
    assert bool(ds["diverged"].sel({"optim.clip": "none", "optim.lr": 3.0}).all())
    assert not bool(ds["diverged"].sel({"optim.clip": "global_norm"}).any())
    clipped = ds.sel({"optim.clip": "global_norm"})
    g = clipped["grad_global_norm"].values.astype(float)
    lr = clipped["optim.lr"].values.astype(float)[:, None]  # seeds=1: no seed axis
    np.testing.assert_allclose(clipped["update_global_norm"].values, lr * np.minimum(g, TAU), rtol=1e-5)
    np.testing.assert_allclose(clipped["clip_scale"].values, np.minimum(1.0, TAU / g), rtol=1e-5)
    assert (g > TAU).any()
    unclipped = ds.sel({"optim.clip": "none"})
    finite = np.isfinite(unclipped["grad_global_norm"].values)  # not the overflowing step before divergence
    assert np.all(unclipped["clip_scale"].values[finite] == 1.0)


def test_bad_threshold_is_a_config_error():
    with pytest.raises(ConfigError, match="value_threshold"):
        api.resolve("clipping", ["value_threshold=0"])
    with pytest.raises(ConfigError, match="optim.clip"):
        api.resolve("clipping", ["optim.clip=norm"])


def _agc_reference(g, w, a, unit_axes, eps=1e-3):
    """AGC written out in numpy: scale each unit's gradient to at most a * max(|w_unit|, eps)."""
    g_norm = np.sqrt((g.astype(np.float64) ** 2).sum(axis=unit_axes, keepdims=True))
    w_norm = np.maximum(np.sqrt((w.astype(np.float64) ** 2).sum(axis=unit_axes, keepdims=True)), eps)
    bound = a * w_norm
    return np.where(g_norm > bound, g * bound / np.maximum(g_norm, 1e-6), g)


def test_agc_clips_each_unit_of_each_stacked_layer_on_its_own():
    from gradlab.transforms import layerwise_agc

    rng = np.random.default_rng(0)
    depth, width, n_in = 3, 5, 4
    params = {
        "input": {"w": rng.normal(size=(n_in, width)), "b": rng.normal(size=width)},
        "hidden": {"w": rng.normal(size=(depth, width, width)), "b": rng.normal(size=(depth, width))},
    }
    grads = jax.tree.map(lambda p: rng.normal(size=p.shape) * rng.choice([1e-3, 1.0], size=p.shape[-1:]), params)
    params, grads = jax.tree.map(lambda x: np.asarray(x, np.float32), (params, grads))
    a = 0.05
    tx = layerwise_agc(a)
    out, _ = tx.update(grads, tx.init(params), params)
    expect = {
        "input": {
            "w": _agc_reference(grads["input"]["w"], params["input"]["w"], a, (0,)),
            "b": _agc_reference(grads["input"]["b"], params["input"]["b"], a, (0,)),
        },
        "hidden": {
            "w": _agc_reference(grads["hidden"]["w"], params["hidden"]["w"], a, (1,)),
            "b": _agc_reference(grads["hidden"]["b"], params["hidden"]["b"], a, (1,)),
        },
    }
    jax.tree.map(lambda o, e: np.testing.assert_allclose(np.asarray(o), e, rtol=1e-5, atol=1e-8), out, expect)
    # Units with tiny gradients pass untouched, large ones are clipped: a unit is one layer's column.
    hidden = np.asarray(out["hidden"]["w"])
    small = grads["hidden"]["w"][..., np.abs(grads["hidden"]["w"]).max(axis=(0, 1)) < 0.01]
    assert small.size and np.array_equal(hidden[..., np.abs(grads["hidden"]["w"]).max(axis=(0, 1)) < 0.01], small)
    norms = np.sqrt((hidden.astype(np.float64) ** 2).sum(axis=1))
    w_norms = np.sqrt((params["hidden"]["w"].astype(np.float64) ** 2).sum(axis=1))
    assert np.all(norms <= a * w_norms * (1 + 1e-5))
