"""lr_sweep's figure, from its stored results and Measured numbers (numpy and matplotlib only): final loss
against peak learning rate per optimizer and norm, each curve's sensitivity and divergence edge, and GD's 2/λ₀."""

from __future__ import annotations

import numpy as np
from matplotlib.lines import Line2D

from gradlab import plotting, results
from gradlab.experiments import lr_sweep as M


def draw(ds, m: M.Measured) -> dict:
    found = m.curves
    names = list(dict.fromkeys(c.name for c in found))
    norms = list(dict.fromkeys(c.norm for c in found))
    fig, axes = plotting.figure(len(norms), len(names), width=3.6, height=3.0, sharex=True, sharey="row")
    top = 3.0 * max(c.initial for c in found)
    styles: dict[str, dict] = {}  # one colour, marker and dash per variant, the same in every panel
    for row, norm in enumerate(norms):
        for col, name in enumerate(names):
            ax = axes[row, col]
            numbers = []
            for i, c in enumerate(c for c in found if c.name == name and c.norm == norm):
                style = styles.setdefault(c.label, plotting.series(len(styles)))
                color = style["color"]
                shown = np.where(np.isfinite(c.final), np.minimum(c.final, top), np.nan)
                edge = c.edge()
                edge_text = f"{edge:.2g}" if np.isfinite(edge) else "none"
                ax.plot(c.lrs, shown, **style, ms=3, label=c.label)
                numbers.append(f"{c.label}: {c.sensitivity():.2f}, {edge_text}")
                lift = top * 1.6**i  # one row of markers per curve above the data
                ax.plot(c.lrs[c.diverged], np.full(c.diverged.sum(), lift), "x", color=color, ms=4, mew=1.1)
                over = np.isfinite(c.final) & (c.final > top)
                ax.plot(c.lrs[over], np.full(over.sum(), lift), "^", color=color, ms=3.5, mfc="none")
                ax.axhline(c.initial, color="0.6", lw=0.8, ls="--")
            gd = [c for c in found if c.name == name and c.norm == norm and not c.warmup and not c.clip]
            if gd and np.isfinite(gd[0].sharpness).any():
                x = 2.0 / float(np.median(gd[0].sharpness))
                ax.axvline(x, color="0.3", ls=":", lw=1)
                ax.annotate(
                    "2/λ₀",
                    (x, 0.62),
                    xycoords=("data", "axes fraction"),
                    fontsize=7,
                    color="0.3",
                    rotation=90,
                    ha="right",
                    va="center",
                )
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title(f"{name}, norm={norm}")
            # The panel's numbers in a box placed where it covers the fewest points (loc="best").
            blank = [Line2D([], [], ls="none") for _ in numbers]
            box = ax.legend(
                blank, numbers, loc="best", title="S, edge", handlelength=0, handletextpad=0, labelspacing=0.15
            )
            box.get_frame().set(edgecolor="0.8", alpha=0.9)
            if col == 0:
                seeds = ds.sizes["seed"]
                ax.set_ylabel(
                    f"final loss (last {M.TAIL} steps" + (f", median of {seeds} seeds)" if seeds > 1 else ")")
                )
            if row == len(norms) - 1:
                ax.set_xlabel("peak learning rate")
    if m.gd_rise is not None and "sgd" in names:
        plotting.note(
            axes[0, names.index("sgd")],
            f"plain GD: loss first rises\nat {m.gd_rise:.2f} x 2/λ₀ (≥ {M.GD_BOUND:g})",
            loc="lower left",
        )
    edges = [(what, ratio) for what, (ratio, _, _) in m.edge_shifts.items()]
    if m.layernorm_edge is not None:
        edges.append(("layernorm (not a check)", m.layernorm_edge))
    shifts = ", ".join(f"{what} x{ratio:.3g}" for what, ratio in edges)
    cfg = results.run_config(ds)
    marks = [
        Line2D([], [], color="0.3", marker="x", ls="none", label="diverged"),
        Line2D([], [], color="0.3", marker="^", mfc="none", ls="none", label="above the axis"),
        Line2D([], [], color="0.6", ls="--", lw=0.8, label="loss at init $L_0$"),
        Line2D([], [], color="0.3", ls=":", label="2/λ₀ (GD's stability edge)"),
    ]
    handles = [Line2D([], [], **style, ms=3, label=label) for label, style in styles.items()] + marks
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=4,
        frameon=False,
        title="S: LR sensitivity E[min(L, L0) - L*]/L0 (Wortsman et al. 2023); "
        "edge: the first lr past the best that diverges or ends above L0",
        title_fontsize="small",
    )
    fig.suptitle(
        f"Final loss against peak learning rate ({cfg['steps']} steps)"
        + (f"\nedge with / without, min over curves: {shifts}" if shifts else "")
    )
    return {"": fig}
