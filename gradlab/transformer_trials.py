"""A Trial that trains the config's transformer on its Markov-chain sequences, with per-block telemetry.

`language_model(cfg)` is the train-state recipe transformer experiments share; `cfg.model` is a
transformer.TransformerConfig, `cfg.data` a sequences.SequenceConfig, `cfg.optim` the usual optax chain.
Hooks: `update_scale(hp, step)` multiplies the optimizer's update (a traced warmup switch: every
optax optimizer applies its rate last, so scaling the update scales the rate); `probe(hp, key, tokens)`
computes something once at init (a pytree) that `probe_metrics(probe)` turns into metrics every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from gradlab import sequences, telemetry, transforms
from gradlab import transformer as tf
from gradlab.engine import Trial

LAYER_METRICS = ("attn_logit_max", "attn_logit_rms", "resid_rms")


class LMState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    step: jax.Array
    probe: Any  # what `probe` computed at init (an empty tuple without one)


def spec_of(cfg) -> tf.TransformerSpec:
    return tf.TransformerSpec.from_config(cfg.model, cfg.data.vocab, cfg.data.seq_len)


def batch_at(pool, step, batch_size: int):
    """Sequences [i B, (i + 1) B) of the pool, i = step mod (pool // B): (B, seq_len + 1) tokens."""
    blocks = pool.shape[0] // batch_size
    start = (step % blocks) * batch_size
    return jax.lax.dynamic_slice_in_dim(pool, start, batch_size, axis=0)


def loss_fn(spec, hyper, weights):
    """params, tokens (B, T + 1) -> (objective, (cross-entropy, taps)), for jax.value_and_grad."""

    def fn(params, tokens):
        logits, taps = tf.apply(params, tokens[:, :-1], spec, hyper)
        objective, ce = tf.losses(logits, tokens[:, 1:], weights, hyper.z_loss)
        return objective, (ce, taps)

    return fn


def language_model(
    cfg,
    *,
    update_scale: Callable[[dict, jax.Array], jax.Array] | None = None,
    probe: Callable[[dict, jax.Array, jax.Array], Any] | None = None,
    probe_metrics: Callable[[Any], dict] | None = None,
) -> Trial:
    """Train with the config's optax chain; every step records, before the update: loss (the
    cross-entropy on the scored positions), objective (with the z-loss), lr (with update_scale) and,
    with `telemetry: layers`, grad_global_norm, output_logit_rms, log_partition and per block (NaN
    beyond the active depth): attn_logit_max, attn_logit_rms, attn_entropy (block, head), resid_rms,
    grad_norm."""
    spec = spec_of(cfg)
    task = sequences.make(cfg.data)
    pool = jnp.asarray(task.tokens)
    weights = jnp.asarray(task.target_mask)
    total = cfg.steps
    layers = cfg.telemetry == "layers"

    def optimizer(hp):
        return transforms.build(cfg.optim, hp, total)

    def init(hp, key):
        k_params, k_probe = jax.random.split(key)
        params = tf.init(k_params, spec, tf.TransformerHyper.from_hp(hp, cfg.model.init))
        found = probe(hp, k_probe, batch_at(pool, 0, cfg.data.batch_size)) if probe else ()
        return LMState(params, optimizer(hp).init(params), jnp.int32(0), found)

    def step(hp, state):
        hyper = tf.TransformerHyper.from_hp(hp, cfg.model.init)
        tokens = batch_at(pool, state.step, cfg.data.batch_size)
        grad_fn = jax.value_and_grad(loss_fn(spec, hyper, weights), has_aux=True)
        (objective, (ce, taps)), grads = grad_fn(state.params, tokens)
        updates, opt_state = optimizer(hp).update(grads, state.opt_state, state.params)
        scale = update_scale(hp, state.step) if update_scale else jnp.float32(1.0)
        # optax types parameters as any pytree; these have the structure of state.params: a dict.
        params = cast(dict, optax.apply_updates(state.params, jax.tree.map(lambda u: scale * u, updates)))
        rate = scale * transforms.learning_rate(cfg.optim, hp["optim.lr"], total)(state.step)
        out = {"loss": ce, "objective": objective, "lr": rate}
        if layers:
            mask = tf.block_mask(spec, hyper)
            per_block = {name: taps[name] for name in LAYER_METRICS} | {"grad_norm": tf.block_grad_norms(grads)}
            out |= {name: jnp.where(mask, value, jnp.nan) for name, value in per_block.items()}
            out |= {
                "attn_entropy": jnp.where(mask[:, None], taps["attn_entropy"], jnp.nan),
                "grad_global_norm": telemetry.global_norm(grads),
                "output_logit_rms": taps["output_logit_rms"],
                "log_partition": taps["log_partition"],
            }
        if probe_metrics is not None:
            out |= probe_metrics(state.probe)
        return LMState(params, opt_state, state.step + 1, state.probe), out

    return Trial(init, step, {"attn_entropy": ("layer", "head")})


def sequence_reference(cfg) -> dict:
    """The chain's entropy rate (the best achievable loss) and its unigram entropy (ignoring context)."""
    task = sequences.make(cfg.data)
    return {"entropy_rate": task.entropy_rate, "unigram_entropy": sequences.unigram_entropy(task.chain)}
