"""A1: in a deep plain net gradients vanish toward the input; norms and residuals even them out.

With LeCun init (Var W = 1/fan_in) a plain sigmoid net scales the back-propagated signal by
sigmoid'(z) <= 1/4 per layer, so |dL/dW_1| / |dL/dW_10| <= (1/4)**9 up to the fluctuation of
the random weights' gain. A pre-norm residual stream carries the gradient unattenuated, so
the per-layer gradient norms of a residual + LayerNorm net stay within a small factor.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from gradlab import analysis, plotting, trials
from gradlab.config import ExperimentConfig
from gradlab.experiments import Check

NAME = "gradient_flow"
CLAIM = "gradients vanish toward the input of deep plain nets; residual + norm keeps them even"
Config = ExperimentConfig
SIGMOID_SPAN = 9  # hidden layers 1 and 10: nine sigmoid derivatives apart
SIGMOID_BOUND = 0.25**SIGMOID_SPAN
EVEN_BOUND = 10.0
AXES = ["model.activation", "model.residual", "model.norm", "seed"]


def trial(cfg):
    return trials.supervised_mlp(cfg)


def _at_init(ds, var, activation, sel):
    """(seeds, layers) of a per-layer statistic at step 0."""
    return ds[var].sel({"model.activation": activation, **sel}).isel(step=0).transpose("seed", "layer").values


def sigmoid_ratio(ds) -> float:
    g = _at_init(ds, "grad_norm", "sigmoid", {"model.residual": False, "model.norm": "none"})
    with np.errstate(invalid="ignore"):  # 0/0 where float32 underflowed both: NaN, and the check fails
        return float(np.median(g[:, 1] / g[:, 1 + SIGMOID_SPAN]))


def residual_layernorm_spread(ds) -> float:
    spreads = []
    for activation in ds["model.activation"].values:
        g = _at_init(ds, "grad_norm", activation, {"model.residual": True, "model.norm": "layernorm"})
        hidden = g[:, 1:-1]
        spreads.append(np.max(np.max(hidden, axis=1) / np.min(hidden, axis=1)))
    return float(np.max(spreads))


class Measured(NamedTuple):
    sigmoid_ratio: float | None  # median over seeds of |g_1| / |g_10|, plain sigmoid; None if not run
    even_spread: float | None  # worst max/min of hidden |g_l| over activations, residual + LayerNorm
    depth: int
    seeds: int


def _has(ds, **sel) -> bool:
    return all(value in ds[name].values for name, value in sel.items())


def measure(ds) -> Measured | None:
    if "grad_norm" not in ds:  # telemetry=loss: nothing per layer to measure
        return None
    enough_depth = ds.sizes["layer"] - 2 >= 1 + SIGMOID_SPAN
    plain_sigmoid = {"model.activation": "sigmoid", "model.residual": False, "model.norm": "none"}
    ratio = sigmoid_ratio(ds) if enough_depth and _has(ds, **plain_sigmoid) else None
    even = _has(ds, **{"model.residual": True, "model.norm": "layernorm"})
    return Measured(ratio, residual_layernorm_spread(ds) if even else None, ds.sizes["layer"] - 2, ds.sizes["seed"])


def checks(m: Measured | None) -> list[Check]:
    """The catalog's checks, for the variants this run includes."""
    out = []
    if m is not None and m.sigmoid_ratio is not None:
        out.append(Check.at_most("plain sigmoid |g_1|/|g_10|", m.sigmoid_ratio, 10 * SIGMOID_BOUND, "10 x 0.25^9"))
    if m is not None and m.even_spread is not None:
        out.append(Check.at_most("residual+layernorm max/min |g_l|", m.even_spread, EVEN_BOUND))
    return out


def figures(ds, m: Measured | None) -> dict:
    if m is None:  # telemetry=loss: no per-layer statistics to draw
        return {}
    activations = list(ds["model.activation"].values)
    fig, axes = plotting.figure(2, len(activations), width=3.5, height=2.8, sharex=True)
    layers = ds["layer"].values
    for col, activation in enumerate(activations):
        for row, (var, ylabel) in enumerate(
            [("grad_norm", r"$\|\partial L/\partial W_l\|_F$"), ("act_rms", "activation RMS")]
        ):
            ax = axes[row, col]
            for name, sel in analysis.variants(ds, residual_first=True):
                plotting.band(ax, layers, _at_init(ds, var, activation, sel), name)
            ax.set_yscale("log")
            if col == 0:
                ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(activation)
            else:
                ax.set_xlabel("layer l (0 = input projection)")
    if m.sigmoid_ratio is not None:
        plotting.note(
            axes[0, activations.index("sigmoid")],
            f"plain: $g_1/g_{{10}}$ = {m.sigmoid_ratio:.2g}\nbound $0.25^9$ = {SIGMOID_BOUND:.2g}",
            loc="lower right",
        )
    if m.even_spread is not None:
        plotting.note(axes[0, 0], f"res+LN max/min = {m.even_spread:.2g}", loc="lower right")
    plotting.legend_outside(fig, axes[0, 0])
    fig.suptitle(f"Gradient flow at initialization: depth {m.depth}, {m.seeds} seeds (band: min..max)", fontsize=10)
    return {"": fig}
