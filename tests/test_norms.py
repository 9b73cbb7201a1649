import jax
import numpy as np

from gradlab.norms import layer_norm, rms_norm


def test_layer_norm_equals_numpy_reference():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (5, 7))) * 3 + 1
    scale = np.linspace(0.5, 2.0, 7).astype(np.float32)
    bias = np.linspace(-1, 1, 7).astype(np.float32)
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5) * scale + bias
    np.testing.assert_allclose(np.asarray(layer_norm(x, scale, bias)), ref, rtol=1e-5, atol=1e-5)


def test_rms_norm_equals_numpy_reference():
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(1), (4, 9))) * 2 - 0.5
    scale = np.linspace(0.5, 2.0, 9).astype(np.float32)
    ref = x / np.sqrt(np.mean(x**2, -1, keepdims=True) + 1e-6) * scale
    np.testing.assert_allclose(np.asarray(rms_norm(x, scale)), ref, rtol=1e-5, atol=1e-6)
