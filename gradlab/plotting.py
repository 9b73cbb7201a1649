"""One figure style for every experiment. matplotlib only; never imports jax."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
from matplotlib.rcsetup import cycler  # matplotlib.cycler, which the stubs do not export

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType  # for the checker only: recent matplotlib releases alone define it

matplotlib.use("Agg", force=False)
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from gradlab.results import atomic_write  # noqa: E402

COLORS = ["#1b6ca8", "#d1495b", "#66a182", "#edae49", "#8d6a9f", "#2e4057", "#00798c", "#a05a2c"]
STYLE: dict[RcKeyType, Any] = {
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 7.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "lines.linewidth": 1.4,
    "axes.prop_cycle": cycler(color=COLORS),
    "savefig.bbox": "tight",
}


def figure(rows: int, cols: int, width: float = 3.4, height: float = 2.7, **kw):
    """A figure of rows x cols panels in the project's style; returns (fig, axes 2-D array)."""
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(
            rows, cols, figsize=(width * cols, height * rows), squeeze=False, layout="constrained", **kw
        )
    for ax in axes.flat:
        for key, value in STYLE.items():
            if key.startswith("axes.spines."):
                ax.spines[key.rsplit(".", 1)[1]].set_visible(value)
        ax.grid(True, alpha=STYLE["grid.alpha"])
    return fig, axes


def band(ax, x, samples, label: str, color=None, log: bool = True):
    """Median over the first axis of `samples` as a line, its min..max as a shaded band."""
    samples = np.asarray(samples, float)
    if log:
        samples = np.where(samples > 0, samples, np.nan)
    with np.errstate(all="ignore"), warnings.catch_warnings():  # a step no sample reached: a gap, quietly
        warnings.filterwarnings("ignore", "All-NaN", RuntimeWarning)
        mid = np.nanmedian(samples, axis=0)
        lo, hi = np.nanmin(samples, axis=0), np.nanmax(samples, axis=0)
    (line,) = ax.plot(x, mid, label=label, color=color)
    ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.18, linewidth=0)
    return line


def note(ax, text: str, loc: str = "upper left"):
    """A small boxed annotation in a panel corner: where the measured number goes."""
    x, ha = (0.03, "left") if "left" in loc else (0.97, "right")
    y, va = (0.97, "top") if "upper" in loc else (0.03, "bottom")
    ax.text(
        x,
        y,
        text,
        transform=ax.transAxes,
        ha=ha,
        va=va,
        fontsize=7.5,
        bbox=dict(boxstyle="round,pad=0.3", facecolor="white", edgecolor="0.8", alpha=0.9),
    )


def value_ticks(ax, values):
    """x ticks at exactly `values`, labelled with them, no minor ticks: a log axis over a few swept values."""
    ax.set_xticks(values, [str(v) for v in values])
    ax.minorticks_off()


def legend_outside(fig, ax, **kw):
    """One legend for the figure, right of the panels, from `ax`'s lines."""
    handles, labels = ax.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", frameon=False, **kw)


def save(fig, stem: Path) -> list[Path]:
    """Write `stem`.png and `stem`.pdf atomically; returns their paths."""
    stem = Path(stem)
    paths = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix(f".{ext}")
        atomic_write(path, lambda tmp, ext=ext: fig.savefig(tmp, format=ext, dpi=150, bbox_inches="tight"))
        paths.append(path)
    plt.close(fig)
    return paths
