"""normalization's figures, from its stored results and Measured numbers (numpy and matplotlib only):
the per-layer gradients and the last block's against depth at init, the loss with and without
warmup, and BatchNorm with tiny batches (its own figure, `normalization_batchnorm`)."""

from __future__ import annotations

import numpy as np

from gradlab import analysis, plotting
from gradlab.experiments import normalization as N


def draw(ds, m: N.Measured) -> dict:
    """{"": the main figure, "batchnorm": BatchNorm's, when a batchnorm group ran}."""
    cfg, labels, depths = m.cfg, m.variants, m.depths
    fig, axes = plotting.figure(2, 3, width=3.9, height=3.1)
    for col, label in enumerate(("pre-LN", "post-LN")):
        if label in labels:
            _profile_panel(axes[0, col], ds, depths, labels[label], f"{label}: per-layer gradient at init")
            axes[0, col].legend(loc="lower right" if col == 0 else "upper left", fontsize=6.5, ncol=2, frameon=False)
        else:
            axes[0, col].axis("off")
    _last_block_panel(axes[0, 2], ds, m)
    _warmup_panel(axes[1, 0], ds, m)
    _finals_panel(axes[1, 1], ds, m)
    _bn_gap_panel(axes[1, 2], m)
    fig.suptitle(
        f"Normalization: residual {cfg['model']['activation']} MLP, width {cfg['model']['width']}, "
        f"final norm {'on' if cfg['model']['final_norm'] else 'off'}; "
        f"{ds.sizes['seed'] * cfg['probe_seeds']} inits per depth at init, {ds.sizes['seed']} seeds trained",
        fontsize=10,
    )
    return {"": fig, "batchnorm": _bn_figure(ds, m)} if m.bn_errors else {"": fig}


def _profile_panel(ax, ds, depths, sel, title):
    profile = ds["init_grad_norm"].sel(sel).isel({"step": 0, "warmup": 0, "model.depth": 0})
    profile = profile.transpose("seed", "probe_depth", "layer").values.astype(float)
    colors = plotting.matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, len(depths)))
    for i, depth in enumerate(depths):
        g = profile[:, i, :].copy()
        g[:, depth + 1] = g[:, -1]  # the readout sits after the last active block
        plotting.band(ax, np.arange(depth + 2) / (depth + 1), g[:, : depth + 2], f"L = {depth}", color=colors[i])
    ax.set(
        yscale="log",
        xlabel="layer l / (L + 1)   (0: input projection, 1: readout)",
        ylabel=r"$\|\partial L/\partial W_l\|_F$ at init",
        title=title,
    )


def _last_block_panel(ax, ds, m: N.Measured):
    """The last block's gradient at init against depth, every variant, with the fitted slopes."""
    depths, labels = m.depths, m.variants
    for i, (label, sel) in enumerate(labels.items()):
        plotting.band(ax, depths, N.probe_table(ds, "init_last_grad", sel), label, color=plotting.COLORS[i % 8])
    first = N.probe_table(ds, "init_last_grad", labels.get("pre-LN", next(iter(labels.values()))))
    ax.plot(depths, np.median(first[:, 0]) * np.sqrt((depths[0] + 1) / (depths + 1)), "k--", lw=0.9, label="(L+1)^-1/2")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="depth L",
        ylabel=r"last block $\|\partial L/\partial W_L\|_F$ at init",
        title="last block's gradient against depth",
    )
    plotting.value_ticks(ax, depths)
    lines = []
    for label, (mean, se) in m.slopes.items():
        if label.startswith("post"):
            lines.append(f"{N.check_title(label)}: slope {mean:+.2f} (>= {-N.SIGMAS * se:+.3f})")
            continue
        lines.append(f"{N.check_title(label)}: slope {mean:+.2f} (in [{N.PRE_BAND[0]}, {N.PRE_BAND[1]}])")
        mean, se = m.ratio_slopes[label]
        lines.append(f"{N.check_title(label)}: ratio slope {mean:+.2f} ({m.theory:+.3f} +- {N.SIGMAS * se:.3f})")
    if lines:
        plotting.note(ax, "\n".join(lines), loc="lower left")
    ax.legend(loc="upper right", fontsize=6.5, frameon=False, ncol=2)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo / (hi / lo) ** 1.2, hi * (hi / lo) ** 0.3)


def _warmup_panel(ax, ds, m: N.Measured):
    """Pre-LN and Post-LN loss curves with and without warmup."""
    optim = m.cfg["optim"]
    for i, label in enumerate(("pre-LN", "post-LN")):
        for warm in sorted({bool(w) for w in ds["warmup"].values}) if label in m.variants else ():
            loss = ds["loss"].sel({**m.variants[label], "warmup": warm}).isel({"model.depth": 0})
            ax.plot(
                np.median(loss.transpose("seed", "step").values.astype(float), axis=0),
                color=plotting.COLORS[i],
                ls="-" if warm else ":",
                label=f"{label}, {'warmup' if warm else 'no warmup'}",
            )
    if np.isfinite(m.constant_loss):
        ax.axhline(m.constant_loss, color="0.4", lw=0.8, ls="--", label="best constant")
    ax.set(
        yscale="log",
        xlabel="step",
        ylabel="training loss (median over seeds)",
        title=f"{optim['name']} lr {optim['lr']:g}, depth {int(ds['model.depth'].values[0])}, "
        f"warmup {optim['warmup_steps']} steps",
    )
    ax.legend(fontsize=6.5, frameon=False, loc="lower left")
    if m.warmup_gain is not None:
        plotting.note(
            ax, f"Post-LN final loss\nno warmup / warmup = {m.warmup_gain:.2g}\n(>= {N.WORSE:g})", loc="upper right"
        )


def _finals_panel(ax, ds, m: N.Measured):
    """The final loss of every variant, with and without warmup (x: diverged)."""
    labels, width = list(m.variants), 0.38
    for j, warm in enumerate(sorted({bool(w) for w in ds["warmup"].values})):
        finals = np.asarray([m.finals[(label, warm)] for label in labels])
        x = np.arange(len(labels)) + (j - 0.5) * width
        ax.bar(
            x,
            analysis.nan_if_bad(finals),
            width,
            color=plotting.COLORS[2 + j],
            label="warmup" if warm else "no warmup",
        )
        for xi in x[~np.isfinite(finals)]:
            ax.text(xi, 1.0, "x", ha="center", color="#d55e00")
    if np.isfinite(m.constant_loss):
        ax.axhline(m.constant_loss, color="0.4", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(labels)), labels, rotation=30, fontsize=7.5)
    ax.set(yscale="log", ylabel=f"final training loss (last {N.TAIL} steps)", title="every variant, same lr")
    ax.legend(fontsize=7, frameon=False)


def _bn_gap_panel(ax, m: N.Measured):
    """BatchNorm with tiny batches: final train (batch statistics) vs eval (running averages) loss."""
    if not m.bn_finals:
        ax.axis("off")
        return
    sizes = np.asarray(m.bn_sizes)
    for i, (label, (train, evals)) in enumerate(m.bn_finals.items()):
        color = plotting.COLORS[4 + i]
        ax.plot(sizes, train, "o-", color=color, label=f"{label} train (batch stats)")
        ax.plot(sizes, evals, "s--", color=color, label=f"{label} eval (running stats)")
        ax.text(sizes[0], evals[0], f" x{evals[0] / train[0]:.2g}", fontsize=7, color=color, va="bottom")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="batch size B (BatchNorm statistics over B rows)",
        ylabel=f"final loss (last {N.TAIL} steps)",
        title="BatchNorm: train vs eval by batch size",
    )
    plotting.value_ticks(ax, sizes)
    ax.legend(fontsize=6.5, frameon=False, loc="upper right")
    plotting.note(ax, "x: eval / train at the smallest B", loc="lower left")


def _bn_figure(ds, m: N.Measured):
    """Losses by batch size, the running mean against a numpy EMA, and the output's variance at init."""
    sizes, momentum = m.bn_sizes, m.cfg["bn_momentum"]
    fig, axes = plotting.figure(1, 3, width=4.2, height=3.3)
    label = "pre-BN" if "pre-BN" in m.bn_errors else "post-BN"
    closed, err, ema, rel = m.bn_errors[label]
    sel = {**m.variants[label], "warmup": bool(np.max(ds["warmup"].values))}
    at = lambda name, **i: ds[name].sel(sel).isel({"model.depth": 0, **i})
    colors = plotting.matplotlib.colormaps["plasma"](np.linspace(0.0, 0.8, len(sizes)))
    ax = axes[0, 0]
    for j, b in enumerate(sizes):
        for name, ls in (("bn_loss", "-"), ("bn_eval_loss", "--")):
            x = at(name, bn_batch=j).transpose("seed", "step").values.astype(float)
            ax.plot(
                analysis.moving_average(np.median(x, axis=0), N.TAIL // 2),
                color=colors[j],
                ls=ls,
                label=f"B={b}" if name == "bn_loss" else None,
            )
    ax.set(yscale="log", xlabel="step", ylabel="loss (moving average)", title=f"{label}: train (solid), eval (dashed)")
    ax.legend(fontsize=7, frameon=False)
    ax = axes[0, 1]  # one feature's running mean against the numpy average of the recorded batch means
    seed = {"seed": ds["seed"].values[0]}
    for j, b in enumerate(sizes):
        batch_mean = at("bn_in_mean", bn_batch=j, feature=0).sel(seed).values.astype(float)
        ref = analysis.exponential_average(batch_mean, 0.0, momentum)
        steps = np.arange(len(ref))
        ax.plot(steps, batch_mean, color=colors[j], lw=0.5, alpha=0.35)
        ax.plot(
            steps,
            at("bn_running_mean", bn_batch=j, feature=0).sel(seed).values,
            color=colors[j],
            lw=1.3,
            label=f"B={b}",
        )
        ax.plot(steps[::6], ref[::6], "o", color=colors[j], ms=2.5, mfc="none")
    ax.set(
        xlabel="step",
        ylabel="block 1 BatchNorm input, feature 0",
        title=f"running mean vs numpy EMA (o), m={momentum:g}",
    )
    plotting.note(ax, f"faint: batch means\nmax rel. err {rel:.1e}\n(|err| / bound {ema:.2g} <= 1)", loc="lower left")
    ax.legend(fontsize=7, frameon=False, loc="upper right")
    ax = axes[0, 2]  # the training-mode output's batch variance against v / (v + eps) at init
    for j, b in enumerate(sizes):
        v = at("bn_in_var", bn_batch=j, step=0).values.astype(float).ravel()
        out = at("bn_out_var", bn_batch=j, step=0).values.astype(float).ravel()
        ax.plot(v, out - v / (v + N.batchnorm_net.EPS), ".", color=colors[j], ms=3, label=f"B={b}")
    ax.set(
        xscale="log",
        xlabel="input batch variance v (per feature, step 0)",
        ylabel="output batch var - v/(v+eps)",
        title="at init: var = v/(v+eps), mean 0",
    )
    plotting.note(
        ax, f"max |error| of mean and var: {err:.1e}\n(|err| / float32 bound {closed:.2g} <= 1)", loc="upper right"
    )
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    fig.suptitle(
        f"flax BatchNorm ({label}) with tiny batches: rows masked out of a minibatch of {sizes[-1]}", fontsize=10
    )
    return fig
