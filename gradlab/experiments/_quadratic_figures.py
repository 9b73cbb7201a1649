"""quadratic's figure, from its stored results and Measured numbers (numpy and matplotlib only): each
optimizer's path on each surface at its fastest learning rate, and GD's |w_t| on the bowl on both
sides of the stability edge eta = 2 / lambda_max."""

from __future__ import annotations

import matplotlib
import numpy as np

from gradlab import plotting, results
from gradlab.experiments import quadratic as M

CATALOG_LR = 0.15  # the catalog's example rate, quoted in the figure when the sweep holds it


def _view(surface: str, start) -> tuple[tuple[float, float], tuple[float, float]]:
    x0, y0 = start
    if surface == "bowl":
        hx, hy = 1.35 * max(abs(x0), 0.5), 1.35 * max(abs(y0), 0.5)
        return (-hx, hx), (-hy, hy)
    return (min(x0, 1.0) - 0.8, max(x0, 1.0) + 0.8), (min(y0, 1.0) - 1.5, max(y0, 1.0) + 1.5)


def _label(p: M.Path2D, updates: int) -> str:
    n = p.steps_to(M.TOLERANCE)
    decay = f" wd={p.weight_decay:g}" if p.weight_decay else ""
    reached = f"{n} steps" if n is not None else f"> {updates} steps"
    return f"{M.LABELS[p.optimizer]} (η={p.lr:g}{decay}): {reached}"


def _contour_panel(ax, surface: str, chosen: dict[str, M.Path2D | None], start):
    (xlo, xhi), (ylo, yhi) = _view(surface, start)
    x, y = np.meshgrid(np.linspace(xlo, xhi, 300), np.linspace(ylo, yhi, 300))
    z = M.SURFACE[surface].loss(x, y)
    levels = np.geomspace(max(z.min(), 1e-2), z.max(), 14)
    ax.contour(x, y, z, levels=levels, colors="0.7", linewidths=0.6)
    for name, p in chosen.items():
        color = plotting.COLORS[list(M.LABELS).index(name) % len(plotting.COLORS)]
        if p is None:
            ax.plot([], [], color=color, ls=":", label=f"{M.LABELS[name]}: diverged at every η of the sweep")
            continue
        inside = (p.xy[:, 0] >= xlo) & (p.xy[:, 0] <= xhi) & (p.xy[:, 1] >= ylo) & (p.xy[:, 1] <= yhi)
        far = np.abs(p.xy[~inside]).max(initial=0.0)
        ax.plot(
            p.xy[:, 0],
            p.xy[:, 1],
            color=color,
            lw=1.2,
            marker="." if len(p.xy) <= 80 else None,
            ms=3,
            label=_label(p, len(p.xy) - 1) + (f" (off view: |w| to {far:.3g})" if far else ""),
        )
    ax.plot(*start, "ko", ms=5, zorder=5)
    ax.plot(*M.SURFACE[surface].minimum, "k*", ms=9, zorder=5)
    ax.set(xlim=(xlo, xhi), ylim=(ylo, yhi), xlabel="$w_0$", ylabel="$w_1$")
    ax.set_title(
        f"{M.SURFACE[surface].title}\nfrom ({start[0]:g}, {start[1]:g}); steps until L stays $\\leq$ {M.TOLERANCE:g}"
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=1, frameon=False)


def _stability_panel(ax, m: M.Measured):
    gd = m.gd
    span = min(len(gd[0].xy), 2 * M.CHECK_STEPS + 1)
    cmap = matplotlib.colormaps["viridis"]
    for i, p in enumerate(gd):
        unstable = p.lr > M.STABLE_LR
        norm = np.linalg.norm(p.xy[:span], axis=1)
        ax.plot(
            np.arange(span),
            norm,
            lw=1.0,
            ls="--" if unstable else "-",
            color="#d1495b" if unstable else cmap(i / max(1, len(gd) - 1) * 0.85),
            label=f"η={p.lr:g}" + (" (diverged)" if p.diverged else ""),
        )
    ax.set_yscale("log")
    ax.set_ylim(1e-24, 1e10)  # room below the converging lines for the note
    ax.set(xlabel="update t", ylabel=r"$\|w_t\|$")
    ax.set_title(f"GD on the bowl: stable iff η < 2/8 = {M.STABLE_LR:g}")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    lines = []
    near = min(m.exact, key=lambda p: abs(p.lr - CATALOG_LR), default=None)
    if near is not None:
        t = min(M.CHECK_STEPS, len(near.xy) - 1)
        e = M.closed_form(near.xy[0], near.lr, t)
        lines.append(
            f"η={near.lr:g}, t={t}: w=({near.xy[t][0]:.4g}, {near.xy[t][1]:.4g})\nclosed form ({e[0]:.4g}, {e[1]:.4g})"
        )
    if m.unstable_growth is not None:
        p = next(p for p in gd if p.lr > M.STABLE_LR)
        lines.append(
            f"η={p.lr:g}: |w1| x{m.unstable_growth:.4g}/step"
            + (f", non-finite after {int(np.argmax(~np.isfinite(p.loss)))} updates" if p.diverged else "")
        )
    if lines:
        plotting.note(ax, "\n".join(lines), loc="lower left")


def draw(ds, m: M.Measured) -> dict:
    """{"": the paths and, with GD on the bowl, its stability panel}."""
    panels = [s for s in M.SURFACES if s in m.best]
    fig, axes = plotting.figure(1, len(panels) + bool(m.gd), width=4.0, height=4.0)
    cfg = results.run_config(ds)
    for ax, surface in zip(axes[0], panels):
        _contour_panel(ax, surface, m.best[surface], cfg["start"] if surface == "bowl" else cfg["rosenbrock_start"])
    if m.gd:
        _stability_panel(axes[0, -1], m)
    fig.suptitle(
        f"Optimizer paths, each at its fastest learning rate of the sweep ({ds.sizes['step']} updates)", fontsize=10
    )
    return {"": fig}
