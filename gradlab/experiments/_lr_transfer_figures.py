"""lr_transfer's figure, from its stored results and Measured numbers (numpy and matplotlib only): final
loss against learning rate, one panel per optimizer x parametrization, a curve per width."""

from __future__ import annotations

import matplotlib
import numpy as np

from gradlab import plotting, results
from gradlab.experiments import lr_transfer as M

NAMES = {"sp": "SP", "ntk": "NTK", "mup": "muP"}


def _log2_label(x: float) -> str:
    return f"2^{np.log2(x):.0f}" if np.isfinite(x) else "none"


def draw(ds, m: M.Measured) -> dict:
    opts = list(dict.fromkeys(c.optimizer for c in m.curves))
    names = list(dict.fromkeys(c.parametrization for c in m.curves))
    fig, axes = plotting.figure(len(opts), len(names), width=3.5, height=3.0, sharey="row")
    finite = np.concatenate([c.final[np.isfinite(c.final)] for c in m.curves])
    slowest = np.concatenate([c.final[:, 0] for c in m.curves])  # the smallest rate: about the loss at init
    lo, hi = float(finite.min()), 2.0 * float(np.max(slowest[np.isfinite(slowest)], initial=finite.max()))
    for c in m.curves:
        ax = axes[opts.index(c.optimizer), names.index(c.parametrization)]
        colors = matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, len(c.widths)))
        for i, width in enumerate(c.widths):
            shown = np.where(np.isfinite(c.final[i]), np.minimum(c.final[i], hi), np.nan)
            ax.plot(c.lrs, shown, ".-", ms=3, color=colors[i], label=f"width {width}")
            over = ~np.isfinite(c.final[i]) | (c.final[i] > hi)
            ax.plot(c.lrs[over], np.full(over.sum(), hi), "x", color=colors[i], ms=4)
            ax.plot(c.best[i], c.best_loss[i], "*", ms=11, color=colors[i], mec="k", mew=0.6, zorder=5)
        ax.set(xscale="log", yscale="log", ylim=(lo / 1.5, hi * 1.3))
        ax.set_xscale("log", base=2)
        ax.set_title(f"{NAMES.get(c.parametrization, c.parametrization)}, {c.optimizer}")
        lines = [f"best lr: {_log2_label(c.best[0])} at {c.widths[0]}, {_log2_label(c.best[-1])} at {c.widths[-1]}"]
        lines.append(f"shift: {c.shift:+.0f} steps (x{2**c.shift:.3g})")
        if c.parametrization == "mup":
            lines.append(f"check: |shift| <= {M.MUP_SHIFT:g}")
        elif c.parametrization == "sp":
            lines.append(f"check: |shift| >= {M.SP_SHIFT:g}")
        plotting.note(ax, "\n".join(lines), loc="upper left")
        ax.set_xlabel("learning rate")
        if names.index(c.parametrization) == 0:
            ax.set_ylabel(f"final train loss (last {M.TAIL} steps)")
    plotting.legend_outside(fig, axes[0, -1], fontsize=7.5)
    cfg = results.run_config(ds)
    model = cfg["model"]
    fig.suptitle(
        f"LR transfer: {model['activation']} MLP, {model['depth'] + 1} hidden layers, "
        f"base width {model['base_width']}, "
        f"{cfg['steps']} steps, batch {cfg['data']['batch_size']}, {ds.sizes['seed']} seed(s), median; "
        f"* best lr, x diverged or off the axis",
        fontsize=9,
    )
    return {"": fig}
