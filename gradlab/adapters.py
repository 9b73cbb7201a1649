"""Model adapters: a flax linen Module, an nnx Module or a plain apply(params, x), as one shape.

An adapter splits the user's params into the trainable part and the part held fixed, and runs
the model forward, capturing its activations when asked (see gradlab.usermodels for what counts
as a parameter and as an activation). Also the batch and loss conventions both probe and sweep use,
and sweep's optimizer, learning-rate and seed arguments.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import nnx

from gradlab import telemetry, transforms
from gradlab.config import MAX_AXIS_LENGTH, MAX_SEEDS
from gradlab.errors import ConfigError


def mean_squared_output(out, batch) -> jax.Array:
    """The default loss: the mean of out ** 2 over every element of the output (all its leaves)."""
    del batch
    leaves = [telemetry.at_least_f32(jnp.asarray(o)) for o in jax.tree.leaves(out)]
    total = sum((jnp.sum(jnp.square(o)) for o in leaves), jnp.float32(0))  # starts from an array, not the int 0
    return total / sum(o.size for o in leaves)


class Model(NamedTuple):
    """One kind of model behind one interface."""

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


def activation_dict(tree) -> dict[str, jax.Array]:
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


def _linen(model: nn.Module) -> Model:
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
        return out, activation_dict(state["intermediates"])

    def default_init(key, x):
        return split(model.init(key, x))

    return Model("linen", split, forward, default_init)


def _nnx(model: nnx.Module) -> Model:
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
        return out, activation_dict(captured)

    return Model("nnx", split, forward, None)


def _function(apply: Callable, has_aux: bool) -> Model:
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
        return out, {**activation_dict(dict(aux)), "output": out}

    return Model("function", split, forward, None)


def adapt(model, has_aux: bool = False) -> Model:
    """The adapter of a linen Module, an nnx Module or an apply function (ConfigError otherwise)."""
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


def inputs(batch):
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


def loss_of(loss: Callable | None) -> Callable:
    """loss(out, batch), checked to be a scalar and returned in float32; None: mean_squared_output."""
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


def name_of(fn) -> str:
    """A function's name for a Dataset's attrs (its type's name for a callable object)."""
    return getattr(fn, "__name__", type(fn).__name__)


OptimizerFactory = Callable[..., optax.GradientTransformation]  # e.g. optax.adam: learning_rate -> optimizer


def optimizer_factory(optimizer: str | OptimizerFactory) -> OptimizerFactory | None:
    """sweep's `optimizer`: None for a name of gradlab.transforms' optimizers; the factory itself,
    checked, otherwise."""
    allowed = ", ".join(transforms.OPTIMIZERS)
    if isinstance(optimizer, str):
        if optimizer not in transforms.OPTIMIZERS:
            raise ConfigError(
                f"optimizer: unknown {optimizer!r}; allowed: {allowed}, or an optax factory such as optax.adam"
            )
        return None
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
            f"optimizer: the factory {name_of(optimizer)} takes no learning_rate argument; "
            "pass e.g. lambda learning_rate: optax.sgd(learning_rate, momentum=0.9)"
        )
    return optimizer


def learning_rates(lr) -> np.ndarray:
    """sweep's `lr`: one or more finite learning rates > 0, as a float64 array."""
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
    return values


def seed_list(seeds) -> np.ndarray:
    """sweep's `seeds`: a count n (0..n-1) or a non-empty list of integer seeds in the PRNG's range."""
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if not 1 <= seeds <= MAX_AXIS_LENGTH:
            raise ConfigError(
                f"seeds: an integer means that many seeds (0, 1, ...) and must be in 1..{MAX_AXIS_LENGTH}, got {seeds}"
            )
        return np.arange(seeds)
    values = np.asarray(list(seeds) if isinstance(seeds, Sequence) else seeds)
    if values.ndim != 1 or values.size == 0 or not np.issubdtype(values.dtype, np.integer) or np.any(values < 0):
        raise ConfigError(f"seeds: expected a non-empty list of integers >= 0 (or a count), got {seeds!r}")
    if np.any(values > MAX_SEEDS):
        raise ConfigError(f"seeds: each seed must be below 2**31 (the PRNG's seed range), got {values.max()}")
    return values


def positive_int(name: str, value) -> int:
    """An integer >= 1 (not a bool), else a ConfigError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ConfigError(f"{name}: expected an integer >= 1, got {value!r}")
    return int(value)


def non_negative_int(name: str, value, meaning: str) -> int:
    """An integer >= 0 (not a bool), else a ConfigError naming the argument and what 0 means."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ConfigError(f"{name}: expected an integer >= 0 (0: {meaning}), got {value!r}")
    return int(value)
