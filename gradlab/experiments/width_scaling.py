"""A6: coordinate check of the standard parametrization against width (Yang & Hu 2021).

DRAFT: theory and measurements are filled in below once measured.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import data, models, plotting, results, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check
from gradlab.norms import at_least_f32

NAME = "width_scaling"
CLAIM = "under SP with a fixed lr the output's change after one step grows like width; activations at init do not"
AXES = ["optim.name", "model.width", "seed"]


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the fixed probe batch the activations are measured on."""

    probe_examples: int = param(64, low=1, doc="fixed inputs x ~ N(0, I) on which every layer's output is measured")


class State(NamedTuple):
    train: trials.TrainState
    probe_x: jax.Array  # (probe, in_dim)
    start: dict  # the parameters at init
    start_outputs: tuple  # layer_outputs(start, probe_x)


def layer_outputs(params: dict, x, spec: models.MLPSpec, hyper: models.MLPHyper):
    """Every layer's output on x, as models.apply computes them for a net without norms.

    Returns:
      (input (B, W), hidden (depth, B, W), readout (B, out)); a hidden block at index >= the active
      depth repeats its input, as in models.apply.
    """
    dtype = jnp.dtype(spec.dtype)
    act = models.activation_fn(spec.activation, hyper.leaky_slope)
    p = jax.tree.map(lambda a: a.astype(dtype), params)
    residual = jnp.asarray(hyper.residual).astype(dtype)
    h = act(x.astype(dtype) @ p["input"]["w"] + p["input"]["b"][None])
    first = h

    def block(h, layer):
        index, lp = layer
        new = residual * h + act(h @ lp["w"] + lp["b"][None])
        new = jnp.where(index < hyper.depth, new, h)
        return new, new

    h, hidden = jax.lax.scan(block, h, (jnp.arange(spec.depth), p["hidden"]))
    out = h @ p["output"]["w"] + p["output"]["b"][None]
    return first, hidden, out


def _rms(a, axes=None):
    return jnp.sqrt(jnp.mean(jnp.square(at_least_f32(a)), axis=axes))


def per_layer_rms(outputs) -> jax.Array:
    """(layers,) RMS over examples and units of each layer's output."""
    first, hidden, out = outputs
    return jnp.concatenate([_rms(first)[None], _rms(hidden, (1, 2)), _rms(out)[None]])


def probe_inputs(cfg) -> jax.Array:
    """The probe batch: fresh inputs of the task's distribution, fixed by data.seed."""
    key = jax.random.fold_in(jax.random.PRNGKey(cfg.data.seed), 1)
    return jax.random.normal(key, (cfg.probe_examples, cfg.data.input_dim))


def trial(cfg) -> Trial:
    """supervised_mlp; every step records, at the parameters theta_t before its update (step 0 is
    the init), on the probe batch:

    act_rms (layer)            RMS of h_l(theta_t)
    act_change_rms (layer)     RMS of h_l(theta_t) - h_l(theta_0)
    readout_change_rms         RMS of h_L(theta_0) (W_out,t - W_out,0) + (b_out,t - b_out,0): the
                               readout's own share of the output's change
    weight_change_rms (layer)  per-entry RMS of W_l,t - W_l,0
    update_rms (layer)         per-entry RMS of this step's update W_l,t+1 - W_l,t
    and the training loss.
    """
    if cfg.model.norm != "none":
        raise ConfigError(f"model.norm: width_scaling measures a plain MLP; allowed: none (got {cfg.model.norm!r})")
    base = trials.supervised_mlp(cfg)
    spec = trials.mlp_spec(cfg)

    def init(hp, key):
        train = base.init(hp, key)
        x = probe_inputs(cfg)
        return State(train, x, train.params, layer_outputs(train.params, x, spec, models.MLPHyper.from_hp(hp)))

    def step(hp, state):
        hyper = models.MLPHyper.from_hp(hp)
        mask = models.layer_mask(spec, hyper)
        params = state.train.params
        now = layer_outputs(params, state.probe_x, spec, hyper)
        change = jax.tree.map(jnp.subtract, now, state.start_outputs)
        readout = state.start_outputs[1][-1] @ (params["output"]["w"] - state.start["output"]["w"])
        readout = readout + (params["output"]["b"] - state.start["output"]["b"])[None]
        train, metrics = base.step(hp, state.train)
        moved = jax.tree.map(jnp.subtract, params, state.start)
        update = jax.tree.map(jnp.subtract, train.params, params)
        masked = lambda v: jnp.where(mask, v, jnp.nan)  # noqa: E731
        return State(train, state.probe_x, state.start, state.start_outputs), {
            "loss": metrics["loss"],
            "act_rms": masked(per_layer_rms(now)),
            "act_change_rms": masked(per_layer_rms(change)),
            "readout_change_rms": _rms(readout),
            "weight_change_rms": masked(models.per_layer(moved, _rms)),
            "update_rms": masked(models.per_layer(update, _rms)),
        }

    return Trial(init, step)


# ----------------------------------------------------------------------------- reading


def fit_slope(widths, values) -> tuple[float, float]:
    """Least-squares slope of mean-over-seeds ln(values) against ln(width), and its standard error
    from the spread of the per-seed slopes. values: (seeds, widths)."""
    x = np.log(np.asarray(widths, float))
    y = np.log(np.asarray(values, float))
    per_seed = np.polyfit(x, y.T, 1)[0]
    slope = float(np.polyfit(x, y.mean(axis=0), 1)[0])
    err = float(np.std(per_seed, ddof=1) / np.sqrt(len(per_seed))) if len(per_seed) > 1 else float("nan")
    return slope, err


def series(ds, var: str, opt: str, layer: int | None, step: int) -> np.ndarray:
    """(seeds, widths) of a metric at one step (and layer)."""
    sel = {"optim.name": opt}
    a = ds[var].sel(sel).isel(step=step)
    if layer is not None:
        a = a.isel(layer=layer)
    return a.transpose("seed", "model.width").values.astype(float)


def checks(ds) -> list[Check]:
    return []


def figures(ds) -> dict:
    return {}
