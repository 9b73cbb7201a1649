"""The BatchNorm MLP: flax BatchNorm against closed forms and a numpy exponential average, the
row-mask trick against a genuinely smaller batch, and the init-gradient probe's depth mask against a
genuinely shallower net."""

from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import analysis, batchnorm_net, data, inits, models

WIDTH, ROWS, IN = 8, 16, 5


def spec(position="pre", depth=3, final_norm=True):
    return models.MLPSpec(IN, 1, depth, WIDTH, "tanh", "layernorm", position, final_norm=final_norm)


def hyper(depth=3):
    return models.MLPHyper(depth, True, inits.scheme_index("lecun_normal"), 0.01, 1.0, 0.0, 0.01)


def batch(seed, rows=ROWS):
    return jax.random.normal(jax.random.PRNGKey(seed), (rows, IN)) * 1.5 + 0.3


@pytest.mark.parametrize("position", ["pre", "post"])
@pytest.mark.parametrize("size", [2, 5, ROWS])
def test_training_mode_output_has_batch_mean_0_and_variance_v_over_v_plus_eps(position, size):
    params, stats = batchnorm_net.init(jax.random.PRNGKey(0), spec(position), hyper())
    mask = jnp.arange(ROWS) < size
    x = batch(1)
    _, _, (in_mean, in_var, out_mean, out_var) = batchnorm_net.apply(
        params, stats, x, mask, spec(position), hyper(), True, 0.9
    )
    # Independent input moments, float64 numpy: block 1's BatchNorm reads h0 = tanh(x W + b) (pre) or
    # h0 + tanh(W h0 + b) (post).
    h0 = np.tanh(np.asarray(x, float) @ np.asarray(params["input"]["w"], float))[:size]
    if position == "post":
        h0 = h0 + np.tanh(h0 @ np.asarray(params["hidden"]["w"][0], float))
    v = h0.var(axis=0)
    # float32 against float64: flax's E[x^2] - E[x]^2 carries ~B u E[x^2] (u = 2^-24), divided by
    # v + eps in the output; the inputs here have E[x^2] / (v + eps) < 1e3 and B <= 16: 16 x that.
    tol = 16 * ROWS * 2.0**-24 * np.max((h0**2).mean(axis=0) / (v + batchnorm_net.EPS)) + 1e-6
    np.testing.assert_allclose(in_var, v, atol=tol)
    np.testing.assert_allclose(out_mean, 0.0, atol=tol)
    np.testing.assert_allclose(out_var, v / (v + batchnorm_net.EPS), atol=tol)


def test_running_statistics_are_the_exponential_average_of_the_batch_moments():
    """k training steps on fresh batches (weights fixed): the running mean and variance of every
    block's BatchNorm equal a float64 numpy loop over the batch moments of that block's input."""
    s, h, m = spec("pre"), hyper(), 0.8
    params, stats = batchnorm_net.init(jax.random.PRNGKey(2), s, h)
    mask = jnp.ones(ROWS, bool)
    means, variances = [], []
    for k in range(12):
        x = batch(10 + k)
        # the input of block 1's BatchNorm, in numpy
        h0 = np.tanh(np.asarray(x, float) @ np.asarray(params["input"]["w"], float))
        means.append(h0.mean(axis=0))
        variances.append(h0.var(axis=0))
        _, stats, _ = batchnorm_net.apply(params, stats, x, mask, s, h, True, m)
    run_mean, run_var = 0.0, 1.0
    for mu, var in zip(means, variances):
        run_mean, run_var = m * run_mean + (1 - m) * mu, m * run_var + (1 - m) * var
    # float32 rounding of ~12 updates of O(1) numbers against float64
    np.testing.assert_allclose(stats["hidden"]["mean"][0], run_mean, atol=2e-6)
    np.testing.assert_allclose(stats["hidden"]["var"][0], run_var, atol=2e-6)
    np.testing.assert_allclose(analysis.exponential_average(np.asarray(means), 0.0, m)[-1], run_mean, rtol=1e-12)


def test_a_row_mask_is_a_smaller_batch_and_inference_uses_the_running_averages():
    s, h = spec("post"), hyper()
    params, stats = batchnorm_net.init(jax.random.PRNGKey(3), s, h)
    x = batch(4)
    masked, masked_stats, _ = batchnorm_net.apply(params, stats, x, jnp.arange(ROWS) < 4, s, h, True, 0.9)
    small, small_stats, _ = batchnorm_net.apply(params, stats, x[:4], jnp.ones(4, bool), s, h, True, 0.9)
    np.testing.assert_allclose(masked[:4], small, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), masked_stats, small_stats)
    # Inference mode with running mean 0 and variance 1: BatchNorm is x / sqrt(1 + eps), so the net
    # equals the no-norm net up to that factor; check one block by hand (depth 1, no final norm).
    s1 = spec("pre", depth=1, final_norm=False)
    p1, st1 = batchnorm_net.init(jax.random.PRNGKey(5), s1, hyper(1))
    out, _, _ = batchnorm_net.apply(p1, st1, x, jnp.ones(ROWS, bool), s1, hyper(1), False, 0.9)
    xn = np.asarray(x, float)
    h0 = np.tanh(xn @ np.asarray(p1["input"]["w"], float))
    h1 = h0 + np.tanh(h0 / np.sqrt(1 + batchnorm_net.EPS) @ np.asarray(p1["hidden"]["w"][0], float))
    np.testing.assert_allclose(out, h1 @ np.asarray(p1["output"]["w"], float), rtol=1e-4, atol=1e-5)


def test_masked_loss_is_the_loss_of_the_masked_rows():
    from gradlab.config import DataConfig

    out, y = jax.random.normal(jax.random.PRNGKey(6), (ROWS, 1)), jax.random.normal(jax.random.PRNGKey(7), (ROWS, 1))
    mask = jnp.arange(ROWS) < 5
    np.testing.assert_allclose(
        batchnorm_net.masked_loss(DataConfig(), out, y, mask),
        np.mean((np.asarray(out[:5]) - np.asarray(y[:5])) ** 2),
        rtol=1e-6,
    )


def test_batch_sizes_add_the_whole_minibatch_last():
    assert batchnorm_net.batch_sizes((8, 2, 4), 16, 64) == (2, 4, 8, 16)
    assert batchnorm_net.batch_sizes((2, 16), 16, 64) == (2, 16)
    assert batchnorm_net.batch_sizes((2,), 0, 64) == (2, 64)  # batch_size 0: the full batch
    assert batchnorm_net.batch_sizes((), 128, 64) == (64,)


def first_blocks(tree: dict, depth: int) -> dict:
    """A net's params or statistics cut to its first `depth` hidden blocks."""
    return {**tree, "hidden": jax.tree.map(lambda a: a[:depth], tree["hidden"])}


def test_init_gradients_at_a_masked_depth_are_those_of_a_genuinely_shallower_net():
    """Each probed depth d masks one net of max(probe_depths) blocks (not model.depth): its per-layer
    weight-gradient norms equal numpy norms of jax.grad of a net built with d blocks from the same
    init (the first d blocks' weights), and are exactly 0 for the blocks beyond d."""
    from gradlab.config import DataConfig

    depths, seeds = (1, 3), 2
    model = SimpleNamespace(
        depth=2,
        width=WIDTH,
        activation="tanh",
        norm="batchnorm",
        norm_position="pre",
        dtype="float32",
        unroll=1,
        final_norm=True,
        remat=False,
    )
    data_cfg = DataConfig(input_dim=IN, output_dim=1)
    cfg = SimpleNamespace(model=model, data=data_cfg, probe_depths=depths, probe_seeds=seeds, bn_momentum=0.9)
    hp = dict(zip((f"model.{name}" for name in models.CONFIG_FIELDS), hyper(2)))
    x, y = batch(8), jax.random.normal(jax.random.PRNGKey(9), (ROWS, 1))
    key = jax.random.PRNGKey(4)
    got = np.asarray(jax.jit(lambda k: batchnorm_net.init_gradients(cfg, hp, k, data.Data(x, y)))(key))
    assert got.shape == (len(depths), seeds, max(depths) + 2)
    everything = jnp.ones(ROWS, bool)
    norm_of = lambda w: np.linalg.norm(np.asarray(w, float))
    for i, d in enumerate(depths):
        shallow = batchnorm_net.config_net(cfg, d)

        @jax.jit
        def grad(params, stats, shallow=shallow, d=d):
            def loss(p):
                out, _, _ = shallow.apply(p, stats, x, everything, hyper(d), True)
                return batchnorm_net.masked_loss(data_cfg, out, y, everything)

            return jax.grad(loss)(params)

        for j, k in enumerate(jax.random.split(key, seeds)):
            params, stats = batchnorm_net.config_net(cfg, max(depths)).init(k, hyper(d))
            g = grad(first_blocks(params, d), first_blocks(stats, d) if stats else stats)
            expected = [norm_of(g["input"]["w"])] + [norm_of(w) for w in g["hidden"]["w"]] + [norm_of(g["output"]["w"])]
            np.testing.assert_allclose(got[i, j, : d + 1], expected[:-1], rtol=2e-5)
            np.testing.assert_allclose(got[i, j, -1], expected[-1], rtol=2e-5)
            np.testing.assert_array_equal(got[i, j, d + 1 : -1], 0.0)
