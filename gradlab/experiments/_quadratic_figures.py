"""quadratic's figure, from its stored results and Measured numbers (numpy and matplotlib only): each
optimizer's path on each surface at its fastest learning rate, and GD's |w_t| on the bowl on both
sides of the stability edge eta = 2 / lambda_max."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm
from matplotlib.lines import Line2D

from gradlab import plotting, results
from gradlab.experiments import quadratic as M
from gradlab.surfaces import gd_closed_form

CATALOG_LR = 0.15  # the catalog's example rate, quoted in the figure when the sweep holds it
FAR = 1.5  # a path reaching past FAR x the default view's half-extent is drawn leaving the view


def _view(surface: str, start, paths) -> tuple[tuple[float, float], tuple[float, float]]:
    """The panel's limits: round the start and the minimum, widened to hold every finite path that
    stays within FAR times that box's half-extent of its centre. A path that goes further (RMSProp's
    excursion on the bowl) would squash every other path into a corner: it is drawn leaving the
    view, with an arrow to where it goes."""
    x0, y0 = start
    if surface == "bowl":
        hx, hy = 1.35 * max(abs(x0), 0.5), 1.35 * max(abs(y0), 0.5)
        (xlo, xhi), (ylo, yhi) = (-hx, hx), (-hy, hy)
    else:
        (xlo, xhi), (ylo, yhi) = (min(x0, 1.0) - 0.8, max(x0, 1.0) + 0.8), (min(y0, 1.0) - 1.5, max(y0, 1.0) + 1.5)
    cx, cy, rx, ry = (xlo + xhi) / 2, (ylo + yhi) / 2, FAR * (xhi - xlo) / 2, FAR * (yhi - ylo) / 2
    for xy in paths:
        xy = xy[np.isfinite(xy).all(axis=1)]
        if len(xy) and np.all(np.abs(xy[:, 0] - cx) <= rx) and np.all(np.abs(xy[:, 1] - cy) <= ry):
            pad_x, pad_y = 0.05 * (np.ptp(xy[:, 0]) or 1.0), 0.05 * (np.ptp(xy[:, 1]) or 1.0)
            xlo, xhi = min(xlo, xy[:, 0].min() - pad_x), max(xhi, xy[:, 0].max() + pad_x)
            ylo, yhi = min(ylo, xy[:, 1].min() - pad_y), max(yhi, xy[:, 1].max() + pad_y)
    return (xlo, xhi), (ylo, yhi)


def _exit_arrow(ax, xy, inside, view, name: str, color) -> None:
    """An arrow to where a path first leaves the view, from a note of how far it goes (its farthest point)."""
    (xlo, xhi), (ylo, yhi) = view
    k = int(np.argmax(~inside))
    a, b = xy[max(k - 1, 0)], xy[k]
    # where segment a -> b crosses the view's edge: the largest fraction of it still inside
    fracs = [1.0]
    for lo, hi, i in ((xlo, xhi, 0), (ylo, yhi, 1)):
        d = b[i] - a[i]
        if d:
            fracs += [(edge - a[i]) / d for edge in (lo, hi) if 0 <= (edge - a[i]) / d <= 1]
    edge = a + min(f for f in fracs if np.all(np.isfinite(a + f * (b - a)))) * (b - a)
    finite = xy[np.isfinite(xy).all(axis=1)]
    far = finite[np.argmax(np.linalg.norm(finite, axis=1))]
    back = "" if not inside[k:].any() else ", then back"
    # the text in the corner on the exit's side, across the panel's height from it: the arrow runs
    # beside the other paths rather than through them
    left, low = edge[0] < (xlo + xhi) / 2, edge[1] < (ylo + yhi) / 2
    ax.annotate(
        f"{name} goes out\nto ({far[0]:.3g}, {far[1]:.3g}),\n|w| = {np.linalg.norm(far):.3g}{back}",
        xy=edge,
        xytext=(0.03 if left else 0.97, 0.97 if low else 0.03),
        textcoords="axes fraction",
        ha="left" if left else "right",
        va="top" if low else "bottom",
        fontsize="small",
        color=color,
        arrowprops=dict(arrowstyle="->", color=color, lw=1.0, shrinkA=2, shrinkB=0),
        bbox=dict(boxstyle="round,pad=0.3", facecolor="white", edgecolor=color, alpha=0.9),
        zorder=6,
    )


def _label(p: M.Path2D | None, updates: int) -> str:
    if p is None:
        return "diverged at every η"
    n = p.steps_to(M.TOLERANCE)
    decay = f" wd={p.weight_decay:g}" if p.weight_decay else ""
    reached = f"{n} steps" if n is not None else f"> {updates} steps"
    return f"η={p.lr:g}{decay}: {reached}"


def _contour_panel(ax, surface: str, chosen: dict[str, M.Path2D | None], start) -> dict[str, str]:
    """Each optimizer's path; returns {optimizer: its η and steps here} for the figure's one legend."""
    (xlo, xhi), (ylo, yhi) = _view(surface, start, [p.xy for p in chosen.values() if p is not None])
    x, y = np.meshgrid(np.linspace(xlo, xhi, 300), np.linspace(ylo, yhi, 300))
    z = M.SURFACE[surface].loss(x, y)
    levels = np.geomspace(max(z.min(), 1e-2), z.max(), 14)
    ax.contour(x, y, z, levels=levels, colors="0.7", linewidths=0.6)
    labels = {}
    for name, p in chosen.items():
        labels[name] = _label(p, 0 if p is None else len(p.xy) - 1)
        if p is None:
            continue
        inside = (p.xy[:, 0] >= xlo) & (p.xy[:, 0] <= xhi) & (p.xy[:, 1] >= ylo) & (p.xy[:, 1] <= yhi)
        i = list(M.LABELS).index(name)
        every = max(1, len(p.xy) // 12)  # a dozen markers along a path: its identity, not its steps
        ax.plot(p.xy[:, 0], p.xy[:, 1], color=plotting.COLORS[i % 8], marker=plotting.MARKERS[i % 8], markevery=every)
        if not inside.all():
            _exit_arrow(ax, p.xy, inside, ((xlo, xhi), (ylo, yhi)), M.LABELS[name], plotting.COLORS[i % 8])
    ax.plot(*start, "ko", ms=5, zorder=5)
    ax.plot(*M.SURFACE[surface].minimum, "k*", ms=9, zorder=5)
    ax.set(xlim=(xlo, xhi), ylim=(ylo, yhi), xlabel="$w_0$", ylabel="$w_1$")
    ax.set_title(f"{M.SURFACE[surface].title}\nfrom ({start[0]:g}, {start[1]:g})")
    return labels


def _stability_panel(ax, m: M.Measured):
    gd = m.gd
    span = min(len(gd[0].xy), 2 * M.CHECK_STEPS + 1)
    cmap = matplotlib.colormaps["viridis"]
    stable = [p.lr for p in gd if p.lr <= M.STABLE_LR]
    scale = LogNorm(min(stable), max(stable)) if len(stable) > 1 else None
    unstable = 0
    for p in gd:
        norm = np.linalg.norm(p.xy[:span], axis=1)
        if p.lr <= M.STABLE_LR:  # a sequence of rates: colour along viridis, read off the colour bar
            ax.plot(np.arange(span), norm, lw=1.0, color=cmap(0.85 * scale(p.lr) if scale else 0.0))
            continue
        ax.plot(  # each unstable rate its own dash and marker, named in the figure's legend
            np.arange(span),
            norm,
            lw=1.1,
            color="k",
            ls=plotting.LINESTYLES[1 + unstable],
            marker=plotting.MARKERS[1 + unstable],
            markevery=0.12,
            label=f"GD on the bowl, η={p.lr:g} > 0.25" + (" (diverged)" if p.diverged else ""),
        )
        unstable += 1
    if scale is not None:
        bar = ax.figure.colorbar(ScalarMappable(scale, cmap), ax=ax, pad=0.01, fraction=0.06)
        bar.set_label("η (stable)")
    ax.set_yscale("log")
    ax.set_ylim(1e-40, 1e10)  # room below the converging lines for the note
    ax.set(xlabel="update t", ylabel=r"$\|w_t\|$")
    ax.set_title(f"GD on the bowl: stable iff η < 2/8 = {M.STABLE_LR:g}")
    lines = []
    near = min(m.exact, key=lambda p: abs(p.lr - CATALOG_LR), default=None)
    if near is not None:
        t = min(M.CHECK_STEPS, len(near.xy) - 1)
        e = gd_closed_form(near.xy[0], near.lr, t)
        w = near.xy[t]
        lines.append(f"η={near.lr:g}, t={t}:\nw = ({w[0]:.4g}, {w[1]:.4g})\nexact ({e[0]:.4g}, {e[1]:.4g})")
    if m.unstable_growth is not None:
        p = next(p for p in gd if p.lr > M.STABLE_LR)
        lines.append(
            f"η={p.lr:g}: |w1| x{m.unstable_growth:.4g}/step"
            + (f",\nnon-finite after {int(np.argmax(~np.isfinite(p.loss)))} updates" if p.diverged else "")
        )
    if lines:
        plotting.note(ax, "\n".join(lines), loc="lower left")


def draw(ds, m: M.Measured) -> dict:
    """{"": the paths and, with GD on the bowl, its stability panel}."""
    panels = [s for s in M.SURFACES if s in m.best]
    fig, axes = plotting.figure(1, len(panels) + bool(m.gd), width=4.0, height=3.4)
    cfg = results.run_config(ds)
    found = {}
    for ax, surface in zip(axes[0], panels):
        start = cfg["start"] if surface == "bowl" else cfg["rosenbrock_start"]
        found[surface] = _contour_panel(ax, surface, m.best[surface], start)
    if m.gd:
        _stability_panel(axes[0, -1], m)
    # One legend: each optimizer's colour and marker, with its rate and steps on each surface.
    handles, labels = [], []
    for i, name in enumerate(M.LABELS):
        if any(name in f for f in found.values()):
            where = "; ".join(f"{s}: {f[name]}" for s, f in found.items() if name in f)
            handles.append(Line2D([], [], color=plotting.COLORS[i % 8], marker=plotting.MARKERS[i % 8]))
            labels.append(f"{M.LABELS[name]}: {where}")
    more_handles, more_labels = axes[0, -1].get_legend_handles_labels() if m.gd else ([], [])
    paper = getattr(fig, "gradlab_style", "screen") == "paper"
    if paper:  # two columns of these labels are wider than the page: one column, below taller panels
        fig.set_size_inches(fig.get_figwidth(), 2.4 + 0.16 * len(labels + more_labels))
    fig.legend(
        handles + more_handles, labels + more_labels, loc="outside lower center", ncol=1 if paper else 2, frameon=False
    )
    fig.suptitle(
        f"Optimizer paths at each one's fastest rate of the sweep ({ds.sizes['step']} updates; "
        f"steps until L stays ≤ {M.TOLERANCE:g})"
    )
    return {"": fig}
