"""Ready-made Trials: supervised training of an MLP on a synthetic task, with telemetry.

`supervised_mlp(cfg)` is the train-state recipe every MLP experiment shares. Experiments change
it through hooks rather than retyping it:

  hp_map(hp, step) -> hp        rewrite the traced hyperparameters (e.g. pick an init scheme's
                                numbers, a step-dependent learning rate); init sees step 0
  optimizer(hp) -> tx           the optax transformation (default: transforms.build(cfg.optim))
  loss_and_grad(params, batch, hyper, probes) -> ((loss, taps), (grads, probe_grads))
                                the gradient (default: jax.value_and_grad of the config's loss;
                                e.g. a mean of per-example gradients)
  metrics(view) -> dict         extra metrics from this step's StepView (its batch, gradient,
                                updates): nothing is computed twice
  data_fn(key) -> Data          the training set (default: data.make(cfg.data))
  parametrized(hp) -> Parametrized
                                the parametrization's numbers (default: model.parametrization's,
                                gradlab/parametrization.py): its init scales and multipliers go into
                                the MLPHyper, its per-layer lr scales after the default optimizer (an
                                `optimizer` hook applies them itself: Parametrized.optimizer)

`chosen_by_index(hp[...], txs)` is an `optimizer` for a swept choice among several optax chains.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import optax

from gradlab import data, models, parametrization, telemetry, transforms
from gradlab.engine import Trial


class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    data: data.Data
    step: jax.Array
    key: jax.Array


class StepView(NamedTuple):
    """What a step computed, for a `metrics` hook: everything is before the update but
    `new_params` and `updates`."""

    hp: dict  # after hp_map
    hyper: models.MLPHyper
    state: TrainState  # before the update
    batch: data.Data
    loss: jax.Array
    grads: dict  # of the loss, before any clipping
    updates: dict  # what the optimizer returned
    new_params: dict
    taps: dict  # loss_and_grad's aux: per-layer activation statistics (empty with telemetry=loss and no probes)
    probe_grads: dict | None = None  # dL/dh per layer, the gradient w.r.t. the probes (None without probes)


def mlp_spec(cfg) -> models.MLPSpec:
    return models.MLPSpec.from_config(cfg.model, cfg.data.input_dim, cfg.data.output_dim)


def supervised_mlp(
    cfg,
    *,
    hp_map: Callable[[dict, jax.Array], dict] | None = None,
    optimizer: Callable[[dict], optax.GradientTransformation] | None = None,
    loss_and_grad: Callable | None = None,
    metrics: Callable[[StepView], dict] | None = None,
    data_fn: Callable[[jax.Array], data.Data] | None = None,
    parametrized: Callable[[dict], parametrization.Parametrized] | None = None,
) -> Trial:
    """Train the config's MLP with its optax chain; every step records, before the update
    (with `telemetry: loss`, the loss alone), plus whatever the `metrics` hook adds:

    loss, grad_global_norm (before clipping), lr, and per layer: grad_norm, param_norm,
    update_norm, update_ratio, grad_nonfinite, act_rms, act_std, preact_rms, dead_frac and
    delta_rms (RMS of dL/dh, the back-propagated signal).

    A real dataset adds test_loss (and test_accuracy, for classification), before the update, on a
    slice of its test split as large as the minibatch (data.eval_slice: one forward pass, at most a
    third of the step's cost; any ceil(test / batch) consecutive steps cover the test split; with
    full-batch training, the whole split every step).
    """
    spec = mlp_spec(cfg)
    total = cfg.steps
    layers = cfg.telemetry == "layers"
    hp_map = hp_map or (lambda hp, step: hp)
    parametrized = parametrized or (
        lambda hp: parametrization.of_model(cfg.model, cfg.optim.name, spec.width, hp["model.depth"])
    )
    optimizer = optimizer or (lambda hp: parametrized(hp).optimizer(transforms.build(cfg.optim, hp, total)))
    data_fn = data_fn or (lambda key: data.make(cfg.data))
    test = data.held_out(cfg.data)
    batch_size = cfg.data.batch_size if 0 < cfg.data.batch_size < cfg.data.examples else cfg.data.examples

    def default_loss_and_grad(params, batch, hyper, probes):
        def loss_fn(params, probes):
            out, taps = models.apply(params, batch.x, spec, hyper, probes)
            return data.loss(cfg.data, out, batch.y), taps

        return jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, probes)

    loss_and_grad = loss_and_grad or default_loss_and_grad

    def hyper_of(hp):
        return parametrized(hp).hyper(models.MLPHyper.from_hp(hp))

    def init(hp, key):
        hp = hp_map(hp, jnp.int32(0))
        k_params, k_batches = jax.random.split(key)
        params = models.init(k_params, spec, hyper_of(hp))
        opt_state = optimizer(hp).init(params)
        return TrainState(params, opt_state, data_fn(k_batches), jnp.int32(0), k_batches)

    def step(hp, state):
        hp = hp_map(hp, state.step)
        hyper = hyper_of(hp)
        batch = data.batch(state.data, cfg.data, state.step, state.key)
        probes = models.zero_probes(spec, batch.x.shape[0], jnp.dtype(spec.dtype)) if layers else None
        (loss, taps), (grads, probe_grads) = loss_and_grad(state.params, batch, hyper, probes)
        updates, opt_state = optimizer(hp).update(grads, state.opt_state, state.params)
        # optax types updates and parameters as any pytree; both have the structure of params: a dict.
        updates = cast(dict, updates)
        params = cast(dict, optax.apply_updates(state.params, updates))
        new_state = TrainState(params, opt_state, state.data, state.step + 1, state.key)
        out = {"loss": loss}
        if test is not None:
            held = data.eval_slice(test, batch_size, state.step)
            test_out = models.apply(state.params, held.x, spec, hyper)[0]
            out["test_loss"] = data.loss(cfg.data, test_out, held.y)
            if data.kind(cfg.data) == "classification":
                out["test_accuracy"] = data.accuracy(test_out, held.y)
        if layers:
            mask = models.layer_mask(spec, hyper)
            out.update(
                {
                    "grad_global_norm": telemetry.global_norm(grads),
                    "lr": transforms.learning_rate(cfg.optim, hp["optim.lr"], total)(state.step),
                    **telemetry.mlp_layer_stats(state.params, grads, updates, mask),
                    **{name: jnp.where(mask, value, jnp.nan) for name, value in taps.items()},
                    "delta_rms": jnp.where(mask, models.probe_rms(probe_grads), jnp.nan),
                }
            )
        if metrics is not None:
            view = StepView(hp, hyper, state, batch, loss, grads, updates, params, taps or {}, probe_grads)
            out.update(metrics(view))
        return new_state, out

    return Trial(init, step)


def chosen_by_index(index, choices) -> optax.GradientTransformation:
    """The transformation choices[index] for a traced index (a swept optimizer family in one program).

    Every choice keeps its own state and computes its update each step; the index picks whose update
    is returned, exactly (a select, no arithmetic).
    """

    def init(params):
        return tuple(tx.init(params) for tx in choices)

    def update(updates, state, params=None):
        stepped = [tx.update(updates, s, params) for tx, s in zip(choices, state, strict=True)]
        picked = jax.tree.map(lambda *u: jax.lax.select_n(index, *u), *[u for u, _ in stepped])
        return picked, tuple(s for _, s in stepped)

    return optax.GradientTransformation(init, update)


def task_reference(cfg) -> dict:
    """The loss of the best constant prediction on the config's task (an experiment's `reference`)."""
    import numpy as np

    from gradlab import analysis

    task = data.make(cfg.data)
    return {"constant_loss": analysis.constant_loss(np.asarray(task.y), data.kind(cfg.data), cfg.data.output_dim)}
