"""Measure and sweep your own model: a flax linen Module, an nnx Module, or a pure apply(params, x).

    probe(model, params, batch)                 per-parameter gradient statistics and
                                                per-activation RMS/std at these params
    sweep(model, loss, data, lr=[...], seeds=[...], steps=...)
                                                train every (lr, seed) point in one compiled
                                                program (gradlab.engine), divergence marked

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

import inspect
import time
from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import xarray as xr
from flax import linen as nn
from flax import nnx

from gradlab import engine, telemetry
from gradlab.errors import ConfigError

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optax.sgd,
    "momentum": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9),
    "nesterov": lambda learning_rate: optax.sgd(learning_rate, momentum=0.9, nesterov=True),
    "adam": optax.adam,
    "adamw": optax.adamw,
    "rmsprop": optax.rmsprop,
    "adagrad": optax.adagrad,
    "lion": optax.lion,
}


def mean_squared_output(out, batch) -> jax.Array:
    """The default loss: the mean of out ** 2 over every element of the output (all its leaves)."""
    del batch
    leaves = [telemetry.at_least_f32(jnp.asarray(o)) for o in jax.tree.leaves(out)]
    total = sum(jnp.sum(jnp.square(o)) for o in leaves)
    return total / sum(o.size for o in leaves)


# ---------------------------------------------------------------------------------------------
# Model adapters: one shape for all three kinds of model.


class _Model(NamedTuple):
    kind: str  # "linen" | "nnx" | "function"
    split: Callable[[Any], tuple[Any, Any]]  # user params (or None) -> (trainable, fixed)
    forward: Callable[[Any, Any, Any, bool], tuple[Any, dict]]  # (params, fixed, x, capture) -> (out, acts)
    default_init: Callable[[jax.Array, Any], tuple[Any, Any]] | None  # (key, x) -> (trainable, fixed)


def _part(key) -> str | None:
    """One pytree path entry as a label part; None for the wrappers a label leaves out."""
    if isinstance(key, jax.tree_util.DictKey):
        name = str(key.key)
    elif isinstance(key, jax.tree_util.GetAttrKey):
        name = key.name
    elif isinstance(key, jax.tree_util.SequenceKey):
        name = str(key.idx)
    else:
        name = str(getattr(key, "key", key))
    return None if name in ("value", "__call__") else name


def leaf_labels(tree) -> list[str]:
    """'Dense_0/kernel'-style labels of a pytree's leaves, in jax.tree.leaves order."""
    labels = []
    for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]:
        parts = [p for p in map(_part, path) if p is not None]
        labels.append("/".join(parts) or "params")
    return labels


def _activation_dict(tree) -> dict[str, jax.Array]:
    """Captured values (nested dicts of tuples, one entry per call) -> {label: array}.

    A tuple index is kept only where a name holds more than one value (a module called twice).
    """
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    named = []
    for path, leaf in flat:
        index = None
        if path and isinstance(path[-1], jax.tree_util.SequenceKey):
            index, path = path[-1].idx, path[:-1]
        parts = [p for p in map(_part, path) if p is not None]
        named.append(("/".join(parts) or "output", index, leaf))
    counts: dict[str, int] = {}
    for name, _, _ in named:
        counts[name] = counts.get(name, 0) + 1
    return {
        (name if counts[name] == 1 or index is None else f"{name}[{index}]"): leaf
        for name, index, leaf in named
        if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)
    }


def _linen(model: nn.Module) -> _Model:
    def split(variables):
        if variables is None:
            raise ConfigError("params: a linen model needs its variables, e.g. params=model.init(key, x)")
        if not isinstance(variables, Mapping):
            raise ConfigError(f"params: expected the dict of model.init(key, x), got {type(variables).__name__}")
        if "params" not in variables:
            return variables, {}
        return variables["params"], {k: v for k, v in variables.items() if k != "params"}

    def forward(params, fixed, x, capture):
        variables = {"params": params, **fixed}
        if not capture:
            return model.apply(variables, x), {}
        out, state = model.apply(variables, x, capture_intermediates=True, mutable=["intermediates"])
        return out, _activation_dict(state["intermediates"])

    def default_init(key, x):
        return split(model.init(key, x))

    return _Model("linen", split, forward, default_init)


def _nnx(model: nnx.Module) -> _Model:
    graphdef, own_params, rest = nnx.split(model, nnx.Param, ...)

    def split(params):
        if params is None:
            return own_params, None
        if isinstance(params, nnx.Module):
            return nnx.state(params, nnx.Param), None
        return params, None

    def forward(params, fixed, x, capture):
        del fixed  # the module's non-Param state is held at its own values
        module = nnx.merge(graphdef, params, rest)
        if not capture:  # still under capture: flax deprecates sow() outside it; XLA drops the values
            return nnx.capture(module, nnx.Intermediate)(x)[0], {}
        out, captured = nnx.capture(module, nnx.Intermediate, method_outputs=nnx.Intermediate)(x)
        return out, _activation_dict(captured)

    return _Model("nnx", split, forward, None)


def _function(apply: Callable, has_aux: bool) -> _Model:
    def split(params):
        if params is None:
            raise ConfigError("params: a plain apply function needs its params (or, for sweep, init=key -> params)")
        return params, None

    def forward(params, fixed, x, capture):
        del fixed
        result = apply(params, x)
        out, aux = result if has_aux else (result, {})
        if not capture:
            return out, {}
        if not isinstance(aux, Mapping):
            raise ConfigError(f"has_aux=True: apply must return (out, {{name: activation}}), got {type(aux).__name__}")
        return out, {**_activation_dict(dict(aux)), "output": out}

    return _Model("function", split, forward, None)


def _adapt(model, has_aux: bool = False) -> _Model:
    if isinstance(model, type) and issubclass(model, (nn.Module, nnx.Module)):
        raise ConfigError(f"model: got the class {model.__name__}; pass an instance, e.g. {model.__name__}(...)")
    if isinstance(model, nn.Module):
        return _linen(model)
    if isinstance(model, nnx.Module):
        return _nnx(model)
    if callable(model):
        return _function(model, has_aux)
    raise ConfigError(
        f"model: expected a flax linen Module, an nnx Module or a function apply(params, x), got {type(model).__name__}"
    )


def _inputs(batch):
    """The model input of a batch: the array itself, batch[0], or batch['x'] / batch['inputs']."""
    if isinstance(batch, (jax.Array, np.ndarray)):
        return batch
    if isinstance(batch, (tuple, list)) and batch:
        return batch[0]
    if isinstance(batch, Mapping):
        for key in ("x", "inputs"):
            if key in batch:
                return batch[key]
        raise ConfigError(f"batch: a dict batch needs the input under 'x' or 'inputs', got keys {sorted(batch)}")
    raise ConfigError(f"batch: expected an array, a tuple (x, y, ...) or a dict with 'x', got {type(batch).__name__}")


def _loss_of(loss) -> Callable:
    if loss is None:
        return mean_squared_output
    if not callable(loss):
        raise ConfigError(f"loss: expected a function loss(out, batch) -> scalar, got {type(loss).__name__}")

    def checked(out, batch):
        value = loss(out, batch)
        if jnp.shape(value) != ():
            raise ConfigError(f"loss: must return a scalar, got shape {jnp.shape(value)}")
        return telemetry.at_least_f32(jnp.asarray(value))

    return checked


def _name(fn) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


# ---------------------------------------------------------------------------------------------
# probe


def _frobenius_per_leaf(tree) -> jax.Array:
    return jnp.stack([telemetry.frobenius(leaf) for leaf in jax.tree.leaves(tree)])


def probe(model, params, batch, loss: Callable | None = None, *, has_aux: bool = False) -> xr.Dataset:
    """Per-parameter gradient statistics and per-activation statistics at `params` on one batch.

    Args:
      model: a flax linen Module, an nnx Module, or a function apply(params, x) (see the module doc).
      params: linen: the variables of model.init; nnx: an nnx.State of Params, or None for the
        module's own; function: its params pytree.
      batch: x, (x, y, ...) or {"x": ...}; `loss` gets all of it.
      loss: loss(out, batch) -> scalar; default mean_squared_output (mean of out ** 2).
      has_aux: for a plain function, apply returns (out, {name: activation}).

    Returns:
      A Dataset with dim `param` (leaf labels such as "Dense_0/kernel"): grad_norm, param_norm,
      grad_param_ratio (grad_norm / param_norm, 0 where the param is 0), grad_nonfinite
      (fraction of non-finite gradient entries), param_size; dim `activation` (labels such as
      "Conv_0", "output"): act_rms = sqrt(mean(a^2)) and act_std (population std) over all of an
      activation's entries, act_nonfinite; and scalars loss and grad_global_norm.
    """
    adapter = _adapt(model, has_aux)
    loss_fn = _loss_of(loss)
    trainable, fixed = adapter.split(params)
    _inputs(batch)  # a malformed batch fails here with a ConfigError, not inside the trace

    def measure(trainable, fixed, batch):
        def objective(p):
            out, acts = adapter.forward(p, fixed, _inputs(batch), True)
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
    per_act = {name: ("activation", np.asarray([stats[name][a] for a in activations], np.float32))
               for name in ("act_rms", "act_std", "act_nonfinite")}
    per_param = {name: ("param", np.asarray(stats[name]))
                 for name in ("grad_norm", "param_norm", "grad_param_ratio", "grad_nonfinite")}
    sizes = [int(np.size(leaf)) for leaf in jax.tree.leaves(trainable)]
    return xr.Dataset(
        {
            **per_param,
            "param_size": ("param", np.asarray(sizes, np.int64)),
            **per_act,
            "loss": ((), np.asarray(stats["loss"])),
            "grad_global_norm": ((), np.asarray(stats["grad_global_norm"])),
        },
        coords={"param": leaf_labels(trainable), "activation": activations},
        attrs={"model_kind": adapter.kind, "loss": _name(loss) if loss is not None else "mean_squared_output"},
    )


# ---------------------------------------------------------------------------------------------
# sweep


class SweepState(NamedTuple):
    params: Any
    fixed: Any
    opt_state: optax.OptState
    step: jax.Array
    data_key: jax.Array


def _optimizer_factory(optimizer) -> Callable[..., optax.GradientTransformation]:
    allowed = ", ".join(OPTIMIZERS)
    if isinstance(optimizer, str):
        if optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer: unknown {optimizer!r}; allowed: {allowed}, or an optax factory such as optax.adam")
        return OPTIMIZERS[optimizer]
    if isinstance(optimizer, optax.GradientTransformation):
        raise ConfigError(
            "optimizer: got a built optax transformation; pass its factory so the learning rate can be swept, "
            "e.g. optimizer=optax.adam or optimizer=lambda learning_rate: optax.adam(learning_rate, b1=0.95)"
        )
    if not callable(optimizer):
        raise ConfigError(f"optimizer: expected one of {allowed} or an optax factory, got {type(optimizer).__name__}")
    try:
        names = inspect.signature(optimizer).parameters
    except (TypeError, ValueError):
        names = {"learning_rate": None}
    if "learning_rate" not in names:
        raise ConfigError(
            f"optimizer: the factory {_name(optimizer)} takes no learning_rate argument; "
            "pass e.g. lambda learning_rate: optax.sgd(learning_rate, momentum=0.9)"
        )
    return optimizer


def _lrs(lr) -> np.ndarray:
    try:
        values = None if isinstance(lr, str) else np.atleast_1d(np.asarray(lr, dtype=np.float64))
    except (TypeError, ValueError):
        values = None
    if values is None or values.ndim != 1:
        raise ConfigError(f"lr: expected a number or a list of numbers, got {lr!r}")
    if values.size == 0:
        raise ConfigError("lr: give at least one learning rate, e.g. lr=[1e-3, 1e-2]")
    bad = values[~(np.isfinite(values) & (values > 0))]
    if bad.size:
        raise ConfigError(f"lr: every learning rate must be a finite number > 0, got {bad[0]:g}")
    return values.astype(np.float32)


def _seeds(seeds) -> np.ndarray:
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ConfigError(f"seeds: an integer means that many seeds (0, 1, ...) and must be >= 1, got {seeds}")
        return np.arange(seeds, dtype=np.int32)
    values = np.asarray(list(seeds) if isinstance(seeds, Sequence) else seeds)
    if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer) or np.any(values < 0):
        raise ConfigError(f"seeds: expected a non-empty list of integers >= 0 (or a count), got {seeds!r}")
    return values.astype(np.int32)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}")
    return int(value)


def _build(model, loss, data, optimizer, init, params, has_aux):
    """(Trial, param labels, model kind) for one training run per (lr, seed) point."""
    adapter = _adapt(model, has_aux)
    loss_fn = _loss_of(loss)
    factory = _optimizer_factory(optimizer)
    if init is not None and not callable(init):
        raise ConfigError(f"init: expected a function key -> params, got {type(init).__name__}")
    batch_at = data if callable(data) else (lambda step, key: data)
    if not callable(data):
        _inputs(data)

    if init is not None:
        def start(key, data_key):
            del data_key
            return adapter.split(init(key))
    elif params is not None or adapter.default_init is None:
        trainable, fixed = adapter.split(params)  # a function without params fails here

        def start(key, data_key):
            del key, data_key  # every seed starts from the same params; seeds vary the data only
            return trainable, fixed
    else:
        def start(key, data_key):
            return adapter.default_init(key, _inputs(batch_at(jnp.int32(0), data_key)))

    def optimizer_of(hp):
        return optax.inject_hyperparams(factory)(learning_rate=hp["lr"])

    def init_fn(hp, key):
        params_key, data_key = jax.random.split(key)
        trainable, fixed = start(params_key, data_key)
        return SweepState(trainable, fixed, optimizer_of(hp).init(trainable), jnp.int32(0), data_key)

    def step_fn(hp, state):
        batch = batch_at(state.step, state.data_key)

        def objective(p):
            out, _ = adapter.forward(p, state.fixed, _inputs(batch), False)
            return loss_fn(out, batch)

        value, grads = jax.value_and_grad(objective)(state.params)
        updates, opt_state = optimizer_of(hp).update(grads, state.opt_state, state.params)
        metrics = {
            "loss": value,
            "grad_global_norm": telemetry.global_norm(grads),
            "grad_norm": _frobenius_per_leaf(grads),
            "param_norm": _frobenius_per_leaf(state.params),
        }
        new = SweepState(optax.apply_updates(state.params, updates), state.fixed, opt_state, state.step + 1, state.data_key)
        return new, metrics

    shapes = jax.eval_shape(lambda key: start(*jax.random.split(key))[0], jax.random.PRNGKey(0))
    the_trial = engine.Trial(init_fn, step_fn, {"grad_norm": ("param",), "param_norm": ("param",)})
    return the_trial, leaf_labels(shapes), adapter.kind


def sweep(
    model,
    loss: Callable | None,
    data,
    *,
    optimizer: str | Callable = "adam",
    lr=(1e-3,),
    seeds=(0,),
    steps: int = 100,
    init: Callable | None = None,
    params=None,
    has_aux: bool = False,
    chunk_steps: int | None = None,
    devices=None,
) -> xr.Dataset:
    """Train the model at every (lr, seed) point at once: one compiled program for the whole grid.

    Each point trains with optax.inject_hyperparams(optimizer)(learning_rate=lr) (lr is a traced
    value), full steps of `loss` on `data`, through gradlab.engine: vmapped over the points, a
    scan over chunks of steps, and divergence isolated (a point whose loss or state goes
    non-finite records that step and reports NaN from then on).

    Args:
      model, loss, has_aux: as in probe (loss None: mean squared output).
      data: one batch used at every step, or a function batch_at(step, key) -> batch of traced
        step and the seed's data key (index a dataset, draw noise).
      optimizer: a name (sgd, momentum, nesterov, adam, adamw, rmsprop, adagrad, lion) or an
        optax factory taking learning_rate (optax.adam, or a lambda for other settings).
      lr: learning rates (each > 0); seeds: a list of integer seeds, or a count n for 0..n-1.
      steps: training steps; chunk_steps: steps per compiled chunk (default all of them).
      init: key -> params for each seed (linen: variables; nnx: a Module or an nnx.State of
        Params). Without it a linen model is initialised by model.init(key, x) at each seed; an
        nnx model or `params` starts every seed from the same params (seeds then vary the data key).
        Seed s uses params_key, data_key = jax.random.split(jax.random.PRNGKey(s)).
      devices: the devices the points are sharded over (default all local devices).

    Returns:
      A Dataset with dims (lr, seed, step[, param]): loss (before each step's update),
      grad_global_norm, grad_norm and param_norm per parameter leaf; first_bad_step (-1: never)
      and diverged per (lr, seed); compile and run seconds in its attrs.
    """
    lrs, seed_values = _lrs(lr), _seeds(seeds)
    steps = _positive_int("steps", steps)
    chunk = steps if chunk_steps is None else min(_positive_int("chunk_steps", chunk_steps), steps)
    the_trial, labels, kind = _build(model, loss, data, optimizer, init, params, has_aux)
    devices = list(devices) if devices is not None else jax.local_devices()
    hp_host = {
        "lr": np.repeat(lrs, len(seed_values)),
        "seed": np.tile(seed_values, len(lrs)),
    }
    start = time.perf_counter()
    metrics, bad, compile_seconds = engine.run_group(the_trial, hp_host, steps, chunk, devices)
    seconds = time.perf_counter() - start
    grid = (len(lrs), len(seed_values))
    data_vars = {}
    for name, values in metrics.items():
        dims = ("lr", "seed", "step") + the_trial.metric_dims.get(name, ())
        data_vars[name] = (dims, values.reshape(grid + values.shape[1:]))
    bad = np.asarray(bad).reshape(grid)
    data_vars["first_bad_step"] = (("lr", "seed"), bad)
    data_vars["diverged"] = (("lr", "seed"), bad >= 0)
    device = devices[0]
    return xr.Dataset(
        data_vars,
        coords={"lr": lrs, "seed": seed_values, "step": np.arange(steps), "param": labels},
        attrs={
            "model_kind": kind,
            "optimizer": optimizer if isinstance(optimizer, str) else _name(optimizer),
            "loss": _name(loss) if loss is not None else "mean_squared_output",
            "compile_seconds": compile_seconds,
            "run_seconds": seconds - compile_seconds,
            "device_kind": getattr(device, "device_kind", device.platform),
        },
    )
