"""Ready-made Trials: supervised training of an MLP on a synthetic task, with telemetry."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from gradlab import data, models, telemetry, transforms
from gradlab.engine import Trial


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    data: data.Data
    step: jax.Array
    key: jax.Array


def mlp_spec(cfg) -> models.MLPSpec:
    out_dim = cfg.data.output_dim
    return models.MLPSpec.from_config(cfg.model, cfg.data.input_dim, out_dim)


def supervised_mlp(cfg) -> Trial:
    """Train the config's MLP with its optax chain; every step records, before the update
    (with `telemetry: loss`, the loss alone):

    loss, grad_global_norm (before clipping), lr, and per layer: grad_norm, param_norm,
    update_norm, update_ratio, grad_nonfinite, act_rms, act_std, preact_rms, dead_frac and
    delta_rms (RMS of dL/dh, the back-propagated signal).
    """
    spec = mlp_spec(cfg)
    total = cfg.steps
    layers = cfg.telemetry == "layers"

    def init(hp, key):
        hyper = models.MLPHyper.from_hp(hp)
        k_params, k_batches = jax.random.split(key)
        params = models.init(k_params, spec, hyper)
        opt_state = transforms.build(cfg.optim, hp, total).init(params)
        return TrainState(params, opt_state, data.make(cfg.data), jnp.int32(0), k_batches)

    def step(hp, state):
        hyper = models.MLPHyper.from_hp(hp)
        tx = transforms.build(cfg.optim, hp, total)
        batch = data.batch(state.data, cfg.data, state.step, state.key)
        probes = models.zero_probes(spec, batch.x.shape[0], jnp.dtype(spec.dtype)) if layers else None

        def loss_fn(params, probes):
            out, taps = models.apply(params, batch.x, spec, hyper, probes)
            return data.loss(cfg.data, out, batch.y), taps

        (loss, taps), (grads, probe_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            state.params, probes
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new_state = TrainState(params, opt_state, state.data, state.step + 1, state.key)
        if not layers:
            return new_state, {"loss": loss}
        mask = models.layer_mask(spec, hyper)
        metrics = {
            "loss": loss,
            "grad_global_norm": telemetry.global_norm(grads),
            "lr": transforms.learning_rate(cfg.optim, hp["optim.lr"], total)(state.step),
            **telemetry.mlp_layer_stats(state.params, grads, updates, mask),
            **{name: jnp.where(mask, value, jnp.nan) for name, value in taps.items()},
            "delta_rms": jnp.where(mask, models.probe_rms(probe_grads), jnp.nan),
        }
        return new_state, metrics

    return Trial(init, step)
