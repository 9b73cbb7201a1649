"""width_scaling's figures, from its stored results and Measured numbers (numpy and matplotlib only):
the coordinate check (each layer's change against width, per optimizer) and the first update's size."""

from __future__ import annotations

import matplotlib
import numpy as np

from gradlab import plotting, results
from gradlab.experiments import width_scaling as M

PANELS = {"input": "input projection h_0", "hidden": "last hidden layer h_L", "output": "output f (readout)"}
UPDATE_EXPONENTS = {  # per-entry RMS of the first update ~ width^p (see width_scaling's docstring)
    "sgd": {"input": -0.5, "hidden": -0.5, "output": 0.0},
    "adam": {"input": 0.0, "hidden": 0.0, "output": 0.0},
}
NAMES = {"sgd": "SGD", "adam": "Adam"}
PARAMS = {"sp": "SP", "mup": "muP", "ntk": "NTK"}


def _geometric_mean(values_SxN):
    return np.exp(np.log(values_SxN).mean(axis=0))


def _log_width_axis(ax, widths):
    ax.set(xscale="log", yscale="log")
    plotting.value_ticks(ax, widths)
    ax.set_xlabel("width n")


def draw(ds, m: M.Measured) -> dict:
    """{"": the coordinate check, "updates": the first update's per-entry size}."""
    cfg = results.run_config(ds)
    opts, steps = m.optimizers, m.steps
    colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, max(1, steps - 1)))
    rows = [("sp", opt) for opt in opts if m.act] + [("mup", opt) for opt in opts if m.mup]
    fig, axes = plotting.figure(len(rows), 4, width=3.3, height=2.8)
    for row, (param, opt) in enumerate(rows):
        for col, what in enumerate(PANELS):
            _change_panel(axes[row, col], ds, m, opt, what, colors, param)
            if col == 0:
                axes[row, col].set_ylabel(f"{PARAMS[param]}: RMS of h(t) - h(0)")
        if param == "sp":
            _activation_panel(axes[row, 3], ds, m, opt)
        else:
            _mup_summary(axes[row, 3], m, opt)
    handles, labels = axes[0, 2].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False, fontsize=8)
    base = cfg["model"]["base_width"]
    fig.suptitle(
        f"Coordinate check: {cfg['model']['activation']} MLP, depth {cfg['model']['depth']}, lr "
        f"{cfg['optim']['lr']:g}; SP: N(0, 1/fan_in) init, one lr at every width; muP (base width {base}): "
        f"readout init and hidden/readout lr scaled by width; {ds.sizes['seed']} seeds (line: median, band: min..max)",
        fontsize=10,
    )
    if not m.act:
        return {"": fig}
    return {"": fig, "updates": _updates_figure(ds, m, cfg["optim"]["lr"])}


def _mup_summary(ax, m: M.Measured, opt: str):
    """muP's checked slopes, written out (its activations need no panel of their own)."""
    ax.axis("off")
    lines = [
        f"{NAMES.get(opt, opt)}, muP: slope of RMS of h(1) - h(0)",
        f"against width (check: |slope| < {M.MUP_SLOPE:g})",
    ]
    lines += [f"  {what}: {m.mup[(opt, what, 1)][0]:+.3f} ± {m.mup[(opt, what, 1)][1]:.3f}" for what in PANELS]
    lines.append("SP's slopes (rows above) move with width:")
    lines += [f"  {what}: {m.change[(opt, what, 1)][0]:+.2f}" for what in PANELS if (opt, what, 1) in m.change]
    ax.text(0.02, 0.95, "\n".join(lines), transform=ax.transAxes, va="top", fontsize=8, family="monospace")


def _change_panel(ax, ds, m: M.Measured, opt: str, what: str, colors, param: str = "sp"):
    """RMS of h(t) - h(0) of one layer against width, every step t >= 1, with the fitted slopes."""
    widths, steps = m.widths, m.steps
    for t in range(1, steps):
        values = M.series(ds, "act_change_rms", opt, M.layer_index(ds)[what], t, param)
        plotting.band(ax, widths, values, f"t = {t}", color=colors[t - 1])
    lines = []
    slopes = m.change if param == "sp" else m.mup
    for t in sorted({1, steps - 1}):
        slope, err = slopes[(opt, what, t)]
        lines.append(f"t={t}: slope {slope:+.2f} ± {err:.2f}")
    if param == "mup":
        lines.insert(1, f"muP: width-independent, check |slope| < {M.MUP_SLOPE:g}")
    elif what == "output" and steps > 1:
        for share, style in (("readout", "--"), ("feature", ":")):
            values = M.series(ds, f"{share}_change_rms", opt, None, 1)
            ax.plot(widths, _geometric_mean(values), style, color="k", lw=1.0, label=f"t = 1, {share} share")
            slope, _ = m.change[(opt, share, 1)]
            lines.append(f"{share} share t=1: {slope:+.2f} (theory {M.EXPONENTS[opt][share]:+g})")
    if param == "sp":
        lines.insert(1, f"theory (t=1, leading): {M.EXPONENTS[opt][what]:+g}")
    _log_width_axis(ax, widths)
    plotting.note(ax, "\n".join(lines), loc="upper left")
    lo, hi = ax.get_ylim()
    widen = max(1.0, np.sqrt(100 * lo / hi))  # at least two decades, so the axis has labelled ticks
    lo, hi = lo / widen, hi * widen
    ax.set_ylim(lo, hi * (hi / lo) ** 0.7)  # head room for the note
    ax.set_title(f"{PARAMS[param]}, {NAMES.get(opt, opt)}: {PANELS[what]}", fontsize=9)


def _activation_panel(ax, ds, m: M.Measured, opt: str):
    """RMS of every layer's output against width, at init (solid) and at the last step (dashed)."""
    widths, last = m.widths, m.steps - 1
    lines, top = [], []
    for layer in range(ds.sizes["layer"]):
        label = "f" if layer == ds.sizes["layer"] - 1 else f"h_{layer}"
        start = M.series(ds, "act_rms", opt, layer, 0)
        end = M.series(ds, "act_rms", opt, layer, last)
        top += [start, end]
        color = plotting.COLORS[layer % len(plotting.COLORS)]
        ax.plot(widths, _geometric_mean(start), "o-", ms=3, color=color, label=label)
        ax.plot(widths, _geometric_mean(end), "--", color=color)
        slopes = m.act[(opt, layer, 0)][0], m.act[(opt, layer, last)][0]
        lines.append(f"{label}: {slopes[0]:+.3f} at t=0, {slopes[1]:+.2f} at t={last}")
    _log_width_axis(ax, widths)
    lo, hi = min(np.min(v) for v in top), max(np.max(v) for v in top)
    ax.set_ylim(lo / 4, hi * 40)  # at least two decades, as in the change panels, and room for the note
    plotting.note(ax, f"slopes (solid: t=0, dashed: t={last})\n" + "\n".join(lines), loc="upper left")
    ax.set_title(f"{NAMES.get(opt, opt)}: RMS of each layer's output", fontsize=9)
    ax.legend(loc="lower right", fontsize=6.5, ncol=2, frameon=False)
    ax.set_ylabel("RMS of h(t), probe batch")


def _updates_figure(ds, m: M.Measured, lr: float):
    """Per-entry RMS of each layer's first update against width, one panel per optimizer."""
    widths, opts, where = m.widths, m.optimizers, M.layer_index(ds)
    fig, axes = plotting.figure(1, len(opts), width=3.6, height=3.0)
    every = np.stack([M.series(ds, "update_rms", opt, layer, 0) for opt in opts for layer in where.values()])
    for col, opt in enumerate(opts):
        ax = axes[0, col]
        lines = []
        for i, (what, layer) in enumerate(where.items()):
            values = M.series(ds, "update_rms", opt, layer, 0)
            plotting.band(ax, widths, values, PANELS[what].rsplit(" ", 1)[0], color=plotting.COLORS[i])
            slope, err = m.update[(opt, what)]
            lines.append(f"{what}: {slope:+.3f} ± {err:.3f} (theory {UPDATE_EXPONENTS[opt][what]:+g})")
        if opt == "adam":
            ax.axhline(lr, color="k", ls=":", lw=1.0, label="lr (Adam's first step: lr sign g)")
        _log_width_axis(ax, widths)
        ax.set_ylim(np.min(every) / 30, np.max(every) * 30)  # one scale for both panels
        plotting.note(ax, "slope against width\n" + "\n".join(lines), loc="lower left")
        ax.set_title(f"{NAMES.get(opt, opt)}: first update, per-entry RMS of ΔW", fontsize=9)
        ax.set_ylabel("RMS of W(1) - W(0)")
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=len(labels), frameon=False, fontsize=8)
    fig.suptitle(f"Update size per layer under SP, lr {lr:g}, {ds.sizes['seed']} seeds", fontsize=10)
    return fig
