"""A3: trainability against depth for plain, residual, LayerNorm and residual + LayerNorm nets.

A plain ReLU net with LeCun init (Var W = 1/n, sigma_w^2 = 1) multiplies the back-propagated
squared gradient by sigma_w^2 E[relu'(z)^2] = 1/2 per layer, so the first layer's weight
gradient falls like 2^(-L/2) with depth L: a log-slope of -ln(2)/2 = -0.347 per layer, less
5/(4n) from the width-n fluctuation of each layer's factor (its log has mean ln E - Var/2, and
the factor's relative variance is 5/n, see init_schemes). A pre-LayerNorm residual block
h + relu(W LN(h)) adds to the stream instead: the stream's variance grows by Var relu(z) = 1/2 -
1/(2 pi) per block, each block multiplies the squared gradient by 1 + a/l with
a = sigma_w^2 E[relu'^2] / Var relu(z) = 1.47 (a product that grows like L^a), and the output,
read from the un-normalized stream, grows like L; so |dL/dW_0| grows polynomially, like
L^(1 + a/2) = L^1.73 (mean field), not geometrically. Residual without a norm compounds
(1 + sigma_w^2/2) per block and explodes; LayerNorm without a residual re-scales every layer.

Trainability: each variant is trained briefly with Adam at a few learning rates; the plain
net's gradients at depth 64 (~2^-32 of depth 2's) fall below Adam's eps and it stalls at the
loss of the best constant prediction, while residual + LayerNorm trains at every depth.
Depth is a traced axis under the model's mask (one compile for all depths), residual is
traced, the norm is static: two compiles.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gradlab import analysis, data, inits, results, trials
from gradlab.config import ExperimentConfig
from gradlab.engine import Trial
from gradlab.experiments import Check

NAME = "depth_sweep"
CLAIM = (
    "a plain ReLU net's first-layer gradient falls like 2^(-L/2) and it stops training; "
    "residual + LayerNorm trains at every depth"
)
Config = ExperimentConfig
AXES = ["model.norm", "model.residual", "optim.lr", "model.depth", "seed"]
KAPPA = 5.0  # relative variance x n of one ReLU layer's factor on the squared gradient (2/n + 3/n)
FIT_FROM = 8  # fit over depths >= 8: there the output is ~0 and dL/dout no longer depends on depth
RELU_BRANCH_VAR = 0.5 - 1.0 / (2.0 * np.pi)  # Var relu(z), z ~ N(0, 1)
POLY_BOUND = 2.0  # residual + LN: log-log slope of |dL/dW_0| against depth stays below this
STALLED, TRAINED = 0.9, 0.1  # final loss / the best constant prediction's
DERIV_SQ = {"relu": 0.5}  # E[phi'(z)^2], z ~ N(0, 1); KAPPA is ReLU's too


def trial(cfg) -> Trial:
    """supervised_mlp, keeping the loss, the first layer's weight-gradient norm and the output RMS."""
    base = trials.supervised_mlp(cfg)

    def step(hp, state):
        state, metrics = base.step(hp, state)
        return state, {
            "loss": metrics["loss"],
            "first_grad_norm": metrics["grad_norm"][0],
            "output_rms": metrics["act_rms"][-1],
        }

    return Trial(base.init, step)


def reference(cfg) -> dict:
    """The best constant prediction's loss, the yardstick of stalling."""
    return trials.task_reference(cfg)


# ----------------------------------------------------------------------------- theory


def sigma_w2(model: dict) -> float:
    """n Var(W) of a square hidden layer under the config's init (scaled by init_gain)."""
    numerator, fan_mode, _ = inits.SCHEMES[model["init"]]
    base = model["width"] * model["init_std"] ** 2 if fan_mode == inits.FAN_NONE else numerator
    return model["init_gain"] ** 2 * base


def plain_rate(model: dict) -> float | None:
    """Expected per-layer slope of ln |dL/dW_0| for a plain net (None: not geometric at this activation)."""
    if model["activation"] not in DERIV_SQ:
        return None
    return 0.5 * np.log(sigma_w2(model) * DERIV_SQ[model["activation"]]) - KAPPA / (4.0 * model["width"])


def rate_tolerance(depths, width: int, seeds: int) -> float:
    """4 sigma of the fitted slope of ln |g_0| against depth.

    ln |g_0| at depth d is a sum of d per-layer terms of variance KAPPA / (4 width); nets of
    different depth share their lower blocks (a random walk, Cov = min(d, d')) or not
    (independent): take the larger variance. Seeds are independent.
    """
    d = np.asarray(depths, float)
    w = (d - d.mean()) / np.sum((d - d.mean()) ** 2)
    step_var = KAPPA / (4.0 * width)
    var = max(w @ np.minimum.outer(d, d) @ w, np.sum(w**2 * d)) * step_var / seeds
    return 4.0 * np.sqrt(var)


def residual_layernorm_exponent() -> float:
    """Mean-field exponent of |dL/dW_0| ~ L^p for pre-LN residual ReLU blocks: p = 1 + a/2."""
    return 1.0 + 0.5 * (0.5 / RELU_BRANCH_VAR)


# ----------------------------------------------------------------------------- measured


class Measured(NamedTuple):
    depths: np.ndarray
    first_grad: dict  # variant name -> |dL/dW_0| at init, (seeds, depths): the same at every lr
    final_loss: dict  # variant name -> final loss, (lrs, seeds, depths), +inf where diverged
    constant_loss: float  # the best constant prediction's loss (NaN: not a regression task)
    plain_rate: float | None  # theory: per-layer slope of ln |dL/dW_0|, plain (None: not geometric)
    plain_tolerance: float | None  # 4 sigma of the fitted slope
    plain_slope: float | None  # fitted over depths >= FIT_FROM to the mean over seeds of ln |g_0|
    residual_layernorm_power: float | None  # fitted d ln |g_0| / d ln depth over depths >= FIT_FROM
    plain_stall: float | None  # plain: best final loss over lrs (median over seeds) / constant's, deepest
    residual_layernorm_worst: float | None  # res + LN: the same, worst over depths


def measure(ds) -> Measured:
    cfg = results.run_config(ds)
    model, seeds = cfg["model"], ds.sizes["seed"]
    depths = ds["model.depth"].values
    deep = depths >= FIT_FROM
    found = dict(analysis.variants(ds))
    grads = {
        name: ds["first_grad_norm"].sel(sel).isel({"optim.lr": 0, "step": 0}).transpose("seed", "model.depth").values
        for name, sel in found.items()
    }
    finals = {
        name: analysis.inf_if_bad(ds["loss"].sel(sel).isel(step=-1).transpose("optim.lr", "seed", "model.depth").values)
        for name, sel in found.items()
    }
    best = {name: np.median(np.min(final, axis=0), axis=0) for name, final in finals.items()}
    regression = data.task_kind(cfg["data"]["task"]) == "regression"
    chance = float(analysis.reference(ds, "constant_loss")) if regression else float("nan")
    rate = plain_rate(model)
    slope = power = tolerance = stall = worst = None
    if "plain" in found and rate is not None and deep.sum() >= 2:
        slope = analysis.slope(depths[deep], np.log(grads["plain"][:, deep]).mean(axis=0))
        tolerance = rate_tolerance(depths[deep], model["width"], seeds)
    if "residual+layernorm" in found and model["activation"] == "relu" and deep.sum() >= 2:
        power = analysis.slope(np.log(depths[deep]), np.log(grads["residual+layernorm"][:, deep]).mean(axis=0))
    if np.isfinite(chance) and ds.sizes["step"] > 1:
        if "plain" in found:
            stall = float(best["plain"][-1]) / chance
        if "residual+layernorm" in found:
            worst = float(np.max(best["residual+layernorm"])) / chance
    return Measured(depths, grads, finals, chance, rate, tolerance, slope, power, stall, worst)


def checks(m: Measured) -> list[Check]:
    out = []
    if m.plain_slope is not None and m.plain_rate is not None and m.plain_tolerance is not None:  # set together
        out.append(
            Check.near(
                "plain: d ln|dL/dW_0| / d depth at init",
                m.plain_slope,
                m.plain_rate,
                m.plain_tolerance,
                "2^(-1/2) per layer, width-corrected:",
            )
        )
    if m.residual_layernorm_power is not None:
        out.append(
            Check.at_most("residual+layernorm: d ln|dL/dW_0| / d ln depth", m.residual_layernorm_power, POLY_BOUND)
        )
    if m.plain_stall is not None:
        out.append(Check.at_least(f"plain, depth {m.depths[-1]}: best final loss / constant's", m.plain_stall, STALLED))
    if m.residual_layernorm_worst is not None:
        out.append(
            Check.at_most(
                f"residual+layernorm, worst of depths {m.depths[0]}..{m.depths[-1]}: best final / constant's",
                m.residual_layernorm_worst,
                TRAINED,
            )
        )
    return out


# ----------------------------------------------------------------------------- figure


def figures(ds, m: Measured) -> dict:
    """First-layer gradient and final loss against depth (gradlab/experiments/_depth_sweep_figures.py)."""
    from gradlab.experiments import _depth_sweep_figures

    return _depth_sweep_figures.draw(ds, m)
