"""Measure and sweep your own model: a flax linen Module, an nnx Module, or a pure apply(params, x).

    probe(model, params, batch)                 per-parameter gradient statistics and
                                                per-activation RMS/std at these params
    sweep(model, loss, data, lr=[...], seeds=[...], steps=...)
                                                train every (lr, seed) point in one compiled
                                                program: the plan -> engine -> results path of
                                                `gradlab run`, divergence marked; with
                                                sharpness_every=k, lambda_max of the Hessian too

What counts as the model's parameters and activations:
  linen  params are the variables of `model.init` ({"params": ...}; other collections such as
         batch_stats are passed to `apply` but held fixed); activations are the outputs of every
         submodule's __call__ (`capture_intermediates=True`) plus whatever the model `sow`s into
         "intermediates".
  nnx    params are the module's nnx.Param variables (`nnx.state(model, nnx.Param)`); the rest of
         its state is held fixed at the module's values; activations are the outputs of every
         submodule method (`nnx.capture(..., method_outputs=nnx.Intermediate)`) plus
         `self.sow(nnx.Intermediate, ...)` values.
  apply  any pytree of params; with `has_aux=True` apply returns (out, {name: activation}).
Every model's output is also an activation, labelled "output".

A batch is the model input x (an array), a tuple/list whose first item is x, or a dict with key
"x" or "inputs"; `loss(out, batch)` gets the whole batch. The default loss is the mean squared
output, mean(out ** 2), a label-free probe of how the output scale reacts to the parameters.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import xarray as xr

from gradlab import adapters, config, curvature, engine, results, telemetry, transforms
from gradlab.adapters import OptimizerFactory, leaf_labels, mean_squared_output  # noqa: F401 (public here too)
from gradlab.config import MAX_SEEDS, OptimConfig, param
from gradlab.errors import ConfigError

FACTORY = "factory"  # SweepConfig.name when `optimizer` is an optax factory, not a name
# Power-iteration HVPs per sharpness measurement: from a random vector at step 0, then warm-started
# from the previous measurement's eigenvector (doubled on a measurement that lands on a negative one).
COLD_ITERATIONS, WARM_ITERATIONS = 100, 20


@dataclass(frozen=True)
class SweepConfig(OptimConfig):
    """What sweep trains under: OptimConfig's keys at the top level (so dims read lr, seed, ...)
    and the run's length. Resolved, planned and run like an experiment's config."""

    name: str = param(
        "adam",
        choices=transforms.OPTIMIZERS + (FACTORY,),
        doc=f"an optimizer of gradlab.transforms; {FACTORY!r}: an optax factory (attrs['optimizer'])",
    )
    seed: int = param(0, low=0, high=MAX_SEEDS, sweep="traced")
    steps: int = param(100, low=1)
    chunk_steps: int = param(100, low=1, doc="steps per compiled chunk; a checkpoint after each")
    sharpness_every: int = param(0, low=0, doc="steps between lambda_max measurements (and at step 0); 0: none")

    def validate(self) -> None:
        """Nothing beyond each field's own checks."""


# ---------------------------------------------------------------------------------------------
# probe


def _frobenius_per_leaf(tree) -> jax.Array:
    return jnp.stack([telemetry.frobenius(leaf) for leaf in jax.tree.leaves(tree)])


def _loss_name(loss) -> str:
    return adapters.name_of(loss) if loss is not None else "mean_squared_output"


def probe(
    model, params, batch, loss: Callable | None = None, *, has_aux: bool = False, lanczos_steps: int = 30
) -> xr.Dataset:
    """Per-parameter gradient statistics and per-activation statistics at `params` on one batch.

    Args:
      model: a flax linen Module, an nnx Module, or a function apply(params, x) (see the module doc).
      params: linen: the variables of model.init; nnx: an nnx.State of Params, or None for the
        module's own; function: its params pytree.
      batch: x, (x, y, ...) or {"x": ...}; `loss` gets all of it.
      loss: loss(out, batch) -> scalar; default mean_squared_output (mean of out ** 2).
      has_aux: for a plain function, apply returns (out, {name: activation}).
      lanczos_steps: Lanczos steps (HVPs) per top Hessian eigenvalue, (1 + leaves) of them; 0: none.

    Returns:
      A Dataset with dim `param` (leaf labels such as "Dense_0/kernel"): grad_norm, param_norm,
      grad_param_ratio (grad_norm / param_norm, 0 where the param is 0), grad_nonfinite
      (fraction of non-finite gradient entries), param_size; dim `activation` (labels such as
      "Conv_0", "output"): act_rms = sqrt(mean(a^2)) and act_std (population std) over all of an
      activation's entries, act_nonfinite; and scalars loss and grad_global_norm. With
      lanczos_steps: hessian_top, the loss Hessian's top eigenvalue (the sharpness), and per param
      hessian_block_top, that of the leaf's diagonal block (gradlab.curvature.top_eigenvalues).
    """
    adapter = adapters.adapt(model, has_aux)
    loss_fn = adapters.loss_of(loss)
    trainable, fixed = adapter.split(params)
    adapters.inputs(batch)  # a malformed batch fails here with a ConfigError, not inside the trace
    lanczos_steps = adapters.non_negative_int("lanczos_steps", lanczos_steps, "no Hessian")

    def measure(trainable, fixed, batch):
        def objective(p):
            out, acts = adapter.forward(p, fixed, adapters.inputs(batch), True)
            return loss_fn(out, batch), acts

        (value, acts), grads = jax.value_and_grad(objective, has_aux=True)(trainable)
        grad_norm = _frobenius_per_leaf(grads)
        param_norm = _frobenius_per_leaf(trainable)
        act = {k: telemetry.at_least_f32(a) for k, a in acts.items()}
        return {
            "loss": value,
            "grad_global_norm": telemetry.global_norm(grads),
            "grad_norm": grad_norm,
            "param_norm": param_norm,
            "grad_param_ratio": telemetry.safe_ratio(grad_norm, param_norm),
            "grad_nonfinite": jnp.stack([telemetry.nonfinite_fraction(g) for g in jax.tree.leaves(grads)]),
            "act_rms": {k: jnp.sqrt(jnp.mean(jnp.square(a))) for k, a in act.items()},
            "act_std": {k: jnp.std(a) for k, a in act.items()},
            "act_nonfinite": {k: telemetry.nonfinite_fraction(a) for k, a in act.items()},
        }

    stats = jax.device_get(jax.jit(measure)(trainable, fixed, batch))
    activations = list(stats["act_rms"])
    per_act = {
        name: ("activation", np.asarray([stats[name][a] for a in activations], np.float32))
        for name in ("act_rms", "act_std", "act_nonfinite")
    }
    per_param = {
        name: ("param", np.asarray(stats[name]))
        for name in ("grad_norm", "param_norm", "grad_param_ratio", "grad_nonfinite")
    }
    sizes = [int(np.size(leaf)) for leaf in jax.tree.leaves(trainable)]
    if lanczos_steps:
        forward = lambda p: loss_fn(adapter.forward(p, fixed, adapters.inputs(batch), False)[0], batch)  # noqa: E731
        top, blocks = curvature.top_eigenvalues(forward, trainable, jax.random.PRNGKey(0), lanczos_steps)
        per_param |= {"hessian_block_top": ("param", blocks)}
        stats |= {"hessian_top": top}
    return xr.Dataset(
        {
            **per_param,
            "param_size": ("param", np.asarray(sizes, np.int64)),
            **per_act,
            "loss": ((), np.asarray(stats["loss"])),
            "grad_global_norm": ((), np.asarray(stats["grad_global_norm"])),
            **({"hessian_top": ((), np.asarray(stats["hessian_top"]))} if "hessian_top" in stats else {}),
        },
        coords={"param": adapters.leaf_labels(trainable), "activation": activations},
        attrs={"model_kind": adapter.kind, "loss": _loss_name(loss)},
    )


# ---------------------------------------------------------------------------------------------
# sweep


class SweepState(NamedTuple):
    params: Any
    fixed: Any
    opt_state: optax.OptState
    step: jax.Array
    data_key: jax.Array
    vectors: jax.Array | None = None  # with sharpness_every: the last eigenvectors (1 or 2, n), warm starts


def _spec(name: str, lrs: np.ndarray, seeds: np.ndarray, steps: int, chunk: int, optim, every: int) -> config.RunSpec:
    """The sweep as a resolved RunSpec: `lr` and `seed` axes, and `optim`'s keys (a list: an axis)."""
    if optim is None:
        optim = {}
    if not isinstance(optim, Mapping):
        raise ConfigError(
            f"optim: expected a dict of optimizer settings, e.g. {{'weight_decay': [0, 1e-4]}}, got "
            f"{type(optim).__name__}"
        )
    own = dict(name="optimizer", lr="lr", seed="seeds", seeds="seeds", steps="steps", chunk_steps="chunk_steps")
    own |= dict(sharpness_every="sharpness_every")
    for key in optim:
        if key in own:
            raise ConfigError(f"optim: {key}: set it with sweep's own argument {own[key]}=...")
    if optim and name == FACTORY:
        raise ConfigError(
            "optim: applies to a named optimizer; give a factory its settings, "
            "e.g. optimizer=lambda learning_rate: optax.adam(learning_rate, b1=0.95)"
        )
    raw = {str(k): _plain(v) for k, v in optim.items()}
    raw.update(name=name, lr=[float(v) for v in lrs], seed=[int(s) for s in seeds], steps=steps, chunk_steps=chunk)
    raw.update(sharpness_every=every)
    return config.resolve("gradlab.sweep", SweepConfig, raw, "sweep")


def _plain(value):
    """A value as a config file holds it: Python numbers, a list for a sequence (a sweep axis)."""
    if isinstance(value, np.ndarray | np.generic):
        return value.tolist()
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    return value


def _starts(adapter: adapters.Model, batch_at, init, params) -> Callable:
    """(params key, data key) -> (trainable, fixed): how each seed's run begins."""
    default_init = adapter.default_init
    if init is not None:
        if not callable(init):
            raise ConfigError(f"init: expected a function key -> params, got {type(init).__name__}")

        def start(key, data_key):
            del data_key
            return adapter.split(init(key))
    elif params is not None or default_init is None:
        trainable, fixed = adapter.split(params)  # a function without params fails here

        def start(key, data_key):
            del key, data_key  # every seed starts from the same params; seeds vary the data only
            return trainable, fixed
    else:

        def start(key, data_key):
            return default_init(key, adapters.inputs(batch_at(jnp.int32(0), data_key)))

    return start


def _holds_adam(opt_state) -> bool:
    """Whether an optimizer state holds Adam's second moments (an optax ScaleByAdamState)."""
    is_adam = lambda s: isinstance(s, optax.ScaleByAdamState)  # noqa: E731
    return any(map(is_adam, jax.tree.leaves(opt_state, is_leaf=is_adam)))


def _trial_fn(adapter: adapters.Model, loss_fn: Callable, batch_at: Callable, start: Callable, factory) -> Callable:
    """A static group's SweepConfig -> the Trial that trains one (lr, seed, ...) point.

    With sharpness_every = k the step measures lambda_max of the loss Hessian at its params on its
    batch at steps 0, k, 2k, ... (gradlab.curvature.gated_top_eigenvalues: the other steps skip the
    work), and for a named optimizer whose state holds Adam's second moments also lambda_max of
    P^-1 H, P = diag(sqrt(v_hat) + eps) of the state after this step's update (the P it used).
    """

    def trial(cfg: SweepConfig) -> engine.Trial:
        def optimizer_of(hp):
            if factory is not None:
                return optax.inject_hyperparams(factory)(learning_rate=hp["lr"])
            return transforms.build(cfg, hp, cfg.steps, prefix="")

        def init_fn(hp, key):
            params_key, data_key = jax.random.split(key)
            trainable, fixed = start(params_key, data_key)
            opt_state = optimizer_of(hp).init(trainable)
            vectors = None
            if cfg.sharpness_every:
                rows = 2 if factory is None and _holds_adam(opt_state) else 1
                n = sum(int(np.size(leaf)) for leaf in jax.tree.leaves(trainable))
                vectors = jax.random.normal(jax.random.fold_in(data_key, 1), (rows, n))
            return SweepState(trainable, fixed, opt_state, jnp.int32(0), data_key, vectors)

        def loss_at(params, fixed_batch):
            fixed, batch = fixed_batch
            out, _ = adapter.forward(params, fixed, adapters.inputs(batch), False)
            return loss_fn(out, batch)

        def curvature_metrics(hp, state, batch, opt_state) -> tuple[dict, jax.Array | None]:
            if not cfg.sharpness_every:
                return {}, None
            assert state.vectors is not None
            p_diag = None
            if state.vectors.shape[0] == 2:
                p_diag = curvature.adam_preconditioner(opt_state, hp["b2"], hp["eps"])
            due = state.step % cfg.sharpness_every == 0
            iterations = jnp.where(state.step == 0, COLD_ITERATIONS, WARM_ITERATIONS)
            lams, vectors = curvature.gated_top_eigenvalues(
                due, loss_at, state.params, (state.fixed, batch), state.vectors, iterations, p_diag
            )
            names = ("sharpness", "sharpness_preconditioned")
            return dict(zip(names, lams)), vectors

        def step_fn(hp, state):
            batch = batch_at(state.step, state.data_key)
            value, grads = jax.value_and_grad(loss_at)(state.params, (state.fixed, batch))
            updates, opt_state = optimizer_of(hp).update(grads, state.opt_state, state.params)
            metrics = {
                "loss": value,
                "grad_global_norm": telemetry.global_norm(grads),
                "grad_norm": _frobenius_per_leaf(grads),
                "param_norm": _frobenius_per_leaf(state.params),
            }
            curv, vectors = curvature_metrics(hp, state, batch, opt_state)
            params = optax.apply_updates(state.params, updates)
            return SweepState(params, state.fixed, opt_state, state.step + 1, state.data_key, vectors), metrics | curv

        return engine.Trial(init_fn, step_fn, {"grad_norm": ("param",), "param_norm": ("param",)})

    return trial


def sweep(
    model,
    loss: Callable | None,
    data,
    *,
    optimizer: str | OptimizerFactory = "adam",
    lr=(1e-3,),
    seeds=(0,),
    steps: int = 100,
    init: Callable | None = None,
    params=None,
    has_aux: bool = False,
    chunk_steps: int | None = None,
    devices=None,
    optim: Mapping[str, Any] | None = None,
    checkpoint_dir: str | Path | None = None,
    progress: bool = True,
    sharpness_every: int = 0,
) -> xr.Dataset:
    """Train the model at every (lr, seed) point at once: one compiled program for the whole grid.

    The sweep is a config like an experiment's (SweepConfig), planned by config.plan and run by
    engine.run_sweep: vmapped over the points, a scan over chunks of steps, sharded over the
    devices, divergence isolated (a point whose loss or state goes non-finite records that step
    and reports NaN from then on), a checkpoint after each chunk when given a folder.

    Args:
      model, loss, has_aux: as in probe (loss None: mean squared output).
      data: one batch used at every step, or a function batch_at(step, key) -> batch of traced
        step and the seed's data key (index a dataset, draw noise).
      optimizer: a name of gradlab.transforms (sgd, momentum, nesterov, rmsprop, adam, adamw,
        adamw_decoupled, adagrad, lion), built as for `gradlab run` with OptimConfig's defaults
        and `optim`; or an optax factory taking learning_rate (optax.adam, or a lambda).
      lr: learning rates (each > 0); seeds: a list of integer seeds, or a count n for 0..n-1.
      steps: training steps; chunk_steps: steps per compiled chunk (default all of them).
      init: key -> params for each seed (linen: variables; nnx: a Module or an nnx.State of
        Params). Without it a linen model is initialised by model.init(key, x) at each seed; an
        nnx model or `params` starts every seed from the same params (seeds then vary the data key).
        Seed s uses params_key, data_key = jax.random.split(jax.random.PRNGKey(s)).
      devices: the devices the points are sharded over (default all local devices).
      optim: other optimizer settings of a named optimizer, OptimConfig's keys ({"b1": 0.95,
        "schedule": "cosine", "clip": "global_norm"}); a list is one more sweep axis and dim
        ({"weight_decay": [0, 1e-4]}).
      checkpoint_dir: a folder to checkpoint into (a subfolder per sweep config, removed when
        the sweep ends); rerun the same sweep of the same model and data to resume there.
      progress: show a progress bar.
      sharpness_every: k > 0 records `sharpness`, lambda_max of the loss Hessian at each measured
        step's params on its batch, at steps 0, k, 2k, ... (NaN on the others), by power iteration
        on Hessian-vector products: COLD_ITERATIONS HVPs at step 0, WARM_ITERATIONS warm-started
        ones after (each HVP ~ 2 gradients; twice that where it lands on a negative eigenvalue).
        A named Adam-family optimizer also gets `sharpness_preconditioned`, lambda_max(P^-1 H) with
        P = diag(sqrt(v_hat) + eps) (Cohen et al. 2022), at the same cost again. 0: no measurement.

    Returns:
      The Dataset `gradlab run` makes, with dims (lr, [optim axes,] seed, step[, param]): loss
      (before each step's update), grad_global_norm, grad_norm and param_norm per parameter leaf
      (coordinate param: leaf labels); first_bad_step (-1: never), first_bad_layer (the first
      leaf along param with a non-finite norm at that step; -1: none) and diverged per point;
      provenance, the sweep's config, model_kind, optimizer and loss in its attrs. With
      sharpness_every: sharpness (and sharpness_preconditioned) with dims (lr, [optim axes,] seed, step).
    """
    lrs, seed_values = adapters.learning_rates(lr), adapters.seed_list(seeds)
    steps = adapters.positive_int("steps", steps)
    every = adapters.non_negative_int("sharpness_every", sharpness_every, "off")
    chunk = steps if chunk_steps is None else min(adapters.positive_int("chunk_steps", chunk_steps), steps)
    factory = adapters.optimizer_factory(optimizer)
    name = optimizer if isinstance(optimizer, str) else FACTORY
    spec = _spec(name, lrs, seed_values, steps, chunk, optim, every)
    adapter = adapters.adapt(model, has_aux)
    loss_fn = adapters.loss_of(loss)
    batch_at = data if callable(data) else (lambda step, key: data)
    if not callable(data):
        adapters.inputs(data)
    start = _starts(adapter, batch_at, init, params)
    shapes = jax.eval_shape(lambda key: start(*jax.random.split(key))[0], jax.random.PRNGKey(0))

    folder = None if checkpoint_dir is None else results.ensure_dir(Path(checkpoint_dir) / f"sweep-{spec.hash}")
    trial = _trial_fn(adapter, loss_fn, batch_at, start, factory)
    devices = list(devices) if devices is not None else jax.local_devices()
    swept = engine.run_sweep(
        trial, config.plan(spec), checkpoint_dir=folder, progress=progress, devices=devices, tag=spec.hash
    )
    if folder is not None and jax.process_index() == 0:
        shutil.rmtree(folder, ignore_errors=True)
    attrs = {
        "model_kind": adapter.kind,
        "optimizer": optimizer if factory is None else adapters.name_of(optimizer),
        "loss": _loss_name(loss),
    }
    ds = results.build_dataset(swept, spec.to_dict(), spec.hash, attrs)
    return ds.assign_coords(param=adapters.leaf_labels(shapes))
