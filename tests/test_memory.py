"""gradlab.memory on programs small enough to count by hand: a matmul's flops, a tanh's
transcendentals, the bytes of the arguments and outputs, and the residuals reverse mode keeps."""

import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import memory

B, D, W = 5, 3, 7  # batch, input dim, width: all different, so only activations end in (B, W)


def test_compiled_profile_counts_a_tanh_layer():
    """tanh(a @ b), a (8, 16), b (16, 4): 2 x 8 x 16 x 4 flops for the matmul (plus at most a few per
    output element), one tanh per output element, (128 + 64) x 4 argument bytes, 32 x 4 output bytes."""
    a, b = jnp.ones((8, 16), jnp.float32), jnp.ones((16, 4), jnp.float32)
    row = memory.compiled_profile(lambda a, b: jnp.tanh(a @ b), (a, b), repeats=2)
    assert 2 * 8 * 16 * 4 <= row["flops"] <= 2 * 8 * 16 * 4 + 8 * 32
    assert row["transcendentals"] == 32
    assert row["argument_bytes"] == (8 * 16 + 16 * 4) * 4
    assert row["output_bytes"] == 8 * 4 * 4
    assert row["temp_bytes"] >= 0 and row["step_seconds"] > 0


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_activation_residuals_of_two_sine_layers(dtype):
    """sum(sin(sin(x w1) w2)): reverse mode keeps cos of each layer's pre-activation (sin's derivative)
    and the first layer's output h (for the gradient of w2): three (B, W) arrays. x (B, D), w1 (D, W)
    and w2 (W, W) are kept too but do not end in (B, W)."""
    x, w1, w2 = jnp.ones((B, D), dtype), jnp.ones((D, W), dtype), jnp.ones((W, W), dtype)

    def fn(w1, w2, x):
        return jnp.sum(jnp.sin(jnp.sin(x @ w1) @ w2))

    size = np.dtype(dtype).itemsize
    assert memory.activation_residual_bytes(fn, (w1, w2, x), B, W) == 3 * B * W * size
    one = lambda w1, x: jnp.sum(jnp.sin(x @ w1))  # noqa: E731 (one layer: cos only; x, w1 are not (B, W))
    assert memory.activation_residual_bytes(one, (w1, x), B, W) == B * W * size
