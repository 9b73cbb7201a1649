"""The paper's AdamW (decay times the schedule only) and optax.MultiSteps accumulation, against
their formulas written out here in numpy."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradlab import data, models, transforms
from gradlab.config import DataConfig, ModelConfig, OptimConfig

LR, B1, B2, EPS, WD, TOTAL = 0.1, 0.8, 0.95, 1e-8, 0.3, 10
PARAMS = {"w": jnp.asarray([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.asarray([0.3, -0.7])}
GRADS = [
    {"w": jnp.asarray([[0.2, -0.1], [0.4, 0.05]]), "b": jnp.asarray([-0.3, 0.6])},
    {"w": jnp.asarray([[-0.1, 0.3], [0.2, -0.2]]), "b": jnp.asarray([0.1, 0.2])},
]
COSINE = OptimConfig(schedule="cosine")  # the schedule multiplier is cos-shaped, so s_1 != 1


def hp(**kw):
    base = dict(lr=LR, momentum=0.9, b1=B1, b2=B2, eps=EPS, weight_decay=WD, clip_threshold=1.0)
    base.update(kw)
    return {f"optim.{k}": jnp.float32(v) for k, v in base.items()}


def run(cfg, grads, params=PARAMS, **kw):
    """The updates of successive steps, each gradient taken at the current params."""
    tx = transforms.build(cfg, hp(**kw), total_steps=TOTAL)
    state, out = tx.init(params), []
    for g in grads:
        u, state = tx.update(g, state, params)
        params = optax.apply_updates(params, u)
        out.append({k: np.asarray(v, np.float64) for k, v in u.items()})
    return out


def shape(t):
    """optax.cosine_decay_schedule(1, TOTAL) at update t."""
    return 0.5 * (1 + np.cos(np.pi * min(t, TOTAL) / TOTAL))


def adam_reference(form, grads, lr=LR, wd=WD):
    """Adam + L2 ('l2'), optax's AdamW ('optax') or the paper's ('paper'), in float64.

    Only weight matrices decay. Loshchilov & Hutter 2019, Algorithm 2, with eta_t = shape(t).
    """
    p = {k: np.asarray(v, np.float64) for k, v in PARAMS.items()}
    m = {k: 0.0 * v for k, v in p.items()}
    v = {k: 0.0 * x for k, x in p.items()}
    out = []
    for t, g in enumerate(grads):
        step = {}
        for k in p:
            decay = wd if k == "w" else 0.0
            gk = np.asarray(g[k], np.float64) + (decay * p[k] if form == "l2" else 0.0)
            m[k] = B1 * m[k] + (1 - B1) * gk
            v[k] = B2 * v[k] + (1 - B2) * gk**2
            direction = (m[k] / (1 - B1 ** (t + 1))) / (np.sqrt(v[k] / (1 - B2 ** (t + 1))) + EPS)
            eta = shape(t)
            if form == "paper":
                step[k] = -eta * (lr * direction + decay * p[k])
            elif form == "optax":
                step[k] = -lr * eta * (direction + decay * p[k])
            else:
                step[k] = -lr * eta * direction
        p = {k: p[k] + step[k] for k in p}
        out.append(step)
    return out


@pytest.mark.parametrize("name, form", [("adamw_decoupled", "paper"), ("adamw", "optax"), ("adam", "l2")])
def test_each_weight_decay_form_equals_its_formula(name, form):
    got = run(dataclasses.replace(COSINE, name=name), GRADS)
    want = adam_reference(form, GRADS)
    for u, e in zip(got, want):
        for k in u:
            np.testing.assert_allclose(u[k], e[k], rtol=2e-5, atol=1e-7)


def test_the_two_adamw_forms_differ_by_the_learning_rate_on_the_decay():
    """Same gradients, same schedule: the decay terms differ by exactly a factor lr (wd p eta vs lr wd p eta)."""
    paper = run(dataclasses.replace(COSINE, name="adamw_decoupled"), GRADS)[0]["w"]
    coupled = run(dataclasses.replace(COSINE, name="adamw"), GRADS)[0]["w"]
    adam = run(dataclasses.replace(COSINE, name="adam"), GRADS, weight_decay=0.0)[0]["w"]
    p = np.asarray(PARAMS["w"], np.float64)
    np.testing.assert_allclose(paper - adam, -WD * p, rtol=1e-5)  # eta_0 = 1
    np.testing.assert_allclose(coupled - adam, -LR * WD * p, rtol=1e-4)


ZERO = {"w": jnp.zeros((2, 2)), "b": jnp.zeros(2)}


def test_zero_data_gradient_adam_l2_moves_by_lr_times_sign_whatever_the_decay():
    """With g = 0 the L2 gradient is wd p, and Adam's m_hat / sqrt(v_hat) is invariant to the scale
    of its gradients: every decay gives the same steps (to eps / (wd |p|)); the first is exactly
    -lr sign(p), later ones a little shorter as |p| (so the gradient) shrinks. AdamW instead moves
    a weight by -lr wd p (optax) or -wd eta p (paper): proportional to the decay."""
    cfg = OptimConfig(name="adam")
    p = np.asarray(PARAMS["w"], np.float64)
    reference = run(cfg, [ZERO] * 3, weight_decay=1.0)
    for wd in (1e-3, 0.3, 30.0):
        l2 = run(cfg, [ZERO] * 3, weight_decay=wd)
        rtol = 1e-5 + 2 * EPS / (wd * np.min(np.abs(p)))  # eps against |m_hat| ~ wd |p|, 3 steps on
        np.testing.assert_allclose(l2[0]["w"], -LR * np.sign(p), rtol=rtol)
        for u, r in zip(l2, reference):
            np.testing.assert_allclose(u["w"], r["w"], rtol=rtol)  # whatever the decay
            assert np.all((-u["w"] * np.sign(p) > 0.95 * LR) & (-u["w"] * np.sign(p) <= LR * (1 + 1e-6)))
            np.testing.assert_array_equal(u["b"], 0.0)
        coupled = run(dataclasses.replace(cfg, name="adamw"), [ZERO], weight_decay=wd)[0]["w"]
        np.testing.assert_allclose(coupled, -LR * wd * p, rtol=1e-5)
        paper = run(dataclasses.replace(cfg, name="adamw_decoupled"), [ZERO], weight_decay=wd)[0]["w"]
        np.testing.assert_allclose(paper, -wd * p, rtol=1e-5)


def test_decoupled_decay_follows_the_schedule_not_the_learning_rate():
    """With zero gradient and cosine schedule, |p_t| = |p_0| prod_s (1 - wd eta_s), for every lr."""
    p0 = np.asarray(PARAMS["w"], np.float64)
    expected = p0 * np.prod([1 - WD * shape(t) for t in range(TOTAL)])
    for lr in (1e-4, 1.0):
        steps = run(dataclasses.replace(COSINE, name="adamw_decoupled"), [ZERO] * TOTAL, lr=lr)
        np.testing.assert_allclose(p0 + sum(u["w"] for u in steps), expected, rtol=1e-5)


# ----------------------------------------------------------------------------- accumulation

SPEC = models.MLPSpec(in_dim=6, out_dim=2, depth=2, width=8, activation="tanh")
HYPER = models.MLPHyper.from_config(ModelConfig(depth=2, init="lecun_normal"))


def loss(params, x, y):
    out, _ = models.apply(params, x, SPEC, HYPER)
    return jnp.mean(jnp.square(out - y))


@pytest.mark.parametrize("name, clip, k", [("momentum", "none", 2), ("adam", "global_norm", 4), ("adamw", "none", 3)])
def test_k_step_accumulation_of_batch_b_equals_one_step_of_batch_kb(name, clip, k):
    """MultiSteps averages k gradients of batches of B; the mean of those equals the gradient of
    their union (the loss is a mean over examples), so every update matches batch kB's."""
    b, updates = 8, 3
    xy = data.make(DataConfig(examples=k * b * updates, input_dim=6, output_dim=2, noise=0.1, seed=3))
    params = models.init(jax.random.PRNGKey(1), SPEC, HYPER)
    base = OptimConfig(name=name, clip=clip, warmup_steps=2, schedule="cosine")
    small_tx = transforms.build(
        dataclasses.replace(base, accumulate_steps=k), hp(clip_threshold=0.05), total_steps=k * updates
    )
    big_tx = transforms.build(base, hp(clip_threshold=0.05), total_steps=updates)
    grad = jax.jit(jax.grad(loss))
    small_update, big_update = jax.jit(small_tx.update), jax.jit(big_tx.update)
    p_small, s_small, p_big, s_big = params, small_tx.init(params), params, big_tx.init(params)
    for u in range(updates):
        lo = u * k * b
        for j in range(k):
            g = grad(p_small, xy.x[lo + j * b : lo + (j + 1) * b], xy.y[lo + j * b : lo + (j + 1) * b])
            step, s_small = small_update(g, s_small, p_small)
            if j < k - 1:  # nothing moves until the k-th gradient
                assert all(float(jnp.max(jnp.abs(a))) == 0.0 for a in jax.tree.leaves(step))
            p_small = optax.apply_updates(p_small, step)
        step, s_big = big_update(grad(p_big, xy.x[lo : lo + k * b], xy.y[lo : lo + k * b]), s_big, p_big)
        p_big = optax.apply_updates(p_big, step)
        for a, c in zip(jax.tree.leaves(p_small), jax.tree.leaves(p_big)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=1e-5, atol=1e-6)
    assert float(jnp.max(jnp.abs(p_big["input"]["w"] - params["input"]["w"]))) > 1e-3  # it trained


def test_under_accumulation_the_schedule_counts_updates():
    """Warmup of 2 updates over 12 steps with k = 3: step t gets the lr of update t // 3."""
    cfg = OptimConfig(schedule="linear", warmup_steps=2, final_lr_fraction=0.0, accumulate_steps=3)
    lr = transforms.learning_rate(cfg, 0.5, 12)  # 4 updates: warm 0, 1/2, then linear 1 -> 0 over 2
    expected = [0.0] * 3 + [0.25] * 3 + [0.5] * 3 + [0.25] * 3
    np.testing.assert_allclose([float(lr(t)) for t in range(12)], expected, rtol=1e-6)
