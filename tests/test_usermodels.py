"""usermodels: probe and sweep a user's own flax linen / nnx model or plain apply function.

References are independent of gradlab's path: jax.grad on a directly written loss, numpy
backpropagation in float64, nnx's own Optimizer, and eager Python loops of optax updates.
Tolerances: float32 against float64 (or against differently fused float32) agrees to a few
1e-7 relative per operation; a handful of layers and <= 12 optimizer steps stay well under 1e-5.
"""

import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

from gradlab import results, usermodels
from gradlab.errors import ConfigError

RTOL = 1e-5


class CNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.relu(nn.Conv(4, (3, 3))(x))
        x = nn.Conv(4, (3, 3))(x)
        return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x = x + nn.MultiHeadDotProductAttention(num_heads=2)(nn.LayerNorm()(x))
        return x + nn.Dense(d)(nn.gelu(nn.Dense(2 * d)(nn.LayerNorm()(x))))


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.hidden = nnx.Linear(4, 8, rngs=rngs)
        self.out = nnx.Linear(8, 2, rngs=rngs)

    def __call__(self, x):
        h = jnp.tanh(self.hidden(x))
        self.sow(nnx.Intermediate, "tanh", h)
        return self.out(h)


def nnx_mean_square(module, x):
    """mean(module(x) ** 2), run under nnx.capture since flax deprecates sow() outside it."""
    return jnp.mean(jnp.square(nnx.capture(module, nnx.Intermediate)(x)[0]))


def mse(out, batch):
    return jnp.mean(jnp.square(out - batch[1]))


def norms_by_label(tree):
    return dict(
        zip(usermodels.leaf_labels(tree), [float(np.linalg.norm(np.asarray(g))) for g in jax.tree.leaves(tree)])
    )


def normal(seed, *shape):
    """Test data from numpy's generator (jax.random would compile a program per shape)."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape, dtype=np.float32))


def cnn_batch():
    return normal(42, 8, 6, 6, 1), normal(43, 8, 3)


def test_probe_linen_cnn_grad_norms_equal_direct_jax_grad():
    model, batch = CNN(), cnn_batch()
    variables = jax.jit(model.init)(jax.random.PRNGKey(0), batch[0])
    ds = usermodels.probe(model, variables, batch, loss=mse)

    def direct(p):
        out = model.apply({"params": p}, batch[0])
        return mse(out, batch), out

    (loss, out), grads = jax.jit(jax.value_and_grad(direct, has_aux=True))(variables["params"])
    expected = norms_by_label(grads)
    assert (
        sorted(ds.param.values)
        == sorted(expected)
        == sorted(f"{m}/{k}" for m in ("Conv_0", "Conv_1", "Dense_0") for k in ("bias", "kernel"))
    )
    for label, norm in expected.items():
        np.testing.assert_allclose(float(ds.grad_norm.sel(param=label)), norm, rtol=RTOL)
    kernel = np.asarray(variables["params"]["Conv_1"]["kernel"])
    np.testing.assert_allclose(
        float(ds.param_norm.sel(param="Conv_1/kernel")), np.sqrt(np.sum(kernel.astype(np.float64) ** 2)), rtol=RTOL
    )
    np.testing.assert_allclose(
        ds.grad_param_ratio, (ds.grad_norm / ds.param_norm).where(ds.param_norm > 0, 0.0), rtol=RTOL
    )
    np.testing.assert_allclose(float(ds.loss), float(loss), rtol=RTOL)
    assert int(ds.param_size.sel(param="Conv_1/kernel")) == 3 * 3 * 4 * 4
    assert np.all(ds.grad_nonfinite == 0)
    # Activations: every submodule's output, and the model's; the output's RMS by hand.
    assert {"Conv_0", "Conv_1", "Dense_0", "output"} <= set(ds.activation.values)
    out = np.asarray(out, np.float64)
    np.testing.assert_allclose(float(ds.act_rms.sel(activation="output")), np.sqrt(np.mean(out**2)), rtol=RTOL)
    np.testing.assert_allclose(float(ds.act_std.sel(activation="output")), np.std(out), rtol=RTOL)


def test_probe_linen_transformer_block_with_default_loss():
    model = Block()
    x = normal(1, 2, 5, 8)
    variables = jax.jit(model.init)(jax.random.PRNGKey(2), x)
    ds = usermodels.probe(model, variables, x)  # default loss: mean(out ** 2)

    mean_square = lambda p: jnp.mean(jnp.square(jnp.asarray(model.apply({"params": p}, x))))  # noqa: E731
    grads = jax.jit(jax.grad(mean_square))(variables["params"])
    expected = norms_by_label(grads)
    assert "MultiHeadDotProductAttention_0/query/kernel" in expected and len(expected) == ds.sizes["param"]
    # The key bias gets no gradient (softmax is shift invariant): both sides hold rounding noise
    # ~ float32 eps x the O(1) terms that cancel, hence the absolute tolerance.
    assert expected["MultiHeadDotProductAttention_0/key/bias"] < 1e-6
    np.testing.assert_allclose(ds.grad_norm.sel(param=list(expected)), list(expected.values()), rtol=RTOL, atol=1e-6)
    global_norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in jax.tree.leaves(grads)))
    np.testing.assert_allclose(float(ds.grad_global_norm), global_norm, rtol=RTOL)
    # LayerNorm output at init (scale 1, bias 0): per-token mean 0, variance 1 - eps/(var+eps) ~ 1.
    assert abs(float(ds.act_rms.sel(activation="LayerNorm_0")) - 1.0) < 1e-4


def test_probe_nnx_module_matches_nnx_grad_and_a_numpy_forward():
    model = MLP(nnx.Rngs(3))
    x = normal(4, 6, 4)
    ds = usermodels.probe(model, None, x)

    grads = nnx.jit(nnx.grad(nnx_mean_square))(model, x)
    expected = norms_by_label(grads)
    assert sorted(expected) == sorted(ds.param.values) == ["hidden/bias", "hidden/kernel", "out/bias", "out/kernel"]
    for label, norm in expected.items():
        np.testing.assert_allclose(float(ds.grad_norm.sel(param=label)), norm, rtol=RTOL)
    assert model.hidden.bias is not None
    pre = np.asarray(x, np.float64) @ np.asarray(model.hidden.kernel[...], np.float64) + np.asarray(
        model.hidden.bias[...]
    )
    np.testing.assert_allclose(float(ds.act_rms.sel(activation="hidden")), np.sqrt(np.mean(pre**2)), rtol=RTOL)
    np.testing.assert_allclose(float(ds.act_std.sel(activation="hidden")), np.std(pre), rtol=RTOL)
    np.testing.assert_allclose(float(ds.act_rms.sel(activation="tanh")), np.sqrt(np.mean(np.tanh(pre) ** 2)), rtol=RTOL)
    assert sorted(ds.activation.values) == ["hidden", "out", "output", "tanh"]


def two_layer(params, x):
    h = jnp.tanh(x @ params["w1"])
    return h @ params["w2"], {"hidden": h}


def test_probe_plain_function_equals_numpy_backprop():
    params = {"w1": normal(5, 4, 6) / 2, "w2": normal(6, 6, 3) / 2}
    x = normal(7, 10, 4)
    ds = usermodels.probe(two_layer, params, x, has_aux=True)

    w1, w2, xn = (np.asarray(a, np.float64) for a in (params["w1"], params["w2"], x))
    h = np.tanh(xn @ w1)
    out = h @ w2
    d_out = 2 * out / out.size  # d mean(out^2) / d out
    g_w2 = h.T @ d_out
    g_w1 = xn.T @ ((d_out @ w2.T) * (1 - h**2))
    np.testing.assert_allclose(float(ds.grad_norm.sel(param="w1")), np.linalg.norm(g_w1), rtol=RTOL)
    np.testing.assert_allclose(float(ds.grad_norm.sel(param="w2")), np.linalg.norm(g_w2), rtol=RTOL)
    np.testing.assert_allclose(float(ds.loss), np.mean(out**2), rtol=RTOL)
    assert list(ds.activation.values) == ["hidden", "output"]
    np.testing.assert_allclose(float(ds.act_rms.sel(activation="hidden")), np.sqrt(np.mean(h**2)), rtol=RTOL)
    np.testing.assert_allclose(float(ds.act_std.sel(activation="hidden")), np.std(h), rtol=RTOL)
    np.testing.assert_allclose(float(ds.act_rms.sel(activation="output")), np.sqrt(np.mean(out**2)), rtol=RTOL)


def reference_curves(loss_of_params, params, make_tx, lr, steps):
    """A Python loop of optax updates, one jitted step (lr an argument); per-step (loss, grad norm)."""

    @jax.jit
    def step(params, state, lr, t):
        loss, grads = jax.value_and_grad(loss_of_params)(params, t)
        updates, state = make_tx(lr).update(grads, state, params)
        return optax.apply_updates(params, updates), state, loss, optax.tree.norm(grads)

    state, losses, norms = make_tx(lr).init(params), [], []
    for t in range(steps):
        params, state, loss, norm = step(params, state, lr, t)
        losses.append(float(loss))
        norms.append(float(norm))
    return np.asarray(losses), np.asarray(norms)


def test_sweep_linen_cnn_each_lane_equals_its_own_adam_loop():
    model, batch = CNN(), cnn_batch()
    lrs, seeds, steps = [1e-3, 3e-2], [0, 1], 6
    ds = usermodels.sweep(model, mse, batch, optimizer="adam", lr=lrs, seeds=seeds, steps=steps, chunk_steps=3)
    assert ds.loss.dims == ("lr", "seed", "step") and ds.loss.shape == (2, 2, steps)
    assert ds.grad_norm.dims == ("lr", "seed", "step", "param")
    assert not ds.diverged.any()
    init = jax.jit(model.init)
    for i, lr in enumerate(lrs):
        for j, seed in enumerate(seeds):
            params_key, _ = jax.random.split(jax.random.PRNGKey(seed))
            params = init(params_key, batch[0])["params"]
            losses, norms = reference_curves(
                lambda p, t: mse(model.apply({"params": p}, batch[0]), batch), params, optax.adam, lr, steps
            )
            np.testing.assert_allclose(ds.loss[i, j], losses, rtol=RTOL)
            np.testing.assert_allclose(ds.grad_global_norm[i, j, 0], norms[0], rtol=RTOL)  # same params
            # Later, the params differ by float32 reassociation (batched vs single convolutions) and
            # a gradient norm, a sum of cancelling terms through relu kinks, amplifies that ~10x.
            np.testing.assert_allclose(ds.grad_global_norm[i, j], norms, rtol=10 * RTOL)
    assert float(ds.loss[1, 0, -1]) < float(ds.loss[1, 0, 0])  # it trains


def test_sweep_transformer_block_momentum_matches_loop_and_seeds_differ():
    model = Block()
    batch = (normal(1, 2, 5, 8), normal(8, 2, 5, 8))  # x as in the probe test: one init program
    ds = usermodels.sweep(model, mse, batch, optimizer="momentum", lr=[0.05], seeds=2, steps=4)
    params_key, _ = jax.random.split(jax.random.PRNGKey(1))
    params = jax.jit(model.init)(params_key, batch[0])["params"]
    losses, _ = reference_curves(
        lambda p, t: mse(model.apply({"params": p}, batch[0]), batch),
        params,
        lambda lr: optax.sgd(lr, momentum=0.9),
        0.05,
        4,
    )
    np.testing.assert_allclose(ds.loss[0, 1], losses, rtol=RTOL)
    assert float(abs(ds.loss[0, 0, 0] - ds.loss[0, 1, 0])) > 1e-3  # seeds initialise differently


def test_sweep_nnx_module_matches_nnx_optimizer():
    x = normal(9, 6, 4)
    model = MLP(nnx.Rngs(0))
    ds = usermodels.sweep(
        model, None, x, optimizer=optax.sgd, lr=[0.1, 0.5], seeds=[3], steps=5, init=lambda key: MLP(nnx.Rngs(key))
    )

    @nnx.jit
    def train_step(module, opt):
        loss, grads = nnx.value_and_grad(nnx_mean_square)(module, x)
        opt.update(module, grads)
        return loss

    for i, lr in enumerate([0.1, 0.5]):
        reference = MLP(nnx.Rngs(jax.random.split(jax.random.PRNGKey(3))[0]))
        opt = nnx.Optimizer(reference, optax.sgd(lr), wrt=nnx.Param)
        losses = [float(train_step(reference, opt)) for _ in range(5)]
        np.testing.assert_allclose(ds.loss[i, 0], losses, rtol=RTOL)


def test_sweep_plain_function_one_compile_and_a_diverging_lr_is_isolated():
    xs, ys = normal(10, 4, 8, 4), normal(11, 4, 8, 3)  # 4 batches, cycled
    calls = []

    def apply(params, x):
        calls.append(1)  # runs once per trace of the training step
        return jnp.tanh(x @ params["w1"]) @ params["w2"]

    def init(key):
        a, b = jax.random.split(key)
        return {"w1": jax.random.normal(a, (4, 6)) / 2, "w2": jax.random.normal(b, (6, 3)) / 2}

    lrs, seeds, steps = [0.05, 0.2, 1e6], [0, 1], 12
    ds = usermodels.sweep(
        apply,
        mse,
        lambda step, key: (xs[step % 4], ys[step % 4]),
        optimizer="sgd",
        lr=lrs,
        seeds=seeds,
        steps=steps,
        init=init,
        chunk_steps=4,
    )
    assert len(calls) == 1  # 3 lr x 2 seeds x 3 chunks: one trace, one compiled program

    assert ds.diverged.values.tolist() == [[False, False], [False, False], [True, True]]
    for j in range(2):
        bad = int(ds.first_bad_step[2, j])
        assert 0 < bad < steps
        assert np.all(np.isnan(ds.loss[2, j, bad + 1 :])) and np.all(np.isfinite(ds.loss[2, j, :bad]))
    jitted_init = jax.jit(init)
    for i, lr in enumerate(lrs[:2]):
        for j, seed in enumerate(seeds):
            params = jitted_init(jax.random.split(jax.random.PRNGKey(seed))[0])
            losses, _ = reference_curves(
                lambda p, t: mse(apply(p, xs[t % 4]), (xs[t % 4], ys[t % 4])), params, optax.sgd, lr, steps
            )
            np.testing.assert_allclose(ds.loss[i, j], losses, rtol=RTOL)


def small_net(params, x):
    return jnp.tanh(x @ params["w1"]) @ params["w2"]


def small_init(key):
    a, b = jax.random.split(key)
    return {"w1": jax.random.normal(a, (4, 6)) / 2, "w2": jax.random.normal(b, (6, 3)) / 2}


def test_sweep_dataset_has_the_layout_of_a_gradlab_run_and_isolates_a_diverging_lr(tmp_path):
    xs, ys = normal(12, 8, 4), normal(13, 8, 3)
    lrs, steps = [0.05, 1e6, 0.1], 10
    ds = usermodels.sweep(
        small_net,
        mse,
        (xs, ys),
        optimizer="sgd",
        lr=lrs,
        seeds=2,
        steps=steps,
        init=small_init,
        chunk_steps=4,
        checkpoint_dir=tmp_path / "ckpt",
        progress=False,
    )
    # The variables and dims of `gradlab run`'s Dataset (results.build_dataset), param labelled.
    assert ds.loss.dims == ("lr", "seed", "step") and ds.grad_norm.dims == ("lr", "seed", "step", "param")
    assert list(ds.param.values) == ["w1", "w2"] and ds.lr.values.tolist() == lrs
    for name in ("first_bad_step", "first_bad_layer", "diverged"):
        assert ds[name].dims == ("lr", "seed")
    # Only the huge learning rate diverges, on both seeds; the others run to the end, finite.
    assert ds.diverged.values.tolist() == [[False, False], [True, True], [False, False]]
    assert np.all(ds.first_bad_step.values[[0, 2]] == -1) and np.all(ds.first_bad_layer.values[[0, 2]] == -1)
    assert np.all(np.isfinite(ds.loss.values[[0, 2]]))
    for j in range(2):
        bad, layer = int(ds.first_bad_step[1, j]), int(ds.first_bad_layer[1, j])
        assert 0 <= bad < steps and np.all(np.isnan(ds.loss[1, j, bad + 1 :]))
        assert -1 <= layer < 2
        if layer >= 0:  # the first leaf with a non-finite norm at the first bad step
            at = np.stack([ds.grad_norm[1, j, bad].values, ds.param_norm[1, j, bad].values])
            assert not np.all(np.isfinite(at[:, layer])) and np.all(np.isfinite(at[:, :layer]))
    # Provenance as a run's: versions, command, git commit; the resolved config and its axes.
    assert set(results.provenance()) <= set(ds.attrs)
    assert ds.attrs["results_format"] == results.RESULTS_FORMAT and len(ds.attrs["config_hash"]) == 12
    assert ds.attrs["static_groups"] == 1 and ds.attrs["model_kind"] == "function"
    assert ds.attrs["optimizer"] == "sgd" and ds.attrs["loss"] == "mse"
    spec = results.config_of(ds)
    assert spec["axes"] == {"lr": lrs, "seed": [0, 1]} and spec["config"]["name"] == "sgd"
    assert spec["config"]["steps"] == steps
    # It stores and loads as a run's results do; the finished sweep leaves no checkpoint behind.
    results.save(ds, tmp_path / "sweep.nc")
    loaded = results.load(tmp_path / "sweep.nc")
    np.testing.assert_array_equal(loaded.first_bad_step, ds.first_bad_step)
    assert list((tmp_path / "ckpt").iterdir()) == []


def test_sweep_optim_settings_use_the_configs_optimizer_and_a_list_is_an_axis():
    x = normal(14, 8, 4)
    decays = [0.0, 0.1]
    ds = usermodels.sweep(
        small_net,
        None,
        x,
        optimizer="lion",
        lr=[0.01],
        seeds=[5],
        steps=4,
        init=small_init,
        optim={"weight_decay": decays, "b2": 0.99},
        progress=False,
    )
    assert ds.loss.dims == ("lr", "weight_decay", "seed", "step")
    params = jax.jit(small_init)(jax.random.split(jax.random.PRNGKey(5))[0])
    for i, wd in enumerate(decays):

        def lion(lr, wd=wd):
            def matrices(p):
                return jax.tree.map(lambda a: a.ndim >= 2, p)

            return optax.lion(lr, b1=0.9, b2=0.99, weight_decay=wd, mask=matrices)

        losses, _ = reference_curves(lambda p, t: jnp.mean(jnp.square(small_net(p, x))), params, lion, 0.01, 4)
        np.testing.assert_allclose(ds.loss[0, i, 0], losses, rtol=RTOL)


class TanhMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2)(jnp.tanh(nn.Dense(8)(x)))


def adam_reference(model, batch, seed, lr, steps):
    """An eager optax.adam loop from seed's init: per step, lambda_max of the loss Hessian (eigh of
    jax.hessian of the flattened loss) at that step's params, and of P^-1/2 H P^-1/2 with Adam's
    P = sqrt(nu / (1 - b2^(t + 1))) + eps after that step's update."""
    params = jax.jit(model.init)(jax.random.split(jax.random.PRNGKey(seed))[0], batch[0])["params"]
    flat, unravel = ravel_pytree(params)
    hessian = jax.jit(jax.hessian(lambda f: mse(model.apply({"params": unravel(f)}, batch[0]), batch)))
    tx = optax.adam(lr)
    state, tops, preconditioned = tx.init(flat), [], []
    for t in range(steps):
        h = np.asarray(hessian(flat), np.float64)
        updates, state = tx.update(
            jax.grad(lambda f: mse(model.apply({"params": unravel(f)}, batch[0]), batch))(flat), state
        )
        moments = jax.tree.leaves(state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))[0]
        assert isinstance(moments, optax.ScaleByAdamState)
        nu = np.asarray(moments.nu, np.float64)
        d = 1.0 / np.sqrt(np.sqrt(nu / (1 - 0.999 ** (t + 1))) + 1e-8)
        tops.append(np.linalg.eigvalsh(h)[-1])
        preconditioned.append(np.linalg.eigvalsh(d[:, None] * h * d[None, :])[-1])
        flat = optax.apply_updates(flat, updates)
    return np.asarray(tops), np.asarray(preconditioned)


def test_sweep_sharpness_equals_eigh_of_the_full_hessian_and_leaves_training_unchanged():
    model, batch = TanhMLP(), (normal(20, 16, 3), normal(21, 16, 2))
    lrs, seeds, steps, every = [1e-3, 3e-3], [0, 1], 7, 3  # lambda_max moves <= 4 % between measurements
    args: dict[str, Any] = dict(optimizer="adam", lr=lrs, seeds=seeds, steps=steps, progress=False)
    ds = usermodels.sweep(model, mse, batch, sharpness_every=every, **args)
    plain = usermodels.sweep(model, mse, batch, sharpness_every=0, **args)
    assert ds.sharpness.dims == ("lr", "seed", "step") and ds.sharpness_preconditioned.dims == ds.sharpness.dims
    measured = np.arange(steps) % every == 0  # steps 0, 3, 6
    assert np.all(np.isfinite(ds.sharpness.values[..., measured]))
    assert np.all(np.isnan(ds.sharpness.values[..., ~measured]))
    assert np.all(np.isnan(ds.sharpness_preconditioned.values[..., ~measured]))
    for i, lr in enumerate(lrs):
        for j, seed in enumerate(seeds):
            tops, preconditioned = adam_reference(model, batch, seed, lr, steps)
            np.testing.assert_allclose(ds.sharpness[i, j, measured], tops[measured], rtol=1e-3)
            np.testing.assert_allclose(ds.sharpness_preconditioned[i, j, measured], preconditioned[measured], rtol=1e-3)
    # sharpness_every=0 adds nothing, and measuring does not change training.
    assert set(plain.data_vars) == set(ds.data_vars) - {"sharpness", "sharpness_preconditioned"}
    assert "sharpness" not in plain.data_vars
    for name in ("loss", "grad_global_norm", "grad_norm", "param_norm"):
        np.testing.assert_allclose(ds[name], plain[name], rtol=RTOL)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(lr=[]), "lr: give at least one learning rate"),
        (dict(lr=[0.1, -0.01]), "lr: every learning rate must be a finite number > 0, got -0.01"),
        (dict(model=42), "model: expected a flax linen Module, an nnx Module or a function"),
        (dict(model=CNN), "model: got the class CNN; pass an instance"),
        (dict(optimizer="adma"), "optimizer: unknown 'adma'; allowed: sgd, momentum"),
        (dict(optimizer=optax.adam(1e-3)), "optimizer: got a built optax transformation"),
        (dict(seeds=[]), "seeds: expected a non-empty list"),
        (dict(steps=0), "steps: expected an integer >= 1"),
        (dict(sharpness_every=-1), "sharpness_every: expected an integer >= 0 (0: off), got -1"),
        (dict(sharpness_every=2.5), "sharpness_every: expected an integer >= 0 (0: off), got 2.5"),
        (dict(params=None), "params: a plain apply function needs its params"),
        (dict(optim={"weight_decay": -1.0}), "sweep: weight_decay: must be >= 0.0, got -1.0"),
        (dict(optim={"schedule": "cosin"}), "sweep: schedule: unknown value 'cosin'"),
        (dict(optim={"lr": 0.1}), "optim: lr: set it with sweep's own argument lr="),
        (dict(optimizer=optax.sgd, optim={"b1": 0.5}), "optim: applies to a named optimizer"),
    ],
)
def test_user_errors_raise_one_line_config_errors(kwargs, message):
    args: dict[str, Any] = dict(model=two_layer, loss=None, data=jnp.ones((2, 4)), lr=[0.1], params={"w": jnp.ones(2)})
    args.update(kwargs)
    with pytest.raises(ConfigError, match="^" + re.escape(message)) as err:
        usermodels.sweep(args.pop("model"), args.pop("loss"), args.pop("data"), **args)
    assert "\n" not in str(err.value)


def test_probe_rejects_a_non_scalar_loss_and_a_bad_batch():
    params = {"w1": jnp.ones((4, 6)), "w2": jnp.ones((6, 3))}
    with pytest.raises(ConfigError, match="^loss: must return a scalar, got shape"):
        usermodels.probe(two_layer, params, jnp.ones((2, 4)), loss=lambda out, batch: out, has_aux=True)
    with pytest.raises(ConfigError, match="^batch: a dict batch needs the input under 'x' or 'inputs'"):
        usermodels.probe(two_layer, params, {"image": jnp.ones((2, 4))}, has_aux=True)
