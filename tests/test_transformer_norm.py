"""transformer_norm at its tiny size: the masked-depth probe against an unmasked net of that depth,
the traced warmup switch, and the (L+1)^-1/2 slope."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import api, sequences
from gradlab import transformer as tf
from gradlab import transformer_trials as tt
from gradlab.experiments import transformer_norm


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("transformer_norm")
    # Both warmup settings (the tiny scale has warmup on only: too few steps to train, it checks the probe).
    return api.execute("transformer_norm", ["warmup=[false, true]"], "tiny", out=out, progress=False, draw=False)


def test_probe_equals_the_last_block_gradient_of_an_unmasked_net(tiny):
    """init_last_grad[depth] is |dL/dW| of block depth-1 of a net of max depth masked to `depth`; here
    recomputed with a net of exactly that depth holding the first `depth` blocks of the same init."""
    spec = api.resolve("transformer_norm", scale="tiny")
    cfg = dataclasses.replace(spec.config, model=dataclasses.replace(spec.config.model, norm_position="pre"))
    deepest = max(cfg.probe_depths)
    task = sequences.make(cfg.data)
    tokens = jnp.asarray(task.tokens[: cfg.data.batch_size])
    _, k_probe = jax.random.split(jax.random.PRNGKey(0))  # the seed's key, split as language_model does
    key = jax.random.split(k_probe, cfg.probe_seeds)[1]
    measured = tiny.dataset["init_last_grad"].sel({"model.norm_position": "pre"}).isel(step=0)
    for i, depth in enumerate(cfg.probe_depths):
        model = dataclasses.replace(cfg.model, depth=depth, z_loss=0.0)
        hyper = tf.TransformerHyper.from_config(model)
        full = tf.init(key, dataclasses.replace(tt.spec_of(cfg), depth=deepest), hyper)
        params = {**full, "blocks": jax.tree.map(lambda a: a[:depth], full["blocks"])}
        small = tf.TransformerSpec.from_config(model, cfg.data.vocab, cfg.data.seq_len)
        loss = lambda p: tt.loss_fn(small, hyper, jnp.asarray(task.target_mask))(p, tokens)[0]  # noqa: E731
        expected = float(tf.block_grad_norms(jax.grad(loss)(params))[-1])
        got = float(measured.sel(warmup=False).isel(probe_depth=i, probe_seed=1).squeeze())
        assert got == pytest.approx(expected, rel=1e-4)


def test_warmup_switch_ramps_the_rate(tiny):
    ds = tiny.dataset
    cfg = api.resolve("transformer_norm", scale="tiny").config
    lr = ds["lr"].isel({"model.norm_position": 0}).squeeze()
    steps = ds["step"].values
    ramp = cfg.optim.warmup_steps
    np.testing.assert_allclose(lr.sel(warmup=True), cfg.optim.lr * np.minimum(1.0, steps / ramp), rtol=1e-6)
    np.testing.assert_allclose(lr.sel(warmup=False), cfg.optim.lr, rtol=1e-6)


def test_theory_slope_is_the_fitted_slope_of_the_power_law():
    depths = np.array([2, 4, 8, 16])
    slope = transformer_norm.theory_slope(depths)
    assert slope == pytest.approx(np.polyfit(np.log(depths), -0.5 * np.log(depths + 1), 1)[0])
    assert -0.5 < slope < -0.4  # (L+1)^-1/2 is flatter than L^-1/2 at small L
    assert transformer_norm.theory_slope([1e5, 1e6]) == pytest.approx(-0.5, abs=1e-5)


def test_every_check_is_made_with_both_warmup_settings(tiny):
    names = [c.name.split(":")[0] for c in tiny.checks]
    assert names == ["Pre-LN", "Post-LN", "Post-LN, adam lr 0.003", "Pre-LN, lr 0.003"], names
