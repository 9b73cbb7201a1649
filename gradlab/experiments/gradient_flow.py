"""A1: in a deep plain net gradients vanish toward the input; norms and residuals even them out.

With LeCun init (Var W = 1/fan_in) a plain sigmoid net scales the back-propagated signal by
sigmoid'(z) <= 1/4 per layer, so |dL/dW_1| / |dL/dW_10| <= (1/4)**9 up to the fluctuation of
the random weights' gain. A pre-norm residual stream carries the gradient unattenuated, so
the per-layer gradient norms of a residual + LayerNorm net stay within a small factor.
"""

from __future__ import annotations

import numpy as np

from gradlab import plotting, results, trials
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


def _variants(ds):
    for residual in ds["model.residual"].values:
        for norm in ds["model.norm"].values:
            parts = (["residual"] if residual else []) + ([] if norm == "none" else [str(norm)])
            yield "+".join(parts) or "plain", {"model.residual": residual, "model.norm": norm}


def _at_init(ds, var, activation, sel):
    """(seeds, layers) of a per-layer statistic at step 0."""
    return ds[var].sel({"model.activation": activation, **sel}).isel(step=0).transpose("seed", "layer").values


def sigmoid_ratio(ds) -> float:
    g = _at_init(ds, "grad_norm", "sigmoid", {"model.residual": False, "model.norm": "none"})
    return float(np.median(g[:, 1] / g[:, 1 + SIGMOID_SPAN]))


def residual_layernorm_spread(ds) -> float:
    spreads = []
    for activation in ds["model.activation"].values:
        g = _at_init(ds, "grad_norm", activation, {"model.residual": True, "model.norm": "layernorm"})
        hidden = g[:, 1:-1]
        spreads.append(np.max(np.max(hidden, axis=1) / np.min(hidden, axis=1)))
    return float(np.max(spreads))


def _has(ds, **sel) -> bool:
    return all(value in ds[name].values for name, value in sel.items())


def checks(ds) -> list[Check]:
    """The catalog's checks, for the variants this run includes."""
    if "grad_norm" not in ds:  # telemetry=loss: nothing per layer to check
        return []
    ds = results.with_axes(ds, AXES)
    out = []
    enough_depth = ds.sizes["layer"] - 2 >= 1 + SIGMOID_SPAN
    if enough_depth and _has(ds, **{"model.activation": "sigmoid", "model.residual": False, "model.norm": "none"}):
        ratio = sigmoid_ratio(ds)
        out.append(Check("plain sigmoid |g_1|/|g_10|", ratio, f"<= 10 x 0.25^9 = {10 * SIGMOID_BOUND:.2g}",
                         ratio <= 10 * SIGMOID_BOUND))
    if _has(ds, **{"model.residual": True, "model.norm": "layernorm"}):
        spread = residual_layernorm_spread(ds)
        out.append(Check("residual+layernorm max/min |g_l|", spread, f"<= {EVEN_BOUND:g}", spread <= EVEN_BOUND))
    return out


def figures(ds) -> dict:
    ds = results.with_axes(ds, AXES)
    activations = list(ds["model.activation"].values)
    fig, axes = plotting.figure(2, len(activations), width=3.5, height=2.8, sharex=True)
    layers = ds["layer"].values
    for col, activation in enumerate(activations):
        for row, (var, ylabel) in enumerate([("grad_norm", r"$\|\partial L/\partial W_l\|_F$"),
                                              ("act_rms", "activation RMS")]):
            ax = axes[row, col]
            for name, sel in _variants(ds):
                plotting.band(ax, layers, _at_init(ds, var, activation, sel), name)
            ax.set_yscale("log")
            if col == 0:
                ax.set_ylabel(ylabel)
            if row == 0:
                ax.set_title(activation)
            else:
                ax.set_xlabel("layer l (0 = input projection)")
    found = {c.name: c.measured for c in checks(ds)}
    if "plain sigmoid |g_1|/|g_10|" in found:
        plotting.note(axes[0, activations.index("sigmoid")],
                      f"plain: $g_1/g_{{10}}$ = {found['plain sigmoid |g_1|/|g_10|']:.2g}\n"
                      f"bound $0.25^9$ = {SIGMOID_BOUND:.2g}", loc="lower right")
    if "residual+layernorm max/min |g_l|" in found:
        plotting.note(axes[0, 0], f"res+LN max/min = {found['residual+layernorm max/min |g_l|']:.2g}",
                      loc="lower right")
    plotting.legend_outside(fig, axes[0, 0])
    fig.suptitle(f"Gradient flow at initialization: depth {ds.sizes['layer'] - 2}, "
                 f"{ds.sizes['seed']} seeds (band: min..max)", fontsize=10)
    return {"": fig}
