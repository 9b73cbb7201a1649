"""One figure style for every experiment. matplotlib only; never imports jax.

The style is applied while gradlab draws (`style(...)`, which `experiments.draw` enters), never on
import: importing gradlab leaves matplotlib's backend and rcParams as the user set them. Figures
are `matplotlib.figure.Figure` objects, not pyplot's, so drawing and saving need no display and
no backend switch; a Jupyter user's own inline plots keep theirs.

Two presets: `screen` (panels about 3.4 in wide at 9 pt) and `paper` (the whole figure 3.3 in
wide for one column or 7.0 in for two, 8 pt). Both embed TrueType (Type 42) fonts in PDF and
pair each colour of a colour-blind-safe palette (Okabe & Ito) with a marker, so no series
depends on colour alone.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib  # also reached as plotting.matplotlib by figure code
import numpy as np
from matplotlib.collections import Collection, PathCollection, QuadMesh
from matplotlib.colors import to_hex
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.rcsetup import cycler  # matplotlib.cycler, which the stubs do not export
from matplotlib.text import Text

from gradlab.results import atomic_write

if TYPE_CHECKING:
    from matplotlib.typing import RcKeyType  # for the checker only: recent matplotlib releases alone define it

# Okabe & Ito (2008), "Color Universal Design": distinct under the common colour-vision deficiencies.
# Yellow last: it is faint on white.
COLORS = ["#0072b2", "#d55e00", "#009e73", "#cc79a7", "#e69f00", "#56b4e9", "#000000", "#f0e442"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]  # MARKERS[i] goes with COLORS[i]
LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1)), (0, (3, 1, 1, 1, 1, 1)), (0, (1, 2)), (0, (8, 2))]
STYLES = ("screen", "paper")
PAPER_WIDTHS = (3.3, 7.0)  # inches: one journal column, two columns
PAPER_MIN_ROW = 2.0  # inches: no row of panels shorter on paper
PAPER_MIN_FONT = 7.0  # points: no text smaller on paper, whatever a figure asked for
DENSE = 500  # a collection with more elements than this is rasterised in vector output

_BASE: dict[str, Any] = {
    "pdf.fonttype": 42,  # TrueType, not Type 3: what journals and arXiv ask for
    "ps.fonttype": 42,
    "svg.fonttype": "none",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.alpha": 0.25,
    "axes.prop_cycle": cycler(color=COLORS),
    "lines.markersize": 3.5,
    "image.cmap": "viridis",
    "savefig.bbox": "tight",
}
_PRESETS: dict[str, dict[str, Any]] = {
    "screen": {
        "font.size": 9,
        "axes.titlesize": 10,
        "axes.labelsize": 9,
        "xtick.labelsize": 8,
        "ytick.labelsize": 8,
        "legend.fontsize": 7.5,
        "lines.linewidth": 1.4,
        "savefig.dpi": 150,
    },
    "paper": {
        "font.size": 8,
        "axes.titlesize": 8.5,
        "figure.titlesize": 9,
        "axes.labelsize": 8,
        "xtick.labelsize": 8,
        "ytick.labelsize": 8,
        "legend.fontsize": 8,
        "lines.linewidth": 1.1,
        "lines.markersize": 3.0,
        "axes.linewidth": 0.6,
        "savefig.dpi": 300,
        "savefig.pad_inches": 0.02,
    },
}
_active: contextvars.ContextVar[str] = contextvars.ContextVar("gradlab_style", default="screen")


def rc(name: str = "screen") -> dict[RcKeyType, Any]:
    """The rcParams of a preset (`screen` or `paper`)."""
    if name not in _PRESETS:
        raise ValueError(f"unknown figure style {name!r}; known: {', '.join(STYLES)}")
    return {**_BASE, **_PRESETS[name]}  # pyright: ignore[reportReturnType]  (keys are rcParams names)


@contextlib.contextmanager
def style(name: str = "screen") -> Iterator[None]:
    """Draw (and save) in a preset: rcParams for the block, restored after it."""
    params = rc(name)
    token = _active.set(name)
    try:
        with matplotlib.rc_context(params):
            yield
    finally:
        _active.reset(token)


class StyledFigure(Figure):
    """A Figure that remembers the preset it was drawn in and saves in it, wherever it is saved
    from (so `gradlab.plot(ds).savefig("f.pdf")` embeds TrueType fonts too)."""

    gradlab_style = "screen"

    def savefig(self, *args, **kwargs):
        with style(self.gradlab_style):
            return super().savefig(*args, **kwargs)


def figure(rows: int, cols: int, width: float = 3.4, height: float = 2.7, **kw):
    """A figure of rows x cols panels in the active preset; returns (fig, axes 2-D array).

    `width` and `height` are one panel's size on screen; on paper the whole figure is scaled to
    one column (a single column of panels) or two, keeping its shape.
    """
    name = _active.get()
    w, h = width * cols, height * rows
    if name == "paper":
        scale = PAPER_WIDTHS[cols > 1] / w
        w, h = w * scale, max(h * scale, PAPER_MIN_ROW * rows)  # rows tall enough for 8 pt labels
    with style(name):
        fig = StyledFigure(figsize=(w, h), layout="constrained")
        fig.gradlab_style = name
        axes = fig.subplots(rows, cols, squeeze=False, **kw)
    return fig, axes


def series(i: int) -> dict[str, Any]:
    """Colour, marker and line style of series i, paired so that none is told apart by colour alone."""
    return {"color": COLORS[i % len(COLORS)], "marker": MARKERS[i % len(MARKERS)], "linestyle": LINESTYLES[i % 8]}


def _solid(line: Line2D) -> bool:
    return line.get_linestyle() in ("-", "solid")


def sparse_marks(line: Line2D, marks: int = 10) -> int | None:
    """A markevery for about `marks` markers on a long line (None: one on every point of a short one).

    An integer stride, not matplotlib's fractional form, which fails on a line with no finite point."""
    n = np.size(np.asarray(line.get_xdata()))
    return max(1, n // marks) if n > 12 else None


def _pair_marker(line: Line2D, in_legend: bool) -> None:
    """Give a solid, markerless line of palette colour i the palette's marker i."""
    if not _solid(line) or line.get_marker() not in (None, "None", "none", "", " "):
        return
    try:
        i = COLORS.index(to_hex(line.get_color()))
    except ValueError:
        return
    line.set_marker(MARKERS[i])
    if not in_legend:  # a legend handle keeps its own (one marker, mid-line)
        line.set_markevery(sparse_marks(line))
    line.set_markeredgewidth(0.0)


def finish(fig: Figure) -> Figure:
    """What every gradlab figure gets after its experiment drew it: each palette colour's marker on
    its solid lines (and their legend entries), dense meshes and scatters rasterised in vector
    output, and on paper no text below PAPER_MIN_FONT."""
    for ax in fig.axes:
        for line in ax.lines:
            _pair_marker(line, in_legend=False)
        for coll in ax.collections:
            if _dense(coll):
                coll.set_rasterized(True)
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes]
    for legend in legends:
        if legend is None:
            continue
        for handle in legend.legend_handles:
            if isinstance(handle, Line2D):
                _pair_marker(handle, in_legend=True)
    if getattr(fig, "gradlab_style", "screen") == "paper":
        for text in fig.findobj(Text):
            if isinstance(text, Text) and float(text.get_fontsize()) < PAPER_MIN_FONT:
                text.set_fontsize(PAPER_MIN_FONT)
    return fig


def _dense(coll: Collection) -> bool:
    if isinstance(coll, QuadMesh):
        return True
    if isinstance(coll, PathCollection):
        return np.shape(coll.get_offsets())[0] > DENSE
    return len(coll.get_paths()) > DENSE


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
        fontsize="small",
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
    """Write `stem`.png and `stem`.pdf atomically (in the style the figure was drawn in); returns their paths."""
    stem = Path(stem)
    paths = []
    for ext in ("png", "pdf"):
        path = stem.with_suffix(f".{ext}")
        atomic_write(path, lambda tmp, ext=ext: fig.savefig(tmp, format=ext, bbox_inches="tight"))
        paths.append(path)
    return paths
