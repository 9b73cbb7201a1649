"""remat's figure, from its Measured numbers (numpy and matplotlib only): compiled temp memory and step
time against depth with and without jax.checkpoint per block, and their ratios (memory for compute)."""

from __future__ import annotations

import numpy as np

from gradlab import plotting
from gradlab.experiments import remat as M


def draw(ds, m: M.Measured) -> dict:
    tab, fits, unit, width = m.profiles, m.slopes, m.unit, m.width
    fig, axes = plotting.figure(1, 3, width=3.8, height=3.2)
    labels = {False: "no remat", True: "remat (jax.checkpoint per block)"}
    colors = {False: plotting.COLORS[1], True: plotting.COLORS[0]}
    ax = axes[0, 0]
    for remat, t in tab.items():
        d = t["depth_measured"]
        ax.plot(d, t["temp_bytes"] / 2**20, "o-", color=colors[remat], label=labels[remat])
        ax.plot(d, (t["temp_bytes"][0] + fits[remat][1] * (d - d[0])) / 2**20, ":", color="k", lw=1)
    ax.set(xlabel="depth (hidden blocks)", ylabel="compiled temp memory (MiB)")
    ax.set_title("temp memory, forward + backward", fontsize=9)
    lines = ["slope per layer in B·W·4 bytes:"]
    lines += [
        f"  {'remat' if r else 'plain'}: {fits[r][0] / unit:.3f} (vjp residuals: {fits[r][1] / unit:.0f})" for r in fits
    ]
    if len(fits) == 2:
        lines.append(f"ratio {fits[True][0] / fits[False][0]:.3f} (expected {fits[True][1] / fits[False][1]:.3f})")
    lines.append("dotted: residual count x depth")
    plotting.note(ax, "\n".join(lines), loc="upper left")
    ax.legend(loc="lower right", frameon=False, fontsize=7)

    ax = axes[0, 1]
    for remat, t in tab.items():
        ax.plot(t["depth_measured"], t["step_seconds"] * 1e3, "o-", color=colors[remat], label=labels[remat])
    ax.set(xlabel="depth (hidden blocks)", ylabel="ms per forward + backward")
    ax.set_title(f"step time (median of {m.timing_repeats} after warm-up)", fontsize=9)
    if len(tab) == 2:
        ratio = tab[True]["step_seconds"] / tab[False]["step_seconds"]
        plotting.note(
            ax,
            f"time remat/plain: median {np.median(ratio):.2f}\n(range {ratio.min():.2f}..{ratio.max():.2f};"
            " shared CPU, noisy)",
            loc="upper left",
        )

    ax = axes[0, 2]
    if len(tab) == 2 and m.extra_flops is not None:  # set with both remat values
        d = tab[False]["depth_measured"]
        block = 6 * m.batch * width * width  # forward 2 B W^2 + backward 4 B W^2 flops per block
        compute = (block + m.extra_flops) / block
        memory_limit = fits[True][1] / fits[False][1]
        ax.plot(
            d, tab[True]["temp_bytes"] / tab[False]["temp_bytes"], "o-", color=plotting.COLORS[2], label="temp memory"
        )
        ax.plot(
            d,
            tab[True]["step_seconds"] / tab[False]["step_seconds"],
            "s-",
            color=plotting.COLORS[3],
            label="time (measured)",
        )
        ax.axhline(
            memory_limit, color=plotting.COLORS[2], ls=":", lw=1.2, label=f"memory slope ratio {memory_limit:.2f}"
        )
        ax.axhline(compute, color=plotting.COLORS[3], ls=":", lw=1.2, label=f"flops per block {compute:.3f}")
        ax.set_xscale("log", base=2)
        top = float(np.nanmax(tab[True]["step_seconds"] / tab[False]["step_seconds"]))
        ax.set_ylim(0, max(1.9, top * 1.15))
        ax.legend(loc="lower left", frameon=False, fontsize=7)
        plotting.note(
            ax,
            f"flops per block: (6 + 2)/6 B W² = {compute:.3f}\n(XLA cost analysis: +2 B W² per\n"
            "scan body, one forward re-run)",
            loc="upper right",
        )
    ax.set(xlabel="depth (hidden blocks)", ylabel="remat / plain")
    ax.set_title("the trade: memory for compute", fontsize=9)
    extra = (
        f"; {m.steps} training steps remat vs plain: max rel. diff {m.train_rel_diff:.1e}"
        if m.train_rel_diff is not None
        else ""
    )
    fig.suptitle(f"Activation checkpointing: {m.activation} MLP, width {width}, batch {m.batch}{extra}", fontsize=10)
    return {"": fig}
