"""The train-state recipe: a step against value_and_grad + optax written out, its hooks, a swept
choice among optax chains, the constant-predictor reference."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradlab import config, data, models, trials
from gradlab.config import ExperimentConfig

LR = 0.05


def setup(telemetry="layers", optim=None, task="regression"):
    """(config of the one static group, hp of its one point as Python numbers)."""
    raw = {
        "steps": 5,
        "telemetry": telemetry,
        "model": {"depth": 2, "width": 8, "activation": "tanh"},
        "optim": {"name": "momentum", "lr": LR, "momentum": 0.9, **(optim or {})},
        "data": {"task": task, "examples": 16, "input_dim": 4, "output_dim": 3 if task == "regression" else 4},
    }
    spec = config.resolve("trials-test", ExperimentConfig, raw, "test")
    (group,) = config.plan(spec).groups
    return group.config, {path: values[0].item() for path, values in group.hp.items()}


def mse(cfg):
    """The config's MSE written out, on its full-batch task."""
    spec, hyper = trials.mlp_spec(cfg), models.MLPHyper.from_config(cfg.model)
    task = data.make(cfg.data)

    def loss(params):
        out, _ = models.apply(params, task.x, spec, hyper)
        return jnp.mean(jnp.sum(jnp.square(out - task.y), axis=-1)) / task.y.shape[-1]

    return jax.jit(loss)


def assert_trees_close(a, b, **tol):
    chex.assert_trees_all_equal_structs(a, b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), **tol)


def numpy_norm(tree):
    return np.sqrt(sum(np.sum(np.asarray(leaf, np.float64) ** 2) for leaf in jax.tree.leaves(tree)))


@pytest.mark.parametrize("telemetry", ["layers", "loss"])
def test_steps_equal_value_and_grad_and_optax_written_out(telemetry):
    """Three steps of heavy-ball SGD: the loss each step reports, the gradient's global norm, and the
    parameters after each update, against jax.value_and_grad of the MSE and optax.sgd."""
    cfg, hp = setup(telemetry)
    trial = trials.supervised_mlp(cfg)
    state = trial.init(hp, jax.random.PRNGKey(0))
    step = jax.jit(trial.step)
    params, loss = state.params, mse(cfg)
    opt = optax.sgd(LR, momentum=0.9)
    opt_state = opt.init(params)
    for t in range(3):
        value, grads = jax.jit(jax.value_and_grad(loss))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        state, out = step(hp, state)
        assert float(out["loss"]) == pytest.approx(float(value), rel=1e-6)
        assert_trees_close(state.params, params, rtol=1e-6, atol=1e-6)
        assert int(state.step) == t + 1
        if telemetry == "layers":
            assert float(out["grad_global_norm"]) == pytest.approx(numpy_norm(grads), rel=1e-5)
            assert float(out["lr"]) == pytest.approx(LR)
        else:
            assert set(out) == {"loss"}


def test_the_metrics_hook_sees_the_gradient_before_clipping_and_the_update_used():
    """With global-norm clipping at 0.01 the update is the gradient scaled to that norm: the hook's
    gradient is the unclipped one (its norm is grad_global_norm, far above 0.01), and its updates are
    what moved the parameters."""
    cfg, hp = setup(optim={"name": "sgd", "clip": "global_norm", "clip_threshold": 0.01})

    def hook(view):
        return {
            "hook_grad_norm": optax.tree.norm(view.grads),
            "hook_grads": view.grads,
            "hook_updates": view.updates,
            "hook_new_params": view.new_params,
            "hook_loss": view.loss,
        }

    trial = trials.supervised_mlp(cfg, metrics=hook)
    state = trial.init(hp, jax.random.PRNGKey(1))
    value, grads = jax.value_and_grad(mse(cfg))(state.params)
    new_state, out = jax.jit(trial.step)(hp, state)
    assert float(out["hook_grad_norm"]) == pytest.approx(float(out["grad_global_norm"]), rel=1e-6)
    assert float(out["grad_global_norm"]) > 10 * 0.01
    assert float(out["hook_loss"]) == float(out["loss"]) == pytest.approx(float(value), rel=1e-6)
    assert_trees_close(out["hook_grads"], grads, rtol=1e-5, atol=1e-7)
    norm = numpy_norm(grads)
    expected = jax.tree.map(lambda g: -LR * 0.01 / norm * np.asarray(g, np.float64), grads)
    assert_trees_close(out["hook_updates"], expected, rtol=1e-5, atol=1e-9)
    assert numpy_norm(out["hook_updates"]) == pytest.approx(LR * 0.01, rel=1e-5)
    assert_trees_close(out["hook_new_params"], new_state.params, rtol=0, atol=0)
    moved = jax.tree.map(
        lambda new, old: np.asarray(new, np.float64) - np.asarray(old, np.float64), new_state.params, state.params
    )
    ulp = max(float(np.max(np.abs(leaf))) for leaf in jax.tree.leaves(state.params)) * 2.0**-23
    assert_trees_close(moved, out["hook_updates"], rtol=0, atol=ulp)  # p + u rounds to float32: half an ulp


def test_hp_map_is_applied_at_init_and_at_every_step():
    """hp_map doubles the init gain (the weights double) and sets lr_t = 0.1 (t + 1): plain SGD then
    moves the parameters by -0.1 (t + 1) times each step's gradient."""
    cfg, hp = setup(optim={"name": "sgd"})
    seen = []

    def hp_map(hp, step):
        jax.debug.callback(lambda s: seen.append(int(s)), step)  # each call, traced or not
        return {**hp, "model.init_gain": 2.0 * hp["model.init_gain"], "optim.lr": 0.1 * (step + 1)}

    mapped = trials.supervised_mlp(cfg, hp_map=hp_map)
    key = jax.random.PRNGKey(2)
    state = mapped.init(hp, key)
    jax.effects_barrier()
    assert seen == [0]
    plain = trials.supervised_mlp(cfg).init(hp, key)
    for layer in ("input", "hidden", "output"):
        np.testing.assert_allclose(state.params[layer]["w"], 2 * plain.params[layer]["w"], rtol=1e-6)
    loss, params, step = mse(cfg), state.params, jax.jit(mapped.step)
    for t in range(3):
        grads = jax.jit(jax.grad(loss))(params)
        params = jax.tree.map(lambda p, g, t=t: p - 0.1 * (t + 1) * g, params, grads)
        state, out = step(hp, state)
        assert float(out["lr"]) == pytest.approx(0.1 * (t + 1))
        assert_trees_close(state.params, params, rtol=1e-5, atol=1e-6)
    jax.effects_barrier()
    assert seen == [0, 0, 1, 2]


def test_chosen_by_index_returns_the_chosen_update_exactly():
    """One compiled program for every index (a traced choice); each index's updates over four steps
    are bit for bit those of its transformation run alone."""
    choices = (optax.sgd(0.1), optax.adam(0.01), optax.sgd(0.05, momentum=0.9, nesterov=True))
    rng = np.random.default_rng(4)
    params = {"w": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32), "b": jnp.zeros(2, jnp.float32)}
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params) for _ in range(4)]

    def run(tx):
        state, out = tx.init(params), []
        for g in grads:
            updates, state = tx.update(g, state, params)
            out.append(updates)
        return out

    @jax.jit
    @chex.assert_max_traces(n=1)
    def chosen(index):
        return run(trials.chosen_by_index(index, choices))

    chex.clear_trace_counter()
    for i, tx in enumerate(choices):
        together, alone = chosen(jnp.int32(i)), jax.jit(lambda tx=tx: run(tx))()
        for a, b in zip(together, alone, strict=True):
            chex.assert_trees_all_equal(a, b)
        assert not np.allclose(together[0]["w"], chosen(jnp.int32((i + 1) % 3))[0]["w"])  # the choices differ


@pytest.mark.parametrize("task", ["regression", "classification"])
def test_task_reference_is_the_loss_of_the_best_constant(task):
    """For MSE the best constant is the mean (its loss the mean variance over outputs); for
    cross-entropy it is the label frequencies (its loss their entropy): both against numpy, and
    against the loss data.loss gives that constant."""
    cfg, _ = setup(task=task)
    constant = trials.task_reference(cfg)["constant_loss"]
    y = np.asarray(data.make(cfg.data).y)
    if task == "regression":
        y = y.astype(np.float64)
        expected = np.mean((y - y.mean(axis=0)) ** 2)
        best = np.broadcast_to(y.mean(axis=0), y.shape).astype(np.float32)
    else:
        _, counts = np.unique(y, return_counts=True)
        freq = counts / counts.sum()
        expected = -np.sum(freq * np.log(freq))
        share = np.bincount(y, minlength=4) / y.size
        best = np.broadcast_to(np.log(np.maximum(share, 1e-30)), (y.size, 4)).astype(np.float32)
    assert constant == pytest.approx(expected, rel=1e-9)
    assert float(data.loss(cfg.data, best, y.astype(np.float32) if task == "regression" else y)) == pytest.approx(
        constant, rel=1e-5
    )
