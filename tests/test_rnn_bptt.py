"""C4 at a tiny size: the gradient-through-time measurement against a closed form (a hand-rolled
linear RNN) and against finite differences (a flax SimpleCell, float64), the length mask, the init
edits, and the experiment's checks on a tiny sweep."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradlab import api, transforms
from gradlab.config import OptimConfig
from gradlab.experiments import rnn_bptt


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The `tiny` scale: simple and LSTM cells, T = 6 and 16, hidden 16, 3 steps, 2 seeds."""
    out = tmp_path_factory.mktemp("rnn_bptt")
    return api.execute("rnn_bptt", [], "tiny", out=out, progress=False, draw=True), out


def test_every_check_both_figures_and_one_compile_per_cell(tiny):
    outcome, out = tiny
    assert len(outcome.checks) == 4
    assert (out / "figures" / "rnn_bptt_training.png").exists()
    assert outcome.dataset.attrs["static_groups"] == 2  # one compile per cell; length, clip, seed vmapped
    grad = outcome.dataset["grad_x_norm"].sel(seq_len=6).values
    assert np.all(np.isnan(grad[..., 6:])) and np.all(grad[..., :6] > 0)  # lags beyond T - 1 do not exist


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
    measured = np.asarray(rnn_bptt.by_lag(rnn_bptt.per_step_grad_norm(grad), T))
    h_norm = np.linalg.norm(np.asarray(last_state(xs), float), axis=-1)
    expected = gain ** np.arange(T) * np.sqrt(np.mean(h_norm**2))
    np.testing.assert_allclose(measured, expected, rtol=1e-4)
    slope = rnn_bptt.fit_slope(measured, T)
    assert abs(slope - np.log(gain)) < 1e-4


def test_gradient_measurement_matches_finite_differences():
    """loss_and_grads' ||dl_i/dx_t|| against central differences of each example's loss, in float64:
    step 1e-5 gives truncation ~1e-10 |l'''| and rounding ~1e-16 / 1e-5, so rtol 1e-6 is ample."""
    with jax.enable_x64(True):
        B, T, F, H = 3, 5, 2, 6
        model = rnn_bptt.SequenceClassifier("simple", H, param_dtype=jnp.float64)
        xs = jax.random.normal(jax.random.PRNGKey(3), (B, T + 2, F), jnp.float64)  # 2 steps past the length
        labels = (xs[:, 0, 0] > 0).astype(jnp.float64)
        params = rnn_bptt.init_params(model, jax.random.PRNGKey(1), xs, T, 1.0, 0.0)
        _, _, _, _, norms = rnn_bptt.loss_and_grads(model, params, xs, labels, T)

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
    model = rnn_bptt.SequenceClassifier("lstm", 8)
    xs = jax.random.normal(jax.random.PRNGKey(0), (4, 10, 3))
    params = rnn_bptt.init_params(model, jax.random.PRNGKey(1), xs, 10, 1.0, 1.0)
    long, _ = model.apply({"params": params}, xs, 6)
    short, _ = model.apply({"params": params}, xs[:, :6], 6)
    np.testing.assert_allclose(np.asarray(long), np.asarray(short), rtol=1e-6, atol=1e-7)


def test_init_scales_the_recurrent_kernel_and_adds_the_forget_bias():
    """The recurrent kernels are orthogonal (inits.orthogonal): ||gain Q||_2 = gain (float32 SVD: ~N eps)."""
    xs = jnp.zeros((2, 4, 3))
    simple = rnn_bptt.init_params(rnn_bptt.SequenceClassifier("simple", 16), jax.random.PRNGKey(0), xs, 4, 0.7, 1.0)
    singular = np.linalg.svd(np.asarray(simple["cell"]["h"]["kernel"]), compute_uv=False)
    np.testing.assert_allclose(singular, 0.7, rtol=1e-5)
    lstm = rnn_bptt.init_params(rnn_bptt.SequenceClassifier("lstm", 16), jax.random.PRNGKey(0), xs, 4, 1.0, 1.5)
    np.testing.assert_array_equal(np.asarray(lstm["cell"]["hf"]["bias"]), 1.5)  # flax's bias init is zero
    np.testing.assert_array_equal(np.asarray(lstm["cell"]["hi"]["bias"]), 0.0)
    for name in rnn_bptt.recurrent_kernels(lstm["cell"]):
        singular = np.linalg.svd(np.asarray(lstm["cell"][name]["kernel"]), compute_uv=False)
        np.testing.assert_allclose(singular, 1.0, rtol=1e-5)


def test_the_compiled_sweep_calls_no_lapack():
    """flax's default orthogonal init is a LAPACK QR; four at once (an LSTM's recurrent kernels, batched
    over a sweep) hung jaxlib 0.10.2 on 2 cores, and ||W||_2 by jnp.linalg.norm is a LAPACK SVD. The
    compiled init and chunk programs of both cells hold no custom call (LAPACK's way in) at all."""
    from gradlab import config, engine

    spec = config.load("rnn_bptt", rnn_bptt.Config, [], "tiny")
    groups = config.plan(spec).groups
    assert sorted(g.config.cell for g in groups) == ["lstm", "simple"]
    for group in groups:
        compiled = engine.compile_group(rnn_bptt.trial(group.config), group.hp, 3, 3, jax.local_devices()[:1])
        for program in (compiled.init, compiled.chunk):
            text = program.as_text()
            found = [line for line in text.splitlines() if "custom-call(" in line or "custom_call_target" in line]
            assert not found, (group.config.cell, found[:3])


def test_a_huge_clip_threshold_is_no_clipping():
    """The config's 'no clipping' lane: clip_by_global_norm at 1e30 returns the same updates as no clip."""
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    grads = {"w": jnp.array([[3.0, -40.0, 5.0], [1e3, 0.5, -2.0]])}
    hp = {
        f"optim.{k}": jnp.float32(v)
        for k, v in dict(
            lr=0.01, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_threshold=1e30
        ).items()
    }
    updates = {}
    for clip in ("global_norm", "none"):
        tx = transforms.build(OptimConfig(name="adam", clip=clip), hp, 10)
        updates[clip] = tx.update(grads, tx.init(params), params)[0]["w"]
    np.testing.assert_array_equal(np.asarray(updates["global_norm"]), np.asarray(updates["none"]))
