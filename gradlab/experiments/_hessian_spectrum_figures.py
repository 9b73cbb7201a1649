"""hessian_spectrum's figure: SLQ densities (log y) at init and after training per variant, the check
net's density against its exact eigenvalues, and least squares against the Marchenko-Pastur law."""

from __future__ import annotations

import numpy as np

from gradlab import curvature, plotting

FLOOR = 1e-5  # densities are drawn down to this


def _grid(nodes, pad: float = 0.08, points: int = 600) -> np.ndarray:
    lo, hi = float(np.min(nodes)), float(np.max(nodes))
    span = max(hi - lo, 1e-12)
    return np.linspace(lo - pad * span, hi + pad * span, points)


def _density(ax, nodes, weights, label, color, ls="-"):
    grid = _grid(nodes)
    sigma = 0.01 * (grid[-1] - grid[0])
    ax.plot(
        grid, np.maximum(curvature.slq_density(nodes, weights, grid, sigma), FLOOR), color=color, ls=ls, label=label
    )


def draw(m, steps: int) -> dict:
    fig, axes = plotting.figure(1, 4, width=3.4, height=2.9)
    names = list(dict.fromkeys(s.name for s in m.spectra))
    for col, when in enumerate(("init", "trained")):
        ax = axes[0, col]
        for i, name in enumerate(names):
            s = next(s for s in m.spectra if s.name == name and s.when == when)
            label = f"{name}: λmax {s.top:.3g}, bulk {s.bulk():.0%}"
            _density(ax, s.nodes, s.weights, label, plotting.COLORS[i % len(plotting.COLORS)])
        ax.set_title("Hessian density at init" if when == "init" else f"after {steps} steps of GD")
        ax.legend(loc="upper right", frameon=False, fontsize=6.5, title="bulk: mass within 5% λmax of 0")
        ax.set_xlabel("eigenvalue λ")
    axes[0, 0].set_ylabel("density (SLQ, Gaussian-smoothed)")

    ax = axes[0, 2]
    nodes, weights = m.check_nodes
    _density(ax, nodes, weights, "SLQ", plotting.COLORS[0])
    hist, edges = np.histogram(m.check_eigs, bins=60, density=True)
    ax.stairs(np.maximum(hist, FLOOR), edges, color=plotting.COLORS[1], label="eigh (histogram)")
    ax.axvline(m.check_eigs[-1], color="0.4", ls=":", lw=0.9)
    ax.set_title(f"check net: {m.check_params} params")
    ax.legend(loc="upper right", bbox_to_anchor=(1.0, 0.72), frameon=False, fontsize=6.5)
    plotting.note(
        ax,
        f"λmax rel. error {m.lambda_error:.1e} (< 1e-3)\n"
        f"moments k ≤ {2 * m.moment_steps - 1}: {m.moment_error:.1e} (< 1e-3)\n"
        f"k = {2 * m.moment_steps + 1}: {m.moment_error_beyond:.1e} (not exact)",
        loc="upper left",
    )
    ax.set_xlabel("eigenvalue λ")

    ax = axes[0, 3]
    nodes, weights = m.mp_nodes
    _density(ax, nodes, weights, "SLQ", plotting.COLORS[0])
    lo, hi = 0.25, 2.25
    x = np.linspace(lo, hi, 400)
    law = np.sqrt(np.maximum((hi - x) * (x - lo), 0)) / (2 * np.pi * 0.25 * x)
    ax.plot(x, np.maximum(law, FLOOR), color=plotting.COLORS[1], ls="--", label="Marchenko-Pastur, d/n = 1/4")
    for edge in (lo, hi):
        ax.axvline(edge, color="0.4", ls=":", lw=0.9)
    ax.set_title("least squares, Gaussian inputs")
    ax.legend(loc="upper right", frameon=False, fontsize=6.5)
    plotting.note(ax, f"edges {m.mp_edges[0]:.4f}, {m.mp_edges[1]:.4f}\n(0.25, 2.25 ± 5%)", loc="lower left")
    ax.set_xlabel("eigenvalue λ")
    for ax in axes.flat:
        ax.set_yscale("log")
        ax.set_ylim(FLOOR, 1e3)  # headroom for the legends and notes above the densities
    return {"": fig}
