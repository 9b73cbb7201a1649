"""signal_propagation's figure, from its stored results and Measured numbers (numpy, matplotlib and
the numpy mean-field theory only): the measured phase diagram with the mean-field edge, example
gradient profiles, every point's growth rate against ln chi_1, and the correlation depth scale."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import TwoSlopeNorm

from gradlab import meanfield, plotting
from gradlab.experiments import signal_propagation as M


def _edges(v):
    """pcolormesh cell edges around the grid values v: the midpoints, and half a cell beyond each end."""
    mid = (v[1:] + v[:-1]) / 2
    return np.concatenate(
        [
            [v[0] - (mid[0] - v[0]) if len(v) > 1 else v[0] - 0.5],
            mid,
            [v[-1] + (v[-1] - mid[-1]) if len(v) > 1 else v[0] + 0.5],
        ]
    )


def critical_line(sb2_max: float):
    """(sigma_w^2, sigma_b^2) along the mean-field edge chi_1 = 1, up to sigma_b^2 = sb2_max."""
    sw2, sb2 = meanfield.critical_line(np.linspace(0.0, 3.0, 3000) ** 2)
    keep = sb2 <= sb2_max * 1.0001
    return sw2[keep], sb2[keep]


def draw(ds, m: M.Measured) -> dict:
    """{"": the four panels}."""
    fig, axes = plotting.figure(2, 2, width=4.3, height=3.3)
    _phase_panel(fig, axes[0, 0], m)
    _profiles_panel(axes[0, 1], ds, m)
    _against_theory_panel(axes[1, 0], m)
    _correlation_panel(axes[1, 1], m)
    fig.suptitle("Order to chaos in a deep tanh net at init (Poole et al. 2016; Schoenholz et al. 2017)", fontsize=10)
    return {"": fig}


def _phase_panel(fig, ax, m: M.Measured):
    """(a) The phase diagram: the measured growth rate on the grid, the mean-field edge."""
    limit = float(np.nanmax(np.abs(m.mean_rate))) or 1.0
    mesh = ax.pcolormesh(
        _edges(m.sw2),
        _edges(m.sb2),
        m.mean_rate.T,
        cmap="RdBu_r",
        norm=TwoSlopeNorm(0.0, -limit, limit),
        shading="flat",
    )
    fig.colorbar(mesh, ax=ax, label=r"measured $-$slope of $\ln\delta_l^2$ per layer")
    line_w, line_b = critical_line(float(m.sb2.max()) if m.sb2.max() > 0 else 0.3)
    ax.plot(line_w, line_b, color="black", lw=1.6, label=r"mean field $\chi_1 = 1$")
    ax.plot([1.0], [0.0], "o", color="black", ms=4, clip_on=False)
    ax.set_xlabel(r"$\sigma_w^2$")
    ax.set_ylabel(r"$\sigma_b^2$")
    ax.set_title("growth of $|\\partial L/\\partial h_l|^2$ toward the input")
    box = {"boxstyle": "round,pad=0.2", "facecolor": "white", "edgecolor": "none", "alpha": 0.8}
    ax.text(0.03, 0.97, "ordered: vanishing", transform=ax.transAxes, fontsize=7.5, va="top", bbox=box)
    ax.text(0.97, 0.97, "chaotic: exploding", transform=ax.transAxes, fontsize=7.5, va="top", ha="right", bbox=box)
    ax.legend(loc="lower right", fontsize=7)


def _profiles_panel(ax, ds, m: M.Measured):
    """(b) Example profiles, ln delta_l^2 against depth, with the mean-field slope: the most ordered
    point, the settled point nearest the edge, the most chaotic point."""
    delta = M.at_init(ds, "delta_rms")
    layers = np.arange(1, m.depth + 1)
    nearest_edge = np.abs(m.ln_chi) + 9 * ~m.settled  # the settled point closest to chi_1 = 1
    picks = [np.unravel_index(np.argmin(score), m.ln_chi.shape) for score in (m.ln_chi, nearest_edge, -m.ln_chi)]
    for k, (i, j) in enumerate(picks):
        y = np.log(delta[i, j][..., layers] ** 2)
        y = y - y[:, -1:]  # relative to the last hidden layer
        color = plotting.COLORS[k]
        label = (
            rf"$\sigma_w^2$={m.sw2[i]:.2g}, $\sigma_b^2$={m.sb2[j]:.2g}: "
            rf"$\ln\chi_1$={m.ln_chi[i, j]:+.3f}, fit {m.mean_rate[i, j]:+.3f}"
        )
        plotting.band(ax, layers, y, label, color=color, log=False)
        ax.plot(layers, m.ln_chi[i, j] * (m.depth - layers), ls="--", color=color, lw=1)
    ax.axvspan(0.5, m.skip + 0.5, color="0.85", alpha=0.6, lw=0)
    ax.text(m.skip / 2 + 0.5, 0.02, "not fitted", transform=ax.get_xaxis_transform(), ha="center", fontsize=7)
    ax.set_xlabel("hidden layer l (input side left)")
    ax.set_ylabel(r"$\ln \delta_l^2 - \ln \delta_L^2$")
    ax.set_title(r"profiles; dashed: slope $\ln\chi_1$ (mean field)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=6.5, frameon=False)


def _against_theory_panel(ax, m: M.Measured):
    """(c) The fitted growth rate against mean-field ln chi_1, every grid point."""
    for j, b in enumerate(m.sb2):
        ax.errorbar(
            m.ln_chi[:, j],
            m.mean_rate[:, j],
            yerr=np.nanstd(m.rate[:, j], axis=-1) / np.sqrt(m.seeds),
            fmt="o",
            ms=3,
            label=rf"$\sigma_b^2$={b:.2g}",
            color=plotting.COLORS[j % len(plotting.COLORS)],
        )
    lim = [float(np.nanmin(m.ln_chi)) - 0.05, float(np.nanmax(m.ln_chi)) + 0.05]
    ax.plot(lim, lim, color="black", lw=0.8)
    ax.set_xlabel(r"mean-field $\ln\chi_1$")
    ax.set_ylabel("fitted growth rate per layer")
    ax.set_title(f"width {m.width}, depth {m.depth}, {m.seeds} seeds, fit over {m.fit_layers} layers")
    ax.legend(loc="lower right", fontsize=6.5)
    lines = []
    if m.worst_settled is not None:
        lines.append(f"max |slope - ln χ₁| = {m.worst_settled:.4f}")
    lines.append(f"tolerance {m.tolerance:.4f}")
    plotting.note(ax, "\n".join(lines))


def _correlation_panel(ax, m: M.Measured):
    """(d) The correlation depth scale xi_c: mean field (lines) and measured (circles)."""
    fine = np.linspace(m.sw2.min(), m.sw2.max(), 120)
    for j, b in enumerate(m.sb2):
        if b <= 0:
            continue
        color = plotting.COLORS[j % len(plotting.COLORS)]
        theory = meanfield.xi_c(fine, b)
        ax.plot(
            fine, np.where(theory < 1e3, theory, np.nan), color=color, lw=1.2, label=rf"$\sigma_b^2$={b:.2g} theory"
        )
        ax.plot(m.sw2, m.xi_measured[:, j], "o", color=color, ms=4, mfc="none")
    ax.set_yscale("log")
    ax.set_xlabel(r"$\sigma_w^2$")
    ax.set_ylabel(r"correlation depth scale $\xi_c$ (layers)")
    ax.set_title(r"$\xi_c$: lines mean field (Schoenholz eq. 9), circles measured")
    if m.ordered_gap is not None:
        plotting.note(ax, f"ordered: max |1/ξ_meas - 1/ξ| = {m.ordered_gap:.4f}", loc="lower right")
    ax.legend(loc="upper left", fontsize=6.5)
