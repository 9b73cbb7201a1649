"""Each optimizer built from a config against its update rule written out by hand."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradlab import transforms
from gradlab.config import OptimConfig

LR, MOMENTUM, B1, B2, EPS, WD = 0.1, 0.9, 0.8, 0.95, 1e-8, 0.05
PARAMS = {"w": jnp.asarray([[1.0, -2.0], [0.5, 3.0]]), "b": jnp.asarray([0.3, -0.7])}
G1 = {"w": jnp.asarray([[0.2, -0.1], [0.4, 0.05]]), "b": jnp.asarray([-0.3, 0.6])}
G2 = {"w": jnp.asarray([[-0.1, 0.3], [0.2, -0.2]]), "b": jnp.asarray([0.1, 0.2])}


def hp(**kw):
    base = dict(lr=LR, momentum=MOMENTUM, b1=B1, b2=B2, eps=EPS, weight_decay=0.0, clip_threshold=1.0)
    base.update(kw)
    return {f"optim.{k}": jnp.float32(v) for k, v in base.items()}


def two_steps(name, **kw):
    cfg = OptimConfig(name=name)
    tx = transforms.build(cfg, hp(**kw), total_steps=10)
    state = tx.init(PARAMS)
    u1, state = tx.update(G1, state, PARAMS)
    p1 = optax.apply_updates(PARAMS, u1)
    u2, _ = tx.update(G2, state, p1)
    return jax.tree.map(np.asarray, (u1, u2))


def np_tree(t):
    return {k: np.asarray(v, np.float64) for k, v in t.items()}


P, g1, g2 = np_tree(PARAMS), np_tree(G1), np_tree(G2)


def expected(name, wd=0.0):
    out1, out2 = {}, {}
    for k in P:
        decay = wd if k == "w" else 0.0  # decay only weight matrices
        if name == "sgd":
            out1[k], out2[k] = -LR * g1[k], -LR * g2[k]
        elif name == "momentum":
            t1 = g1[k]
            t2 = g2[k] + MOMENTUM * t1
            out1[k], out2[k] = -LR * t1, -LR * t2
        elif name == "nesterov":
            t1 = g1[k]
            t2 = g2[k] + MOMENTUM * t1
            out1[k], out2[k] = -LR * (g1[k] + MOMENTUM * t1), -LR * (g2[k] + MOMENTUM * t2)
        elif name == "rmsprop":
            v1 = (1 - B2) * g1[k] ** 2
            v2 = B2 * v1 + (1 - B2) * g2[k] ** 2
            out1[k], out2[k] = -LR * g1[k] / (np.sqrt(v1) + EPS), -LR * g2[k] / (np.sqrt(v2) + EPS)
        elif name in ("adam", "adamw", "adam_l2"):
            a1 = g1[k] + (decay * P[k] if name == "adam_l2" else 0)
            m1, v1 = (1 - B1) * a1, (1 - B2) * a1**2
            step1 = (m1 / (1 - B1)) / (np.sqrt(v1 / (1 - B2)) + EPS)
            p1 = P[k] - LR * step1 - (LR * decay * P[k] if name == "adamw" else 0)
            a2 = g2[k] + (decay * p1 if name == "adam_l2" else 0)
            m2, v2 = B1 * m1 + (1 - B1) * a2, B2 * v1 + (1 - B2) * a2**2
            step2 = (m2 / (1 - B1**2)) / (np.sqrt(v2 / (1 - B2**2)) + EPS)
            out1[k] = -LR * step1 - (LR * decay * P[k] if name == "adamw" else 0)
            out2[k] = -LR * step2 - (LR * decay * p1 if name == "adamw" else 0)
    return out1, out2


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "rmsprop", "adam"])
def test_two_steps_equal_the_update_rule(name):
    (u1, u2), (e1, e2) = two_steps(name), expected(name)
    for k in P:
        np.testing.assert_allclose(u1[k], e1[k], rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(u2[k], e2[k], rtol=2e-5, atol=1e-7)


def test_adamw_decouples_weight_decay_and_spares_biases():
    (u1, u2), (e1, e2) = two_steps("adamw", weight_decay=WD), expected("adamw", WD)
    for k in P:
        np.testing.assert_allclose(u1[k], e1[k], rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(u2[k], e2[k], rtol=2e-5, atol=1e-7)


def test_adam_with_weight_decay_is_l2_added_to_the_gradient():
    (u1, u2), (e1, e2) = two_steps("adam", weight_decay=WD), expected("adam_l2", WD)
    for k in P:
        np.testing.assert_allclose(u1[k], e1[k], rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(u2[k], e2[k], rtol=2e-5, atol=1e-7)


def test_adagrad_two_steps_equal_its_rule():
    u1, u2 = two_steps("adagrad")
    for k in P:
        s1 = 0.1 + g1[k] ** 2  # optax's accumulators start at 0.1
        s2 = s1 + g2[k] ** 2
        np.testing.assert_allclose(u1[k], -LR * g1[k] / np.sqrt(s1 + EPS), rtol=2e-5, atol=1e-7)
        np.testing.assert_allclose(u2[k], -LR * g2[k] / np.sqrt(s2 + EPS), rtol=2e-5, atol=1e-7)


def test_lion_two_steps_equal_its_rule_with_decoupled_decay_on_matrices():
    u1, u2 = two_steps("lion", weight_decay=WD)
    for k in P:
        decay = WD if k == "w" else 0.0
        m1 = (1 - B2) * g1[k]
        p1 = P[k] - LR * (np.sign(g1[k]) + decay * P[k])
        np.testing.assert_allclose(u1[k], p1 - P[k], rtol=2e-5, atol=1e-7)
        direction = np.sign(B1 * m1 + (1 - B1) * g2[k])
        np.testing.assert_allclose(u2[k], -LR * (direction + decay * p1), rtol=2e-5, atol=1e-7)


def test_every_config_optimizer_builds_and_an_unknown_one_lists_the_names():
    for name in transforms.OPTIMIZERS:
        assert all(np.all(np.isfinite(u["w"])) for u in two_steps(name))
    with pytest.raises(ValueError, match="allowed: sgd, momentum"):
        transforms.optimizer(OptimConfig(name="lamb"), hp(), 10)


@pytest.mark.parametrize("tau", [0.05, 0.3, 10.0])
def test_global_norm_clipping_caps_the_update_norm(tau):
    cfg = OptimConfig(name="sgd", clip="global_norm")
    tx = transforms.build(cfg, hp(lr=1.0, clip_threshold=tau), total_steps=10)
    updates, _ = tx.update(G1, tx.init(PARAMS), PARAMS)
    norm = float(np.sqrt(sum(np.sum(np.asarray(v) ** 2) for v in updates.values())))
    grad_norm = float(np.sqrt(sum(np.sum(v**2) for v in g1.values())))
    assert norm == pytest.approx(min(grad_norm, tau), rel=1e-6)


def test_swept_learning_rates_share_one_program():
    cfg = OptimConfig(name="adam")

    def first_update(lr):
        tx = transforms.build(cfg, {**hp(), "optim.lr": lr}, total_steps=10)
        return tx.update(G1, tx.init(PARAMS), PARAMS)[0]["w"]

    lrs = jnp.asarray([1e-3, 1e-2, 1e-1])
    out = jax.jit(jax.vmap(first_update))(lrs)
    # Adam's first step is lr * g / (|g| + eps) = lr * sign(g)
    np.testing.assert_allclose(np.asarray(out), -np.asarray(lrs)[:, None, None] * np.sign(g1["w"])[None], rtol=1e-5)


def closed_form(cfg, t, total):
    warm = cfg.warmup_steps
    n = total - warm
    if t < warm:
        return t / warm
    s = t - warm
    end = cfg.final_lr_fraction
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        return end + (1 - end) * 0.5 * (1 + np.cos(np.pi * min(s, n) / n))
    if cfg.schedule == "exponential":
        return cfg.decay_rate ** (s / n)
    if cfg.schedule == "inverse_time":
        return 1 / (1 + (1 / cfg.decay_rate - 1) * min(s, n) / n)
    if cfg.schedule == "linear":
        return 1 + (end - 1) * min(s, n) / n
    raise ValueError(cfg.schedule)


@pytest.mark.parametrize("schedule", ["constant", "cosine", "exponential", "inverse_time", "linear"])
@pytest.mark.parametrize("warmup", [0, 10])
def test_schedule_values_equal_their_closed_forms(schedule, warmup):
    cfg = dataclasses.replace(
        OptimConfig(), schedule=schedule, warmup_steps=warmup, final_lr_fraction=0.1, decay_rate=0.2
    )
    lr = transforms.learning_rate(cfg, 0.5, 100)
    for t in (0, 5, 10, 37, 60, 99, 100):
        assert float(lr(t)) == pytest.approx(0.5 * closed_form(cfg, t, 100), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("size", [7, 4096, 50_000])
def test_dot_sums_match_numpy_in_float64(size):
    """Below 4096 entries a plain reduction, from there a dot; float32 accumulation either way."""
    from gradlab import sums

    x = np.random.default_rng(size).standard_normal((size, 1)).astype(np.float32)
    exact = x.astype(np.float64)
    np.testing.assert_allclose(float(sums.total(x)), exact.sum(), atol=1e-6 * size)
    np.testing.assert_allclose(float(sums.sum_of_squares(x)), (exact**2).sum(), rtol=1e-5)
    lanes = jax.vmap(sums.sum_of_squares)(np.stack([x, -2 * x]))  # how a sweep computes it: one per lane
    np.testing.assert_allclose(np.asarray(lanes), [(exact**2).sum(), 4 * (exact**2).sum()], rtol=1e-5)
    np.testing.assert_allclose(
        float(sums.global_norm({"a": x, "b": x[:3]})), np.sqrt((exact**2).sum() + (exact[:3] ** 2).sum()), rtol=1e-5
    )


@pytest.mark.parametrize("shape", [(3, 7, 5), (4, 64, 128)])
def test_row_sums_and_stack_telemetry_match_numpy(shape):
    """Per-matrix sums of a stack (plain reduction below 4096 entries a row, a matrix-vector
    product from there), and the per-layer norm and non-finite fraction built on them, against
    float64 numpy; one row holds a NaN and an inf, which its norm and fraction must show and the
    other rows must not."""
    from gradlab import sums, telemetry

    x = np.random.default_rng(shape[1]).standard_normal(shape).astype(np.float32)
    exact = x.astype(np.float64).reshape(shape[0], -1)
    entries = exact.shape[1]
    # float32 accumulation of `entries` terms of size ~1: error well under 1e-6 * entries
    np.testing.assert_allclose(np.asarray(sums.row_totals(x)), exact.sum(1), atol=1e-6 * entries)
    np.testing.assert_allclose(np.asarray(sums.row_sums_of_squares(x)), (exact**2).sum(1), rtol=1e-5)
    np.testing.assert_allclose(
        np.asarray(jax.vmap(sums.row_sums_of_squares)(x[None].repeat(2, 0))),
        np.tile((exact**2).sum(1), (2, 1)),
        rtol=1e-5,
    )
    x[1, 0, 0], x[1, -1, -1] = np.nan, np.inf
    norms = np.asarray(telemetry.frobenius_rows(x))
    fractions = np.asarray(telemetry.nonfinite_fraction_rows(x))
    assert np.isnan(norms[1]) and fractions[1] == 2 / entries
    keep = [0, 2]
    np.testing.assert_allclose(norms[keep], np.sqrt((exact[keep] ** 2).sum(1)), rtol=1e-5)
    assert np.all(fractions[keep] == 0)


@pytest.mark.parametrize("threshold", [0.5, 1e3])
def test_clip_by_global_norm_is_optaxs_rule(threshold):
    """Clips (threshold 0.5) or passes (1e3) exactly where optax.clip_by_global_norm does, to float32 rounding."""
    rng = np.random.default_rng(3)
    grads = {
        "big": jnp.asarray(rng.standard_normal((3, 100, 50)), jnp.float32),
        "small": jnp.asarray(rng.standard_normal(5), jnp.float32),
    }
    ours, _ = transforms.clip_by_global_norm(threshold).update(grads, optax.EmptyState())
    theirs, _ = optax.clip_by_global_norm(threshold).update(grads, optax.EmptyState())
    norm = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in grads.values()))
    assert (norm > threshold) == (threshold == 0.5)
    for name in grads:
        np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-8)
    clipped = np.sqrt(sum(np.sum(np.asarray(g, np.float64) ** 2) for g in ours.values()))
    np.testing.assert_allclose(clipped, min(norm, threshold), rtol=1e-5)


def test_spectral_norm_matches_numpys_svd():
    """telemetry.spectral_norm (repeated squaring of w^T w, no LAPACK) against numpy's float64 SVD:
    Gaussian matrices tall, wide and square; an orthogonal matrix times 0.7 (every singular value the
    top one); a top singular value 0.1% above the next; zero; and under vmap."""
    from gradlab import inits, telemetry

    rng = np.random.default_rng(7)
    q1, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    q2, _ = np.linalg.qr(rng.standard_normal((24, 24)))
    close = q1 @ np.diag(np.r_[1.001, np.linspace(1.0, 0.1, 23)]) @ q2.T
    orthogonal = 0.7 * np.asarray(inits.orthogonal(jax.random.PRNGKey(0), (16, 16)))
    cases = [
        rng.standard_normal((16, 16)),
        rng.standard_normal((64, 32)),
        rng.standard_normal((8, 40)) * 1e3,
        orthogonal,
        close,
    ]
    for w in cases:
        w = np.asarray(w, np.float32)
        exact = np.linalg.svd(w.astype(np.float64), compute_uv=False)[0]
        np.testing.assert_allclose(float(telemetry.spectral_norm(w)), exact, rtol=2e-6)
    assert float(telemetry.spectral_norm(np.zeros((5, 5), np.float32))) == 0.0
    stack = np.stack([np.asarray(c, np.float32)[:8, :8] for c in cases])
    exact = np.linalg.svd(stack.astype(np.float64), compute_uv=False)[:, 0]
    np.testing.assert_allclose(np.asarray(jax.vmap(telemetry.spectral_norm)(stack)), exact, rtol=2e-6)


def test_batch_scaled_lr_is_goyal_et_als_rule_with_its_warmup():
    """lr (1 + (k - 1) min(1, seen / warmup)), k = ratio**power: linear, square-root and no scaling."""
    seen = jnp.asarray([0.0, 50.0, 100.0, 400.0])
    np.testing.assert_allclose(transforms.batch_scaled_lr(0.1, 4.0, 1.0, 100.0, seen), [0.1, 0.25, 0.4, 0.4], rtol=1e-6)
    np.testing.assert_allclose(transforms.batch_scaled_lr(0.1, 4.0, 0.5, 100.0, seen), [0.1, 0.15, 0.2, 0.2], rtol=1e-6)
    np.testing.assert_allclose(transforms.batch_scaled_lr(0.1, 4.0, 0.0, 100.0, seen), 0.1, rtol=1e-6)
    np.testing.assert_allclose(transforms.batch_scaled_lr(0.1, 4.0, 1.0, 0.0, seen), 0.4, rtol=1e-6)  # no warmup
