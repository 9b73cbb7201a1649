"""C5: dead ReLU units against learning rate; Leaky ReLU and GELU.

A unit is "dead" on a data set when its pre-activation is <= 0 on every example: a ReLU then outputs 0
and passes back no gradient, so nothing revives it. The stock telemetry's dead_frac uses the batch;
here each step also measures, on the whole training set (before the step's update, like the loss):
  dead_full    fraction of units with pre-activation <= 0 on all n examples (the same criterion for
               every activation, though Leaky ReLU and GELU still pass gradient there)
  nograd_frac  fraction of units whose full-data gradient (incoming weights and bias) has norm at most
               grad_threshold times the layer's largest: the fair comparison across activations.
Per layer over the layers with an activation (input projection and hidden blocks; the readout is NaN).

At init (He normal, zero biases) a first-layer unit is dead only if n independent symmetric
pre-activations are all <= 0: probability 2^-n. Deeper, the examples' pre-activations are correlated;
with correlation rho (the ReLU arc-cosine map of the layer below's, Cho & Saul 2009, from rho = 0 at
the input) a unit is dead with probability int phi(z) Phi(-z sqrt(rho / (1 - rho)))^n dz, tiny for
n = 256. Large steps (Adam moves every weight by about lr) knock units past that margin (a big
negative bias step) and ReLU's dead units stay dead; Leaky ReLU's slope keeps every unit's gradient
nonzero.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import erf
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import data, models, results, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.experiments import Check

NAME = "dead_relu"
CLAIM = "large learning rates kill ReLU units (pre-activation <= 0 on every example); Leaky ReLU keeps every gradient"
AXES = ["model.activation", "optim.lr", "seed"]
GROWN = 0.1  # "well above": a large rate kills at least 10% of the units more than the smallest rate
INIT_QUANTILE = 1e-3  # the init check fails only if the dead count is this unlikely under the bound


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the no-gradient threshold."""

    grad_threshold: float = param(
        1e-7,
        low=0.0,
        low_open=True,
        high=1.0,
        doc="a unit has no gradient when its norm is <= this x its layer's largest",
    )


def unit_grad_norms(grads: dict) -> jax.Array:
    """Per unit of each activation layer, the norm of the gradient of its incoming weights and bias:
    shape (depth + 1, width), row 0 the input projection."""
    first = jnp.sqrt(jnp.sum(jnp.square(grads["input"]["w"]), axis=0) + jnp.square(grads["input"]["b"]))
    hidden = jnp.sqrt(jnp.sum(jnp.square(grads["hidden"]["w"]), axis=1) + jnp.square(grads["hidden"]["b"]))
    return jnp.concatenate([first[None], hidden])


def no_gradient_fraction(norms, threshold) -> jax.Array:
    """(layers,): fraction of units whose gradient norm is <= threshold x the largest in their layer;
    NaN for a layer with a non-finite norm (a run overflowing on its way to divergence)."""
    top = jnp.max(norms, axis=-1, keepdims=True)
    frac = jnp.mean((norms <= threshold * top).astype(jnp.float32), axis=-1)
    return jnp.where(jnp.all(jnp.isfinite(norms), axis=-1), frac, jnp.nan)


def trial(cfg) -> Trial:
    """supervised_mlp on minibatches, recording also dead_full and nograd_frac on the whole training set.

    The step's own gradient is of its minibatch; these need the gradient of the whole training set
    at the same parameters, a different quantity, so the hook computes it."""
    spec = trials.mlp_spec(cfg)

    def whole_set(view: trials.StepView) -> dict:
        train = view.state.data

        def loss(params):
            out, taps = models.apply(params, train.x, spec, view.hyper)
            return data.loss(cfg.data, out, train.y), taps

        grads, taps = jax.grad(loss, has_aux=True)(view.state.params)
        mask = models.layer_mask(spec, view.hyper)[:-1]
        nan = jnp.full((1,), jnp.nan)
        nograd = no_gradient_fraction(unit_grad_norms(grads), view.hp["grad_threshold"])
        return {
            "dead_full": jnp.concatenate([jnp.where(mask, taps["dead_frac"][:-1], jnp.nan), nan]),
            "nograd_frac": jnp.concatenate([jnp.where(mask, nograd, jnp.nan), nan]),
        }

    return trials.supervised_mlp(cfg, metrics=whole_set)


# ----------------------------------------------------------------------------- theory


def relu_correlation(rho):
    """Correlation of ReLU(u), ReLU(v) for standard Gaussians of correlation rho, rescaled so that
    the next layer's pre-activations (He init) have this correlation (Cho & Saul 2009, arc-cosine n=1)."""
    rho = np.clip(rho, -1.0, 1.0)
    return (np.sqrt(1 - rho**2) + (np.pi - np.arccos(rho)) * rho) / np.pi


def dead_probability(n: int, rho: float) -> float:
    """P(all n pre-activations <= 0) when they are standard Gaussians with pairwise correlation rho:
    int phi(z) Phi(-z sqrt(rho / (1 - rho)))^n dz (2^-n at rho = 0)."""
    if rho <= 0:
        return 2.0**-n
    z = np.linspace(-12, 12, 24001)
    phi = np.exp(-(z**2) / 2) / np.sqrt(2 * np.pi)
    cdf = 0.5 * (1 + np.vectorize(erf)(-z * np.sqrt(rho / (1 - rho)) / np.sqrt(2)))
    return float(np.trapezoid(phi * cdf**n, z))


def init_dead_probabilities(n: int, layers: int) -> np.ndarray:
    """Per activation layer (input projection first), the probability a unit is dead at init."""
    rho, out = 0.0, []
    for _ in range(layers):
        out.append(dead_probability(n, rho))
        rho = relu_correlation(rho)
    return np.asarray(out)


def poisson_upper(mean: float, tail: float) -> int:
    """The smallest k with P(Poisson(mean) > k) < tail."""
    k, term, cdf = 0, np.exp(-mean), np.exp(-mean)
    while 1 - cdf >= tail:
        k += 1
        term *= mean / k
        cdf += term
    return k


# ----------------------------------------------------------------------------- measured


def per_unit_mean(ds, var: str, act: str) -> np.ndarray:
    """(lr, seed, step): the fraction over all activation layers' units."""
    values = ds[var].sel({"model.activation": act}).transpose("optim.lr", "seed", "step", "layer").values
    with np.errstate(all="ignore"):
        return np.nanmean(values.astype(float), axis=-1)


class Measured(NamedTuple):
    activations: list[str]
    lrs: np.ndarray
    dead: dict  # activation -> (lr, seed, step) dead_full over all units
    nograd: dict  # activation -> (lr, seed, step) nograd_frac over all units
    diverged: dict  # activation -> (lr, seed)
    init_dead: tuple | None  # ReLU at init (He, zero biases): (dead units over seeds, allowed, expected mean)
    grown: float | None  # ReLU: end dead fraction (median over seeds), max over lr - at the smallest lr
    grown_at: float | None  # the lr of that max
    smallest: float | None  # the end dead fraction at the smallest lr
    gap: float | None  # ReLU: min over lr, seed, step of nograd_frac - dead_full
    leaky_nograd: float | None  # Leaky ReLU: max over lr, seed, step of nograd_frac
    cfg: dict


def measure(ds) -> Measured:
    cfg = results.run_config(ds)
    acts = [str(a) for a in ds["model.activation"].values]
    lrs = ds["optim.lr"].values.astype(float)
    dead = {a: per_unit_mean(ds, "dead_full", a) for a in acts}
    nograd = {a: per_unit_mean(ds, "nograd_frac", a) for a in acts}
    diverged = {a: ds["diverged"].sel({"model.activation": a}).transpose("optim.lr", "seed").values for a in acts}
    init = grown = grown_at = smallest = gap = leaky = None
    if "relu" in acts and cfg["model"]["init"] == "he_normal" and cfg["model"]["bias_std"] == 0:
        width, layers = cfg["model"]["width"], cfg["model"]["depth"] + 1
        expected = float(np.sum(init_dead_probabilities(cfg["data"]["examples"], layers)) * width * ds.sizes["seed"])
        # At step 0 every lr of a seed holds the same init: count each seed's units once.
        counts = ds["dead_full"].sel({"model.activation": "relu"}).isel({"step": 0, "optim.lr": 0}).values
        init = (int(round(float(np.nansum(counts) * width))), poisson_upper(expected, INIT_QUANTILE), expected)
    if "relu" in acts:
        with np.errstate(all="ignore"):
            mid = np.nanmedian(dead["relu"][..., -1], axis=-1)
            gap = float(np.nanmin(nograd["relu"] - dead["relu"]))
        smallest = float(mid[0])
        alive = np.isfinite(mid).any()
        grown = (float(np.nanmax(mid)) if alive else float("nan")) - smallest
        grown_at = lrs[int(np.nanargmax(mid))] if alive else float("nan")
    if "leaky_relu" in acts:
        leaky = float(np.nanmax(nograd["leaky_relu"]))
    return Measured(acts, lrs, dead, nograd, diverged, init, grown, grown_at, smallest, gap, leaky, cfg)


def checks(m: Measured) -> list[Check]:
    out = []
    if m.init_dead is not None:
        dead, allowed, expected = m.init_dead
        model = m.cfg["model"]
        out.append(
            Check.at_most(
                f"relu at init: dead units (full data, {m.dead['relu'].shape[1]} seeds x "
                f"{model['depth'] + 1} layers x {model['width']})",
                dead,
                allowed,
                f"Poisson {INIT_QUANTILE:g} tail of mean {expected:.2g} (2^-n, correlated layers)",
            )
        )
    if m.grown is not None:
        out.append(
            Check.at_least(
                f"relu: end dead fraction, max over lr (at {m.grown_at:.3g}) - at lr {m.lrs[0]:.3g} ({m.smallest:.3f})",
                m.grown,
                GROWN,
            )
        )
    if m.gap is not None:  # set with m.grown
        # A dead ReLU unit has exactly zero gradient, so it is among the no-gradient ones.
        out.append(Check.at_least("relu: zero-gradient minus dead fraction, min over lr, seed, step", m.gap, 0.0))
    if m.leaky_nograd is not None:
        # Leaky ReLU's slope > 0 passes gradient through every unit.
        out.append(Check.at_most("leaky_relu: zero-gradient fraction, max over lr, seed, step", m.leaky_nograd, 0.0))
    return out


# ----------------------------------------------------------------------------- figure


def figures(ds, m: Measured) -> dict:
    """Dead and gradient-less units against lr, and over training (gradlab/experiments/_dead_relu_figures.py)."""
    from gradlab.experiments import _dead_relu_figures

    return _dead_relu_figures.draw(ds, m)
