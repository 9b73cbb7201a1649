"""attention_logits at its tiny size: each vmapped rate equals its own run, the telemetry against a
direct forward pass, the LR-sensitivity definition shared with lr_sweep, and the measured numbers."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import analysis, api, sequences
from gradlab import transformer as tf
from gradlab import transformer_trials as tt
from gradlab.experiments import attention_logits, lr_sweep


@pytest.fixture(scope="module")
def tiny(tiny_scale):
    return tiny_scale("attention_logits")[0]


def test_step_zero_telemetry_equals_a_direct_forward_pass(tiny):
    spec = api.resolve("attention_logits", scale="tiny")
    cfg = dataclasses.replace(spec.config, model=dataclasses.replace(spec.config.model, qk_layernorm=False))
    task = sequences.make(cfg.data)
    hyper = tf.TransformerHyper.from_config(cfg.model)
    k_params, _ = jax.random.split(jax.random.PRNGKey(0))
    params = tf.init(k_params, tt.spec_of(cfg), hyper)
    tokens = jnp.asarray(task.tokens[: cfg.data.batch_size])
    logits, taps = tf.apply(params, tokens[:, :-1], tt.spec_of(cfg), hyper)
    ce = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), np.asarray(tokens[:, 1:, None]), -1)[..., 0]
    lane = tiny.dataset.sel({"model.qk_layernorm": False}).isel(step=0, **{"optim.lr": 0}).squeeze()
    np.testing.assert_allclose(lane["loss"], ce[:, cfg.data.order - 1 :].mean(), rtol=1e-5)
    np.testing.assert_allclose(np.ravel(lane["attn_logit_max"]), np.ravel(taps["attn_logit_max"]), rtol=1e-5)
    np.testing.assert_allclose(np.ravel(lane["attn_entropy"]), np.ravel(taps["attn_entropy"]), rtol=1e-5)
    np.testing.assert_allclose(lane["log_partition"], jax.nn.logsumexp(logits, -1).mean(), rtol=1e-5)


def test_a_vmapped_rate_equals_its_own_run(tiny, tmp_path):
    ds = tiny.dataset.sel({"model.qk_layernorm": True})
    lr = float(ds["optim.lr"].values[2])
    alone = api.execute(
        "attention_logits",
        [f"optim.lr={lr!r}", "model.qk_layernorm=true"],
        "tiny",
        out=tmp_path,
        progress=False,
        draw=False,
    )
    np.testing.assert_allclose(
        alone.dataset["loss"].values.squeeze(), ds["loss"].sel({"optim.lr": lr}).values.squeeze(), rtol=1e-4
    )


def test_lr_sensitivity_is_lr_sweeps_definition():
    lrs = np.logspace(-3, 1, 5)
    final = np.array([0.9, 0.2, 0.05, 3.0, np.inf])
    curve = lr_sweep.Curve("sgd", "none", 0, False, lrs, final, ~np.isfinite(final), 2.0, np.ones(1), np.ones(1))
    assert analysis.lr_sensitivity(final, 2.0) == pytest.approx(curve.sensitivity())
    assert analysis.lr_sensitivity(final, 2.0) == pytest.approx(np.mean([0.85, 0.15, 0.0, 1.95, 1.95]) / 2.0)


def test_last_finite_picks_the_value_before_divergence():
    x = np.array([[1.0, 2.0, np.nan, np.nan], [np.nan, np.nan, np.nan, np.nan], [1.0, 2.0, 3.0, 4.0]])
    np.testing.assert_array_equal(attention_logits.last_finite(x), [2.0, np.nan, 4.0])


def test_every_check_is_made_and_qk_layernorm_bounds_the_logits_at_init(tiny):
    """With unit norm scales and zero biases (the init), |LN(q) . LN(k)| / sqrt(e) <= sqrt(e)."""
    m, checks = api.experiments.evaluate(attention_logits, tiny.dataset)
    assert len(checks) == 4
    head_dim = m.cfg["model"]["width"] // m.cfg["model"]["heads"]
    start = tiny.dataset["attn_logit_max"].isel(step=0)
    assert float(start.sel({"model.qk_layernorm": True}).max()) <= np.sqrt(head_dim) * (1 + 1e-5)
