"""B5 at a tiny size: the per-example noise statistics against a dense Jacobian, accumulation
against the big batch, the learning-rate rule against its formula, and which checks it computes.
(Its `tiny` scale, where every check passes, is run by test_catalog.py.)"""

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gradlab import api, data, models, results, trials
from gradlab.errors import ConfigError
from gradlab.experiments import batch_size

NET = ["model.width=8", "model.depth=1", "data.input_dim=4", "seeds=1"]
SMALL = NET + [
    "data.examples=64",
    "data.batch_size=[4, 16]",
    "optim.accumulate_steps=[1, 4]",
    "base_batch=4",
    "steps=48",
    "chunk_steps=48",
    "optim.lr=0.01",
    "lr_scaling=[0.0, 1.0]",
    "warmup_epochs=[0.0, 1.0]",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A run smaller than the `tiny` scale (48 steps of a width-8 net), for the tests of its numbers."""
    out = tmp_path_factory.mktemp("bs")
    return api.execute("batch_size", SMALL, out=out, progress=False, draw=False), out


def test_noise_statistics_equal_the_dense_per_example_jacobian(tmp_path):
    """Full batch at step 0: trace_sigma = sum_i |g_i - G|^2 / (n - 1) and grad_sq = |G|^2, with g_i
    the rows of jax.jacrev of the per-example losses (float64 on the host)."""
    over = NET + [
        "data.examples=32",
        "data.batch_size=0",
        "steps=2",
        "chunk_steps=2",
        "optim.accumulate_steps=1",
        "lr_scaling=0.0",
        "warmup_epochs=0.0",
    ]
    outcome = api.execute("batch_size", over, out=tmp_path, progress=False, draw=False)
    cfg = api.resolve("batch_size", over).config
    spec, hyper = trials.mlp_spec(cfg), models.MLPHyper.from_config(cfg.model)
    params = models.init(jax.random.split(jax.random.PRNGKey(0))[0], spec, hyper)
    flat, unravel = ravel_pytree(params)
    xy = data.make(cfg.data)

    def losses(v):
        out, _ = models.apply(unravel(v), xy.x, spec, hyper)
        return jax.numpy.mean(jax.numpy.square(out - xy.y), axis=1)

    jac = np.asarray(jax.jacrev(losses)(flat), np.float64)  # (examples, params)
    mean = jac.mean(axis=0)
    ds = outcome.dataset
    np.testing.assert_allclose(float(ds["grad_sq"][0]), mean @ mean, rtol=1e-4)
    np.testing.assert_allclose(float(ds["trace_sigma"][0]), np.sum((jac - mean) ** 2) / (len(jac) - 1), rtol=1e-4)


def test_accumulated_updates_equal_the_big_batch(tiny):
    outcome, _ = tiny
    ds = outcome.dataset
    acc = ds["loss"].sel({"data.batch_size": 4, "optim.accumulate_steps": 4}).values
    big = ds["loss"].sel({"data.batch_size": 16, "optim.accumulate_steps": 1}).values
    per_update = acc.reshape(acc.shape[:-1] + (-1, 4)).mean(-1)  # the 4 minibatches of each update
    np.testing.assert_allclose(per_update, big[..., : per_update.shape[-1]], rtol=1e-5)
    assert not np.allclose(acc[..., 0::4], acc[..., 1::4])  # the minibatches do differ
    err, pairs = batch_size.accumulation_error(results.with_axes(ds, batch_size.AXES))
    assert pairs == 1 and err <= batch_size.ACCUMULATION_RTOL


def test_learning_rate_is_the_scaled_rate_after_a_gradual_warmup(tiny):
    """lr_t = lr (1 + (k - 1) min(1, (t + 1) B / (warmup x n))), k = B_eff / base, per minibatch step."""
    ds = tiny[0].dataset
    t = np.arange(ds.sizes["step"])
    for b, k in ((16, 1), (4, 4), (16, 4)):
        lane = ds["lr"].sel({"data.batch_size": b, "optim.accumulate_steps": k, "lr_scaling": 1.0})
        ramp = np.minimum(1.0, (t + 1) * b / 64.0)
        scale = b * k / 4
        np.testing.assert_allclose(lane.sel(warmup_epochs=1.0).values, 0.01 * (1 + (scale - 1) * ramp), rtol=1e-5)
        np.testing.assert_allclose(lane.sel(warmup_epochs=0.0).values, 0.01 * scale, rtol=1e-6)
    fixed = ds["lr"].sel({"lr_scaling": 0.0}).values
    np.testing.assert_allclose(fixed, 0.01, rtol=1e-6)


def test_one_compile_per_group_and_the_checks_computed(tiny):
    outcome, _ = tiny
    names = [c.name for c in outcome.checks]
    assert names[0].startswith("MultiSteps") and outcome.checks[0].passed
    assert any(n.startswith("linear rule at B=") for n in names)
    assert outcome.dataset.attrs["static_groups"] == 4


def test_layer_telemetry_is_refused_when_loaded():
    with pytest.raises(ConfigError, match="telemetry"):
        api.resolve("batch_size", ["telemetry=layers"])


def test_analysis_helpers_the_losses_are_read_with():
    """analysis.block_mean (per_update), trailing_mean (smoothed) and simple_noise_scale on hand-made numbers."""
    from gradlab import analysis

    x = np.array([[1.0, 3.0, 5.0, 7.0, 9.0], [0.0, 2.0, 4.0, 6.0, 8.0]])
    np.testing.assert_array_equal(analysis.block_mean(x, 2), [[2.0, 6.0], [1.0, 5.0]])  # the lone 9 and 8 dropped
    assert analysis.block_mean(x.astype(np.float32), 2).dtype == np.float32
    np.testing.assert_allclose(analysis.trailing_mean(x[0], 3), [1.0, 2.0, 3.0, 5.0, 7.0])
    with_nan = analysis.trailing_mean(np.array([1.0, 3.0, np.nan, 1.0, 1.0, 1.0]), 2)
    np.testing.assert_array_equal(with_nan, [1.0, 2.0, np.nan, np.nan, np.nan, np.nan])  # a divergence stays one
    # tr(Sigma) = 8 and |G|^2 = 1 at B = 4: |g_bar|^2 = |G|^2 + tr(Sigma) / B = 3, so B_simple = 8
    assert analysis.simple_noise_scale(np.array([8.0, np.nan, 8.0]), np.array([3.0, 3.0, np.nan]), 4) == 8.0
