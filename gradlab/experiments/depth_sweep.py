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

import warnings

import numpy as np

from gradlab import config, data, inits, plotting, results, trials
from gradlab.config import ExperimentConfig
from gradlab.engine import Trial
from gradlab.experiments import Check

NAME = "depth_sweep"
CLAIM = ("a plain ReLU net's first-layer gradient falls like 2^(-L/2) and it stops training; "
         "residual + LayerNorm trains at every depth")
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
        return state, {"loss": metrics["loss"], "first_grad_norm": metrics["grad_norm"][0],
                       "output_rms": metrics["act_rms"][-1]}

    return Trial(base.init, step)


# ----------------------------------------------------------------------------- theory and reading


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


def constant_loss(data_cfg: dict) -> float:
    """Mean squared error of the best constant prediction (NaN for a classification task)."""
    y = np.asarray(data.make(config.DataConfig(**data_cfg)).y, float)
    return float(np.mean(np.var(y, axis=0))) if data_cfg["task"] == "regression" else float("nan")


def variants(ds):
    for norm in ds["model.norm"].values:
        for residual in ds["model.residual"].values:
            name = "+".join((["residual"] if residual else []) + ([] if norm == "none" else [str(norm)])) or "plain"
            yield name, {"model.norm": norm, "model.residual": residual}


def first_grad(ds, sel) -> np.ndarray:
    """|dL/dW_0| at init, (seeds, depths): the same for every learning rate."""
    return ds["first_grad_norm"].sel(sel).isel({"optim.lr": 0, "step": 0}).transpose("seed", "model.depth").values


def final_loss(ds, sel) -> np.ndarray:
    """Final loss, (lrs, seeds, depths); a diverged run counts as +inf."""
    loss = ds["loss"].sel(sel).isel(step=-1).transpose("optim.lr", "seed", "model.depth").values.astype(float)
    return np.where(np.isfinite(loss), loss, np.inf)


def best_final(ds, sel) -> np.ndarray:
    """Median over seeds of the best final loss over learning rates, per depth."""
    return np.median(np.min(final_loss(ds, sel), axis=0), axis=0)


def checks(ds) -> list[Check]:
    ds = results.with_axes(ds, AXES)
    cfg = results.config_of(ds)["config"]
    model, seeds = cfg["model"], ds.sizes["seed"]
    depths = ds["model.depth"].values
    deep = depths >= FIT_FROM
    found = dict(variants(ds))
    out = []
    rate = plain_rate(model)
    if "plain" in found and rate is not None and deep.sum() >= 2:
        g = np.log(first_grad(ds, found["plain"])[:, deep]).mean(axis=0)
        measured = float(np.polyfit(depths[deep], g, 1)[0])
        tol = rate_tolerance(depths[deep], model["width"], seeds)
        out.append(Check("plain: d ln|dL/dW_0| / d depth at init", measured,
                         f"{rate:+.3f} +- {tol:.3f} (2^(-1/2) per layer, width-corrected)",
                         abs(measured - rate) <= tol))
    if "residual+layernorm" in found and model["activation"] == "relu" and deep.sum() >= 2:
        g = np.log(first_grad(ds, found["residual+layernorm"])[:, deep]).mean(axis=0)
        power = float(np.polyfit(np.log(depths[deep]), g, 1)[0])
        out.append(Check("residual+layernorm: d ln|dL/dW_0| / d ln depth", power,
                         f"<= {POLY_BOUND:g} (polynomial; mean field {residual_layernorm_exponent():.2f})",
                         power <= POLY_BOUND))
    chance = constant_loss(cfg["data"])
    if np.isfinite(chance) and ds.sizes["step"] > 1:
        if "plain" in found:
            ratio = float(best_final(ds, found["plain"])[-1]) / chance
            out.append(Check(f"plain, depth {depths[-1]}: best final loss / constant's", ratio,
                             f">= {STALLED} (stalls)", ratio >= STALLED))
        if "residual+layernorm" in found:
            ratio = float(np.max(best_final(ds, found["residual+layernorm"]))) / chance
            out.append(Check(f"residual+layernorm, worst of depths {depths[0]}..{depths[-1]}: best final / constant's",
                             ratio, f"<= {TRAINED} (trains)", ratio <= TRAINED))
    return out


# ----------------------------------------------------------------------------- figure


def figures(ds) -> dict:
    ds = results.with_axes(ds, AXES)
    cfg = results.config_of(ds)["config"]
    depths, lrs = ds["model.depth"].values, ds["optim.lr"].values
    chance = constant_loss(cfg["data"])
    rows, cols = (1, 3) if len(lrs) == 1 else (2, max(3, len(lrs)))
    fig, axes = plotting.figure(rows, cols, width=3.2, height=2.7)
    for ax in axes.flat:
        ax.axis("off")
    found = {c.name: c for c in checks(ds)}
    ax = axes[0, 0]
    ax.axis("on")
    for i, (name, sel) in enumerate(variants(ds)):
        g = first_grad(ds, sel)
        with warnings.catch_warnings():  # a depth whose gradient overflowed in every seed is all-NaN
            warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
            plotting.band(ax, depths, np.where(np.isfinite(g), g, np.nan), name, color=plotting.COLORS[i])
        overflow = ~np.all(np.isfinite(g), axis=0)
        if overflow.any():
            top = np.full(overflow.sum(), np.nanmax(g[np.isfinite(g)]))
            ax.plot(depths[overflow], top, "x", color=plotting.COLORS[i])
    rate = plain_rate(cfg["model"])
    if rate is not None and "plain" in dict(variants(ds)):
        anchor = np.exp(np.log(first_grad(ds, dict(variants(ds))["plain"])).mean(axis=0))
        i0 = int(np.argmax(depths >= FIT_FROM))
        ax.plot(depths, anchor[i0] * np.exp(rate * (depths - depths[i0])), "k--", linewidth=0.9, label="theory (plain)")
    ax.set(xscale="log", yscale="log", xlabel="depth L", ylabel=r"$\|\partial L/\partial W_0\|_F$ at init",
           title="first-layer gradient at init")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.minorticks_off()
    lines = []
    if "plain: d ln|dL/dW_0| / d depth at init" in found:
        c = found["plain: d ln|dL/dW_0| / d depth at init"]
        lines.append(f"plain: d ln g / dL = {c.measured:+.3f}\n    (theory {c.expected.split(' (')[0]})")
    if "residual+layernorm: d ln|dL/dW_0| / d ln depth" in found:
        c = found["residual+layernorm: d ln|dL/dW_0| / d ln depth"]
        lines.append(f"res+LN: d ln g / d ln L = {c.measured:+.2f}\n    ({c.expected.split(' (')[0]}; mean field "
                     f"{residual_layernorm_exponent():.2f})")
    if lines:
        plotting.note(ax, "\n".join(lines), loc="upper left")
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * (hi / lo) ** 0.6)  # head room for the note
    name = "Adam" if cfg["optim"]["name"] == "adam" else cfg["optim"]["name"]
    if len(lrs) == 1:
        _loss_panel(ds, axes[0, 1], None, chance, f"{name} lr {lrs[0]:g}")
    else:
        _loss_panel(ds, axes[0, 1], None, chance, "best lr")
        for col, lr in enumerate(lrs):
            _loss_panel(ds, axes[1, col], lr, chance, f"{name} lr {lr:g}")
    text = ["x: non-finite (overflow / diverged)", "dotted: best constant prediction"]
    for c in found.values():
        if "final" in c.name:
            who = c.name.split(":")[0].replace("residual+layernorm", "res+LN").replace(" of depths", "")
            text.append(f"{who.split(' ')[0]} {who.split(' ', 1)[1]}:\n    final / constant = {c.measured:.2g}")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    axes[0, 2].legend(handles, labels, loc="upper left", frameon=False, fontsize=8)
    plotting.note(axes[0, 2], "\n".join(text), loc="lower left")
    for t in axes[0, 2].texts:
        t.set_in_layout(False)
    fig.suptitle(f"Depth sweep: {cfg['model']['activation']}, width {cfg['model']['width']}, "
                 f"{cfg['model']['init']} init, {ds.sizes['step']} {cfg['optim']['name']} steps, "
                 f"{ds.sizes['seed']} seeds", fontsize=10)
    return {"": fig}


def _loss_panel(ds, ax, lr, chance, title):
    ax.axis("on")
    depths = ds["model.depth"].values
    for i, (name, sel) in enumerate(variants(ds)):
        loss = final_loss(ds, sel)
        loss = np.min(loss, axis=0) if lr is None else loss[list(ds["optim.lr"].values).index(lr)]
        median = np.median(loss, axis=0)
        shown = np.where(np.isfinite(median), median, np.nan)
        ax.plot(depths, shown, "o-", color=plotting.COLORS[i], markersize=3, label=name)
        diverged = ~np.isfinite(median)
        if diverged.any():
            ax.plot(depths[diverged], np.full(diverged.sum(), 3 * chance if np.isfinite(chance) else 1.0), "x",
                    color=plotting.COLORS[i], markersize=7)
    if np.isfinite(chance):
        ax.axhline(chance, color="0.3", linestyle=":", linewidth=0.9)
        ax.set_yscale("log")
        ax.set_ylim(max(ax.get_ylim()[0], 1e-8), 4 * chance)
    ax.set(xscale="log", yscale="log", xlabel="depth L", ylabel="final training loss", title=title)
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.minorticks_off()
