"""The recurrent sequence classifier (gradlab/rnn.py): the gradient-through-time measurement against
a closed form (a hand-rolled linear RNN) and against finite differences (a flax SimpleCell, float64),
the length mask, the init edits, and tanh' by lag against its closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradlab import rnn


@pytest.mark.parametrize("gain", [0.8, 1.15])
def test_linear_rnn_input_gradient_is_gain_to_the_distance(gain):
    """h_t = W h_{t-1} + U x_t, W = gain Q, Q and U orthogonal, l = |h_{T-1}|^2 / 2: dl/dx_t =
    U^T (W^T)^(T-1-t) h_{T-1}, whose norm is gain^k |h_{T-1}| exactly (k = T - 1 - t). Float32 through
    T = 12 products of 8 x 8 orthogonal matrices: ~T N eps32 ~ 1e-5 relative, tested at 1e-4."""
    T, N, B = 12, 8, 5
    kq, ku, kx = jax.random.split(jax.random.PRNGKey(0), 3)
    Q = jnp.linalg.qr(jax.random.normal(kq, (N, N)))[0]
    U = jnp.linalg.qr(jax.random.normal(ku, (N, N)))[0]
    xs = jax.random.normal(kx, (B, T, N))

    def last_state(xs):
        def step(h, x_BxN):
            h = h @ (gain * Q).T + x_BxN @ U.T
            return h, None

        return jax.lax.scan(step, jnp.zeros((B, N)), jnp.swapaxes(xs, 0, 1))[0]

    loss = lambda xs: jnp.mean(0.5 * jnp.sum(jnp.square(last_state(xs)), axis=-1))
    grad = B * jax.grad(loss)(xs)  # per-example gradients, as loss_and_grads scales them
    measured = np.asarray(rnn.by_lag(rnn.per_step_grad_norm(grad), T))
    h_norm = np.linalg.norm(np.asarray(last_state(xs), float), axis=-1)
    expected = gain ** np.arange(T) * np.sqrt(np.mean(h_norm**2))
    np.testing.assert_allclose(measured, expected, rtol=1e-4)


def test_gradient_measurement_matches_finite_differences():
    """loss_and_grads' ||dl_i/dx_t|| against central differences of each example's loss, in float64:
    step 1e-5 gives truncation ~1e-10 |l'''| and rounding ~1e-16 / 1e-5, so rtol 1e-6 is ample."""
    with jax.enable_x64(True):
        B, T, F, H = 3, 5, 2, 6
        model = rnn.SequenceClassifier("simple", H, param_dtype=jnp.float64)
        xs = jax.random.normal(jax.random.PRNGKey(3), (B, T + 2, F), jnp.float64)  # 2 steps past the length
        labels = (xs[:, 0, 0] > 0).astype(jnp.float64)
        params = rnn.init_params(model, jax.random.PRNGKey(1), xs, T, 1.0, 0.0)
        _, _, _, _, norms = rnn.loss_and_grads(model, params, xs, labels, T)

        @jax.jit
        def example_losses_jit(x):
            logits, _ = model.apply({"params": params}, x, T)
            return optax.sigmoid_binary_cross_entropy(logits, labels)

        def example_losses(x):
            return np.asarray(example_losses_jit(x))

        x0, eps = np.asarray(xs), 1e-5
        fd = np.zeros(x0.shape)
        for t in range(T + 2):
            for f in range(F):
                e = np.zeros(x0.shape)
                e[:, t, f] = eps
                fd[:, t, f] = (example_losses(jnp.asarray(x0 + e)) - example_losses(jnp.asarray(x0 - e))) / (2 * eps)
    assert np.all(fd[:, T:] == 0)  # inputs after the read-out step do not reach the loss
    per_t = np.sqrt(np.mean(np.sum(fd**2, axis=-1), axis=0))  # RMS over the batch of |dl_i/dx_t|
    np.testing.assert_allclose(np.asarray(norms)[:T], per_t[:T][::-1], rtol=1e-6)
    assert np.all(np.isnan(np.asarray(norms)[T:]))


def test_reading_at_length_equals_running_the_short_sequence():
    model = rnn.SequenceClassifier("lstm", 8)
    xs = jax.random.normal(jax.random.PRNGKey(0), (4, 10, 3))
    params = rnn.init_params(model, jax.random.PRNGKey(1), xs, 10, 1.0, 1.0)
    long, _ = model.apply({"params": params}, xs, 6)
    short, _ = model.apply({"params": params}, xs[:, :6], 6)
    np.testing.assert_allclose(np.asarray(long), np.asarray(short), rtol=1e-6, atol=1e-7)


def test_init_scales_the_recurrent_kernel_and_adds_the_forget_bias():
    """The recurrent kernels are orthogonal (inits.orthogonal): ||gain Q||_2 = gain (float32 SVD: ~N eps)."""
    xs = jnp.zeros((2, 4, 3))
    simple = rnn.init_params(rnn.SequenceClassifier("simple", 16), jax.random.PRNGKey(0), xs, 4, 0.7, 1.0)
    singular = np.linalg.svd(np.asarray(simple["cell"]["h"]["kernel"]), compute_uv=False)
    np.testing.assert_allclose(singular, 0.7, rtol=1e-5)
    lstm = rnn.init_params(rnn.SequenceClassifier("lstm", 16), jax.random.PRNGKey(0), xs, 4, 1.0, 1.5)
    np.testing.assert_array_equal(np.asarray(lstm["cell"]["hf"]["bias"]), 1.5)  # flax's bias init is zero
    np.testing.assert_array_equal(np.asarray(lstm["cell"]["hi"]["bias"]), 0.0)
    for name in rnn.recurrent_kernels(lstm["cell"]):
        singular = np.linalg.svd(np.asarray(lstm["cell"][name]["kernel"]), compute_uv=False)
        np.testing.assert_allclose(singular, 1.0, rtol=1e-5)


def test_tanh_derivatives_by_lag_are_sech_squared_reversed_from_the_length():
    """tanh'(a) = sech(a)^2 = 1 / cosh(a)^2, written differently from 1 - tanh(a)^2 (float64); lag k
    reads step t = length - 1 - k and is NaN past the sequence's start."""
    B, T, H, length = 3, 7, 5, 5
    a = np.random.default_rng(0).normal(size=(B, T, H)) * 1.5
    with jax.enable_x64(True):
        got = {k: np.asarray(v) for k, v in rnn.tanh_derivatives_by_lag(jnp.tanh(jnp.asarray(a)), length).items()}
    sech2 = 1.0 / np.cosh(a) ** 2
    for k in range(T):
        t = length - 1 - k
        if t < 0:
            assert np.isnan(got["dtanh_sq"][k]) and np.isnan(got["log_max_dtanh"][k])
            continue
        np.testing.assert_allclose(got["dtanh_sq"][k], np.mean(sech2[:, t] ** 2), rtol=1e-10)
        np.testing.assert_allclose(got["dtanh_4th"][k], np.mean(sech2[:, t] ** 4), rtol=1e-10)
        np.testing.assert_allclose(got["log_max_dtanh"][k], np.mean(np.log(sech2[:, t].max(axis=1))), rtol=1e-10)
