"""A6: coordinate check of the standard parametrization and muP against width (Yang & Hu 2021; Yang et al. 2022).

Standard parametrization (SP): every weight W ~ N(0, 1/fan_in), one learning rate eta at every
width n. Every layer's output at init is O(1) coordinate-wise (a sum of n terms of size n^(-1/2)
with random signs), whatever n. The coordinate check (Tensor Programs IV, Yang & Hu 2021; Tensor
Programs V, Yang et al. 2022) trains a few steps at each width and plots, per layer l, the RMS of
h_l(t) - h_l(0) on a fixed batch against n: a parametrization is stable when none grows with n.

Leading exponents after one step (width n, data and depth fixed; chi = dL/df = O(1)), from
dL/dh_L = chi W_out^T (entries n^(-1/2)) and dL/dh_(l-1) = (dL/dh_l * phi') W_l^T (the same):
  SGD    the gradient, hence the update, of W_out has O(1) entries (h_L^T chi), that of a hidden or
         the input W entries n^(-1/2) (h^T dL/dh). A hidden layer's pre-activation moves by
         h_(l-1) dW_l = -eta sum_b (h_(l-1)(x) . h_(l-1)(x_b)) dL/dh_l(x_b): the kernel
         h . h' sums n aligned O(1) terms, so n x n^(-1/2) = n^(1/2). The input layer sums only
         input_dim terms of n^(-1/2): n^(-1/2). The output moves by h_L dW_out (the readout's
         share, ~ n) plus (h_L(t) - h_L(0)) W_out (the features' share, n coordinates of
         n^(1/2) aligned with W_out's n^(-1/2): ~ n): together the NTK step, ~ n.
  Adam   the first step is eta sign(g) per entry (m_hat = g, v_hat = g^2), so every layer's
         update is O(eta) per entry. The input layer moves O(1) (input_dim terms), a hidden
         layer ~ n (n terms of eta aligned with h), the readout's share ~ n (h_L . eta sign(h_L
         chi)), and the features' share n^(3/2): n coordinates moved ~ eta n, each with the sign of
         W_out's entry (dL/dh_L = chi W_out^T), summed against W_out's n^(-1/2) entries.
So under SP with a fixed lr the output's first change grows like n with SGD and n^(3/2) with Adam
(the often-quoted "~ width for Adam" is only the readout's share: the hidden layers' sign updates move
the features by ~ n, and the readout sums them coherently). muP (Tensor Programs IV and V) removes
the growth by scaling the readout's init and the per-layer learning rates with n.

Measured (tanh, depth 2, lecun_normal, lr 1e-4, full batch of 16, widths 64..2048, 4 seeds), the
log-log slopes after one step, theory in brackets: SGD input -0.48 (-1/2), hidden +0.44 (+1/2),
output +0.94 (1; readout share +0.91, features' share +0.95); Adam input +0.00 (0), hidden +0.94
(1), output +1.44 (3/2; shares +0.93 (1), +1.45 (3/2)); at init, hidden RMS -0.002, -0.008 (0).
Every measured slope sits at or below its leading exponent: sub-leading terms (the random-sign
part of each sum, ~ n^(p - 1/2); terms propagated from the input layer, ~ n^(p - 1)) still weigh
at width 64. The checks allow p - finite_width_bias(widths) - 4 se <= slope <= p + 4 se, se the
standard error over seeds, with sub-leading terms at most as large as the leading one from width
CROSSOVER = 128 on. At lr 1e-3 (not the default) Adam's hidden change reaches ~0.4 at width 2048,
tanh saturates and its fitted slopes fall to 0.89 (hidden) and 1.37 (output): the exponents hold
only while eta n stays small. After the first step the lines bend: at width 2048 Adam's first
step moves the output by O(1) and overshoots (median loss 0.48 -> 0.87) while width 64 barely moves
(0.73 -> 0.72): one lr cannot suit every width, the SP instability the check exists to catch.

muP beside it (`parametrization: [sp, mup]`, a traced choice; gradlab/parametrization.py, equal to
SP at model.base_width = the narrowest width): the readout's init std x m^(-1/2), m = n / base_width,
and per-layer lr scales (SGD: input and biases x m, readout x 1/m; Adam: hidden and readout x 1/m).
Redoing the sums above: SGD's readout update is O(1/n) per entry on O(1) features and the hidden
updates n^(-1/2) x n^(-1/2) (dL/dh ~ W_out ~ 1/n), so every layer moves by n x (1/n) = O(1); Adam's
hidden and readout steps are eta/m per entry, summed over n coherent terms: O(1). The check: every
layer's change after one step has |log-log slope| < MUP_SLOPE = 0.1 against width (the catalog's bound,
no seed allowance), for both optimizers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import analysis, models, parametrization, transforms, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "width_scaling"
CLAIM = (
    "under SP with one lr the output's first change grows like width (SGD) and width^1.5 (Adam); "
    "activations at init do not grow; under muP no layer's change grows or shrinks with width"
)
AXES = ["parametrization", "optimizer", "model.width", "seed"]
OPTIMIZERS = ("sgd", "adam")


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the optimizer as a traced choice and the probe batch."""

    optimizer: str = param(
        "sgd",
        choices=OPTIMIZERS,
        sweep="choice",
        doc="replaces optim.name: every choice is built into one program and picked by index",
    )
    probe_examples: int = param(64, low=1, doc="the first training inputs, on which every layer's output is measured")
    parametrization: str = param(
        "sp",
        choices=parametrization.PARAMETRIZATIONS,
        sweep="choice",
        doc="replaces model.parametrization: every choice is built into one program and picked by index",
    )

    def validate(self) -> None:
        super().validate()
        self.require("model.norm", ("none",), "width_scaling measures a plain MLP")
        self.replaced("optim.name", by="optimizer")
        self.replaced("model.parametrization", by="parametrization")
        if self.parametrization != "sp" and self.model.init not in parametrization.FAN_IN_SCHEMES:
            raise ConfigError(
                f"the parametrizations rescale a fan-in init (allowed: {', '.join(parametrization.FAN_IN_SCHEMES)}), "
                f"got {self.model.init!r}",
                key="model.init",
            )
        if self.probe_examples > self.data.examples:
            raise ConfigError(
                f"at most data.examples={self.data.examples} (the probe is training inputs), got {self.probe_examples}",
                key="probe_examples",
            )


class State(NamedTuple):
    train: trials.TrainState
    start: dict  # the parameters at init
    start_outputs: tuple  # every layer's output at init on the probe inputs (models.layer_values)


def trial(cfg) -> Trial:
    """Train the config's MLP with the chosen optimizer; every step records, at the parameters
    theta_t before its update (step 0 is the init), on the probe batch:

    act_rms (layer)            RMS of h_l(theta_t)
    act_change_rms (layer)     RMS of h_l(theta_t) - h_l(theta_0); the last layer is the output f
    readout_change_rms         RMS of h_L(theta_0) (W_out,t - W_out,0) + (b_out,t - b_out,0), the
                               readout's own share of the output's change
    feature_change_rms         RMS of (h_L(theta_t) - h_L(theta_0)) W_out,t, the share of the change
                               of the features it reads (the two shares sum to f_t - f_0)
    weight_change_rms (layer)  per-entry RMS of W_l,t - W_l,0
    update_rms (layer)         per-entry RMS of this step's update W_l,t+1 - W_l,t
    and the training loss.
    """
    spec = trials.mlp_spec(cfg)

    def parametrized(hp, name="sgd"):  # the init and multipliers do not depend on the optimizer; its lr scales do
        return parametrization.numbers(hp["parametrization"], name, spec.width, cfg.model.base_width)

    def optimizer(hp):
        choices = [
            parametrized(hp, name).optimizer(transforms.build(dataclasses.replace(cfg.optim, name=name), hp, cfg.steps))
            for name in OPTIMIZERS
        ]
        return trials.chosen_by_index(hp["optimizer"], choices)

    def update_rms(view):
        mask = models.layer_mask(spec, view.hyper)
        return {"update_rms": jnp.where(mask, models.per_layer(view.updates, models.rms), jnp.nan)}

    base = trials.supervised_mlp(cfg, optimizer=optimizer, metrics=update_rms, parametrized=parametrized)

    def hyper_of(hp):
        return parametrized(hp).hyper(models.MLPHyper.from_hp(hp))

    def init(hp, key):
        train = base.init(hp, key)
        _, probe = models.layer_values(train.params, train.data.x[: cfg.probe_examples], spec, hyper_of(hp))
        return State(train, train.params, probe)

    def step(hp, state):
        hyper = hyper_of(hp)
        mask = models.layer_mask(spec, hyper)
        params, start = state.train.params, state.start
        _, now = models.layer_values(params, state.train.data.x[: cfg.probe_examples], spec, hyper)
        change = jax.tree.map(jnp.subtract, now, state.start_outputs)
        readout = state.start_outputs[1][-1] @ (params["output"]["w"] - start["output"]["w"]) * hyper.output_multiplier
        readout = readout + (params["output"]["b"] - start["output"]["b"])[None]
        features = (now[1][-1] - state.start_outputs[1][-1]) @ params["output"]["w"] * hyper.output_multiplier
        train, metrics = base.step(hp, state.train)
        masked = lambda v: jnp.where(mask, v, jnp.nan)
        return State(train, start, state.start_outputs), {
            **metrics,
            "act_rms": masked(models.per_layer_rms(now)),
            "act_change_rms": masked(models.per_layer_rms(change)),
            "readout_change_rms": models.rms(readout),
            "feature_change_rms": models.rms(features),
            "weight_change_rms": masked(models.per_layer(jax.tree.map(jnp.subtract, params, start), models.rms)),
        }

    return Trial(init, step)


# ----------------------------------------------------------------------------- theory and measure

# Leading exponent p of each quantity ~ width^p after one step, standard parametrization (see the
# module docstring): the input layer, every hidden layer, the output f, and the output's two shares.
EXPONENTS = {
    "sgd": {"input": -0.5, "hidden": 0.5, "output": 1.0, "readout": 1.0, "feature": 1.0},
    "adam": {"input": 0.0, "hidden": 1.0, "output": 1.5, "readout": 1.0, "feature": 1.5},
}
CROSSOVER = 128  # sub-leading terms are assumed no larger than the leading one from this width on
SIGMAS = 4.0  # seed noise allowed: this many standard errors of the fitted slope
MUP_SLOPE = 0.1  # the catalog's bound on |slope| of every layer's change under muP
INIT_BIAS = 0.02  # |slope| a width-free RMS at init may show from its O(1/n) bias (c/n, |c| <= 4)


def series(ds, var: str, opt: str, layer: int | None, step: int, parametrization: str = "sp") -> np.ndarray:
    """(seeds, widths) of a metric at one step (and layer), under one parametrization."""
    a = ds[var].sel({"optimizer": opt, "parametrization": parametrization}).isel(step=step)
    if layer is not None:
        a = a.isel(layer=layer)
    return a.transpose("seed", "model.width").values.astype(float)


def layer_index(ds) -> dict:
    """Which layer of the `layer` axis stands for each panel: input, the last hidden, output."""
    layers = ds.sizes["layer"]
    return {"input": 0, "hidden": layers - 2, "output": layers - 1}


class Measured(NamedTuple):
    """Log-log slopes against width, each (slope of the seed mean, its standard error over seeds)."""

    widths: np.ndarray
    optimizers: list
    steps: int
    layers: int  # the layer axis: input projection, hidden layers, readout
    bias: float  # analysis.finite_width_bias(widths, CROSSOVER)
    act: dict  # (optimizer, layer, t) -> RMS of h_l(t), t in {0, steps - 1}
    change: dict  # (optimizer, what, t) -> RMS of h(t) - h(0): input, hidden, output at t in {1, steps - 1};
    #               the output's readout and feature shares at t = 1
    update: dict  # (optimizer, what) -> per-entry RMS of the first update, what in input, hidden, output
    mup: dict  # (optimizer, what, t) -> the change's slope under muP, what in input, hidden, output, t as `change`


def measure(ds) -> Measured | None:
    """The slopes against width under SP (every number) and muP (the changes), where swept."""
    widths = ds["model.width"].values
    if len(widths) < 2:
        return None
    x, opts, steps = np.log(np.asarray(widths, float)), [str(o) for o in ds["optimizer"].values], ds.sizes["step"]
    swept = [str(p) for p in ds["parametrization"].values]
    bias = analysis.finite_width_bias(widths, CROSSOVER)

    def fit(var, opt, layer, t, parametrization="sp"):
        return analysis.seed_slope(x, np.log(series(ds, var, opt, layer, t, parametrization)))

    where = layer_index(ds)
    act = {
        (o, layer, t): fit("act_rms", o, layer, t)
        for o in opts
        for layer in range(ds.sizes["layer"])
        for t in sorted({0, steps - 1})
    }
    mup = {}
    if "mup" in swept and steps >= 2:
        mup = {
            (o, what, t): fit("act_change_rms", o, layer, t, "mup")
            for o in opts
            for what, layer in where.items()
            for t in sorted({1, steps - 1})
        }
    if "sp" not in swept:
        return Measured(widths, opts, steps, ds.sizes["layer"], bias, {}, {}, {}, mup)
    change, update = {}, {(o, what): fit("update_rms", o, layer, 0) for o in opts for what, layer in where.items()}
    if steps >= 2:
        for o in opts:
            for what, layer in where.items():
                change.update({(o, what, t): fit("act_change_rms", o, layer, t) for t in sorted({1, steps - 1})})
            change.update({(o, s, 1): fit(f"{s}_change_rms", o, None, 1) for s in ("readout", "feature")})
    return Measured(widths, opts, steps, ds.sizes["layer"], bias, act, change, update, mup)


def checks(m: Measured | None) -> list[Check]:
    if m is None:
        return []
    return _sp_checks(m) + [
        Check.below(f"{opt}, muP: |d ln|h(1) - h(0)| / d ln width|, {what}", abs(m.mup[(opt, what, 1)][0]), MUP_SLOPE)
        for opt, what, t in m.mup
        if t == 1  # muP's coordinate check: no layer's change grows or shrinks with width
    ]


def _sp_checks(m: Measured) -> list[Check]:
    out = []
    if not m.act:  # SP not swept
        return out
    for layer in range(1, m.layers - 1):
        slope, err = m.act[(m.optimizers[0], layer, 0)]
        tol = INIT_BIAS + SIGMAS * err
        out.append(Check.near(f"init: d ln RMS(h_{layer}) / d ln width", slope, 0.0, tol, "theory"))
    if m.steps < 2:
        return out
    for opt in m.optimizers:
        for what in ("output", "readout", "feature", "hidden", "input"):
            slope, err = m.change[(opt, what, 1)]
            p = EXPONENTS[opt][what]
            label = {"readout": "output, readout's share", "feature": "output, features' share"}.get(what, what)
            name = f"{opt}: d ln|h(1) - h(0)| / d ln width, {label}"
            out.append(Check.between(name, slope, p - m.bias - SIGMAS * err, p + SIGMAS * err, f"theory {p:+g}"))
    return out


def figures(ds, m: Measured | None) -> dict:
    """The coordinate check and the first update's size (gradlab/experiments/_width_scaling_figures.py)."""
    if m is None:  # one width: no slope to draw
        return {}
    from gradlab.experiments import _width_scaling_figures

    return _width_scaling_figures.draw(ds, m)
