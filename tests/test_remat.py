"""C6 at a tiny size: remat leaves the gradients unchanged, and the residual memory per layer is
the hand count of (batch, width) float32 arrays a tanh block keeps: 3 without remat (its input h,
its output y, tanh' = 1 - y^2; 2 on jax 0.12, whose tanh rule keeps 1 - y^2 alone: `plain_arrays`),
1 with it (the input h, from which the block is re-run)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import api, memory, models
from gradlab.errors import ConfigError
from gradlab.experiments import remat

BATCH, WIDTH = 16, 32  # the tiny scale's data.examples (full batch) and model.width


def plain_arrays() -> int:
    """(batch, width) arrays a plain tanh block keeps: its input h plus what tanh's own JVP rule keeps,
    y and 1 - y on jax 0.10.2 ((g + g y)(1 - y): 3 in all), 1 - y^2 on jax 0.12 (lax.one_minus_square: 2)."""
    z = jax.ShapeDtypeStruct((BATCH, WIDTH), jnp.float32)
    return 1 + sum(s.shape == z.shape for s in jax.eval_shape(lambda z: jax.tree.leaves(jax.vjp(jnp.tanh, z)[1]), z))


@pytest.fixture(scope="module")
def tiny(tiny_scale):
    """The experiment at its tiny scale (gradlab/configs/remat.yaml): (Outcome, its measured numbers)."""
    outcome = tiny_scale("remat")[0]
    return outcome, outcome.measured


def test_every_check_is_made(tiny):
    assert len(tiny[0].checks) == 6
    assert tiny[0].dataset.attrs["static_groups"] == 2  # one compile per remat value


def test_compiled_memory_slopes_match_the_hand_count(tiny):
    """temp bytes grow by plain_arrays() (plain) and 1 (remat) x B x W x 4 bytes per layer, within 5%
    (checks' SLOPE_RTOL)."""
    tab = tiny[1].profiles
    unit = BATCH * WIDTH * 4
    for flag, arrays in ((False, plain_arrays()), (True, 1)):
        depth, temp = tab[flag]["depth_measured"], tab[flag]["temp_bytes"]
        np.testing.assert_array_equal(depth, [2, 4, 8])
        slope = np.polyfit(depth, temp, 1)[0]
        assert abs(slope - arrays * unit) <= remat.SLOPE_RTOL * arrays * unit, (flag, slope / unit)


def _spec(depth, flag, activation="tanh"):
    return models.MLPSpec(in_dim=8, out_dim=2, depth=depth, width=WIDTH, activation=activation, remat=flag)


def _hyper(depth):
    return models.MLPHyper(
        depth=depth, residual=False, init=2, init_std=0.01, init_gain=1.0, bias_std=0.1, leaky_slope=0.01
    )


@pytest.mark.parametrize("activation", ["tanh", "relu"])
def test_gradients_with_and_without_remat_are_identical(activation):
    """Same float32 ops, re-run: equal to a few ulps (rtol 1e-6 ~ 8 eps32; atol for entries near 0)."""
    x = jax.random.normal(jax.random.PRNGKey(1), (BATCH, 8))
    params = models.init(jax.random.PRNGKey(0), _spec(6, False, activation), _hyper(6))

    def grads(flag):
        spec = _spec(6, flag, activation)
        return jax.grad(lambda p: jnp.sum(models.apply(p, x, spec, _hyper(6))[0] ** 2))(params)

    plain, checkpointed = grads(False), grads(True)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(checkpointed)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_vjp_residuals_per_layer_are_three_arrays_plain_and_one_with_remat():
    x = jnp.ones((BATCH, 8))

    def resid(depth, flag):
        spec, hyper = _spec(depth, flag), _hyper(depth)
        params = models.init(jax.random.PRNGKey(0), spec, hyper)
        loss = lambda p, x: jnp.sum(models.apply(p, x, spec, hyper)[0])  # noqa: E731
        return memory.activation_residual_bytes(loss, (params, x), BATCH, WIDTH)

    unit = BATCH * WIDTH * 4
    assert (resid(7, False) - resid(3, False)) == 4 * plain_arrays() * unit
    assert (resid(7, True) - resid(3, True)) == 4 * 1 * unit


def test_remat_adds_one_block_forward_to_the_compiled_cost(tiny):
    """XLA's cost analysis counts a scan body once: remat adds one block matmul, 2 B W^2 flops,
    plus a few elementwise ops per element (< 8 B W), and exactly B W extra tanh."""
    m = tiny[1]
    matmul = 2 * BATCH * WIDTH * WIDTH
    assert matmul <= m.extra_flops <= matmul + 8 * BATCH * WIDTH
    assert m.extra_transcendentals == BATCH * WIDTH


def test_training_runs_agree(tiny):
    ds = tiny[0].dataset
    loss = ds["loss"].transpose("model.remat", ...).values
    np.testing.assert_allclose(loss[0], loss[1], rtol=1e-6)
    assert np.all(np.diff(loss[0].ravel()) < 0)  # sgd on a smooth loss, small lr: the loss falls


@pytest.mark.parametrize("depths", [[4], [0, 4], [4, 4]])
def test_bad_depths_are_a_config_error(depths):
    with pytest.raises(ConfigError, match="depths"):
        api.resolve("remat", [f"depths={depths}"])
