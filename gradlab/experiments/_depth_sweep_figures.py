"""depth_sweep's figure, from its stored results and Measured numbers (numpy and matplotlib only): the first
layer's gradient at init against depth with the plain net's theory line, and the final loss against depth per lr."""

from __future__ import annotations

import warnings

import numpy as np

from gradlab import plotting, results
from gradlab.experiments import depth_sweep as M


def draw(ds, m: M.Measured) -> dict:
    cfg = results.run_config(ds)
    depths, lrs = m.depths, ds["optim.lr"].values
    rows, cols = (1, 3) if len(lrs) == 1 else (2, max(3, len(lrs)))
    fig, axes = plotting.figure(rows, cols, width=3.2, height=2.7)
    for ax in axes.flat:
        ax.axis("off")
    ax = axes[0, 0]
    ax.axis("on")
    for i, (name, g) in enumerate(m.first_grad.items()):
        with warnings.catch_warnings():  # a depth whose gradient overflowed in every seed is all-NaN
            warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
            plotting.band(ax, depths, np.where(np.isfinite(g), g, np.nan), name, color=plotting.COLORS[i])
        overflow = ~np.all(np.isfinite(g), axis=0)
        if overflow.any():
            top = np.full(overflow.sum(), np.nanmax(g[np.isfinite(g)]))
            ax.plot(depths[overflow], top, "x", color=plotting.COLORS[i])
    if m.plain_rate is not None and "plain" in m.first_grad:
        anchor = np.exp(np.log(m.first_grad["plain"]).mean(axis=0))
        i0 = int(np.argmax(depths >= M.FIT_FROM))
        ax.plot(
            depths,
            anchor[i0] * np.exp(m.plain_rate * (depths - depths[i0])),
            "k--",
            linewidth=0.9,
            label="theory (plain)",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="depth L",
        ylabel=r"$\|\partial L/\partial W_0\|_F$ at init",
        title="first-layer gradient at init",
    )
    plotting.value_ticks(ax, depths)
    lines = []
    if m.plain_slope is not None:
        lines.append(
            f"plain: d ln g / dL = {m.plain_slope:+.3f}\n    (theory {m.plain_rate:+.3f} +- {m.plain_tolerance:.3f})"
        )
    if m.residual_layernorm_power is not None:
        lines.append(
            f"res+LN: d ln g / d ln L = {m.residual_layernorm_power:+.2f}\n"
            f"    (<= {M.POLY_BOUND:g}; mean field {M.residual_layernorm_exponent():.2f})"
        )
    if lines:
        plotting.note(ax, "\n".join(lines), loc="upper left")
        lo, hi = ax.get_ylim()
        ax.set_ylim(lo, hi * (hi / lo) ** 0.6)  # head room for the note
    name = "Adam" if cfg["optim"]["name"] == "adam" else cfg["optim"]["name"]
    if len(lrs) == 1:
        _loss_panel(axes[0, 1], m, None, f"{name} lr {lrs[0]:g}")
    else:
        _loss_panel(axes[0, 1], m, None, "best lr")
        for col in range(len(lrs)):
            _loss_panel(axes[1, col], m, col, f"{name} lr {lrs[col]:g}")
    text = ["x: non-finite (overflow / diverged)", "dotted: best constant prediction"]
    if m.plain_stall is not None:
        text.append(f"plain, depth {depths[-1]}:\n    final / constant = {m.plain_stall:.2g}")
    if m.residual_layernorm_worst is not None:
        text.append(
            f"res+LN, worst {depths[0]}..{depths[-1]}:\n    final / constant = {m.residual_layernorm_worst:.2g}"
        )
    handles, labels = axes[0, 0].get_legend_handles_labels()
    axes[0, 2].legend(handles, labels, loc="upper left", frameon=False, fontsize=8)
    plotting.note(axes[0, 2], "\n".join(text), loc="lower left")
    for t in axes[0, 2].texts:
        t.set_in_layout(False)
    fig.suptitle(
        f"Depth sweep: {cfg['model']['activation']}, width {cfg['model']['width']}, "
        f"{cfg['model']['init']} init, {ds.sizes['step']} {cfg['optim']['name']} steps, "
        f"{ds.sizes['seed']} seeds",
        fontsize=10,
    )
    return {"": fig}


def _loss_panel(ax, m: M.Measured, lr_index: int | None, title: str):
    """Median over seeds of the final loss against depth, at one learning rate (None: the best)."""
    ax.axis("on")
    depths, chance = m.depths, m.constant_loss
    for i, (name, final) in enumerate(m.final_loss.items()):
        loss = np.min(final, axis=0) if lr_index is None else final[lr_index]
        median = np.median(loss, axis=0)
        ax.plot(
            depths,
            np.where(np.isfinite(median), median, np.nan),
            "-",
            color=plotting.COLORS[i],
            marker=plotting.MARKERS[i % len(plotting.MARKERS)],
            markersize=4,
            label=name,
        )
        diverged = ~np.isfinite(median)
        if diverged.any():
            ax.plot(
                depths[diverged],
                np.full(diverged.sum(), 3 * chance if np.isfinite(chance) else 1.0),
                "x",
                color=plotting.COLORS[i],
                markersize=7,
            )
    if np.isfinite(chance):
        ax.axhline(chance, color="0.3", linestyle=":", linewidth=0.9)
        ax.set_yscale("log")
        ax.set_ylim(max(ax.get_ylim()[0], 1e-8), 4 * chance)
    ax.set(xscale="log", yscale="log", xlabel="depth L", ylabel="final training loss", title=title)
    plotting.value_ticks(ax, depths)
