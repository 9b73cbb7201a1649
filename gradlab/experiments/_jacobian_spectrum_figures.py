"""jacobian_spectrum's figure, from its Measured numbers (numpy and matplotlib only): the singular values of
dh_L/dh_0 per activation and init across depths, and their spectral variance r against free probability."""

from __future__ import annotations

import numpy as np

from gradlab import plotting
from gradlab.experiments import jacobian_spectrum as M

R_FLOOR = 1e-2  # the r panels' lower limit (an orthogonal linear net's r ~ 1e-12 is stated instead)
LOG_S_RANGE = (-5.0, 1.5)  # histogram range of log10 s; values beyond are drawn in the end bins


def draw(ds, m: M.Measured) -> dict:
    acts, schemes, depths, g = m.activations, m.schemes, m.depths, m.gain
    mean, se, theory = m.mean, m.se, m.theory
    label = {"lecun_normal": "Gaussian", "orthogonal": "orthogonal"}
    fig, axes = plotting.figure(len(acts), len(schemes) + 1, width=3.3, height=2.5)
    bins = np.linspace(*LOG_S_RANGE, 66)
    colors = {d: plotting.COLORS[k % len(plotting.COLORS)] for k, d in enumerate(depths)}
    for row, act in enumerate(acts):
        for col, scheme in enumerate(schemes):
            ax = axes[row, col]
            a, i = acts.index(act), schemes.index(scheme)
            for d, depth in enumerate(depths):
                logs = np.log10(np.clip(m.singular[a, i, g, d].ravel(), 10 ** bins[0], 10 ** bins[-1]))
                ax.hist(logs, bins=bins, density=True, histtype="step", color=colors[depth], label=f"L = {depth}")
            ax.axvline(0.0, color="black", lw=0.6, ls=":")
            ax.set_title(f"{act}, {label.get(scheme, scheme)}")
            ax.set_yscale("log")
            ax.set_ylim(1e-2, None)
            if col == 0:
                ax.set_ylabel("density")
            if row == len(acts) - 1:
                ax.set_xlabel(r"$\log_{10} s$ of $\partial h_L/\partial h_0$ (ends: clipped)")
            r_text = ", ".join(f"{mean[a, i, g, d]:.2g}" for d in range(len(depths)))
            plotting.note(ax, f"r(L = {', '.join(map(str, depths))})\n= {r_text}", loc="upper left")
        ax = axes[row, -1]
        for i, scheme in enumerate(schemes):
            a = acts.index(act)
            color = plotting.COLORS[i]
            shown = np.where(mean[a, i, g] >= R_FLOOR, mean[a, i, g], np.nan)
            ax.errorbar(
                depths,
                shown,
                yerr=se[a, i, g],
                fmt="o",
                ms=4,
                color=color,
                label=f"{label.get(scheme, scheme)} measured",
            )
            ax.plot(
                depths,
                np.where(theory[a, i, g] >= R_FLOOR, theory[a, i, g], np.nan),
                color=color,
                lw=1.2,
                label=f"{label.get(scheme, scheme)} free prob.",
            )
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylim(R_FLOOR, None)
        ax.set_title(f"{act}: spectral variance r")
        ax.set_ylabel(r"$r = \mathrm{Var}(s^2)/\mathrm{E}[s^2]^2$")
        if row == len(acts) - 1:
            ax.set_xlabel("depth L")
        if act == "linear" and m.isometry_error is not None:
            r_orth = np.nanmax(mean[acts.index(act), schemes.index("orthogonal"), g])
            plotting.note(
                ax, f"orthogonal (theory 0): r <= {r_orth:.1e},\nmax|s-1| = {m.isometry_error:.1e}", loc="lower right"
            )
    plotting.legend_outside(fig, axes[0, 0])
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right lower", frameon=False, fontsize=7)
    fig.suptitle(
        f"Jacobian spectra at criticality, width {m.width} (Saxe et al. 2014; Pennington et al. 2017); "
        f"max |r - r_th|/tol = {m.variance_ratio:.2f}",
        fontsize=10,
    )
    return {"": fig}
