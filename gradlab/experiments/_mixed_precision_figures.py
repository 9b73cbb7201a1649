"""mixed_precision's figure, from its stored results and Measured numbers (numpy and matplotlib only):
the fp32 run's gradients against float16's range, the loss of every lane, the gradients float16
flushes, the dynamic loss scale, and the updates float16 weights lose to rounding."""

from __future__ import annotations

import warnings

import numpy as np

from gradlab import plotting, precision, results
from gradlab.experiments import mixed_precision as M

LANES = [
    ("float32", "none", "fp32"),
    ("bfloat16", "none", "bf16"),
    ("float16", "none", "fp16, no scaling"),
    ("float16", "static", "fp16, static scale"),
    ("float16", "dynamic", "fp16, dynamic scale"),
]


def _pow2(x: float) -> str:
    return f"2^{np.log2(x):.0f}" if x > 0 and float(np.log2(x)).is_integer() else f"{x:g}"


def _stairs(ax, bins: np.ndarray, share, shift=0.0, **kw):
    """A histogram over left-edge `bins` of unit width, in percent."""
    ax.stairs(100 * share, np.append(bins, bins[-1] + 1).astype(float) + shift, **kw)


def _range_panel(ax, ds, m: M.Measured, flush_fp32: float, late: slice, static_scale: float):
    """Histogram of log2|g| of the fp32 run over late training, against float16's range."""
    lane = M.lane(ds, "float32", "none").isel(step=late)
    lo_sub, lo_norm, hi = np.log2(m.float16_range[:3])
    ax.axvspan(precision.GRAD_BINS[0], lo_sub - 1, color="#d55e00", alpha=0.12, lw=0)
    ax.axvspan(lo_sub - 1, lo_norm, color="#e69f00", alpha=0.18, lw=0)
    ax.axvspan(hi, precision.GRAD_BINS[-1] + 1, color="0.5", alpha=0.15, lw=0)
    share = {name: lane[name].mean(("step", "seed")).values.astype(float) for name in ("grad_hist", "act_grad_hist")}
    _stairs(
        ax,
        precision.GRAD_BINS,
        share["grad_hist"],
        color=plotting.COLORS[0],
        fill=True,
        alpha=0.55,
        lw=1.3,
        label="weight grads",
    )
    _stairs(
        ax,
        precision.GRAD_BINS,
        share["act_grad_hist"],
        color=plotting.COLORS[5],
        lw=1.3,
        label="activation grads dL/dh",
    )
    _stairs(
        ax,
        precision.GRAD_BINS,
        share["grad_hist"],
        np.log2(static_scale),
        color=plotting.COLORS[0],
        ls="--",
        lw=1.0,
        label=f"weight grads x {_pow2(static_scale)} (static scale)",
    )
    ax.set_ylim(0, 1.75 * ax.get_ylim()[1])
    for x in (lo_sub, lo_norm, hi):
        ax.axvline(x, color="k", lw=0.8, ls=":")
    marks = ax.secondary_xaxis("top")
    marks.set_xticks([lo_sub, lo_norm, hi], ["subnormal\n2^-24", "normal\n2^-14", "max\n65504"], fontsize=6.5)
    marks.tick_params(length=2, pad=1)
    ax.set_xlim(-48, 18)
    w_sub, a_flush = float(lane["grad_subnormal"].mean()), float(lane["act_grad_flush"].mean())
    plotting.note(
        ax,
        f"in fp16 (|g| <= 2^-25 -> 0):\nweights: {100 * flush_fp32:.1f}% flush to 0,\n"
        f"{100 * w_sub:.1f}% subnormal\nactivations: {100 * a_flush:.1f}% flush to 0",
        loc="upper right",
    )
    ax.set(
        xlabel="log2 |gradient|  (fp32 run, last quarter of training)",
        ylabel="% of entries",
        title="fp32 run's gradients vs float16's range",
    )
    ax.legend(loc="upper left", fontsize=6.5, frameon=False)


def _series(lane, var: str) -> np.ndarray:
    return lane[var].transpose("seed", "step").values


def draw(ds, m: M.Measured) -> dict:
    """{"": the figure}: six panels, the dynamic-scaling ones only where the fp16 dynamic lane ran."""
    cfg = results.run_config(ds)
    lanes = [lane for lane in LANES if lane[0] in m.dtypes and lane[1] in m.modes]
    late, steps = M.late_steps(ds), ds["step"].values
    fig, axes = plotting.figure(2, 3, width=4.3, height=3.2)
    if m.flush_fp32 is not None:
        _range_panel(axes[0, 0], ds, m, m.flush_fp32, late, cfg["static_scale"])

    ax = axes[0, 1]
    for i, (dtype, mode, label) in enumerate(lanes):
        plotting.band(ax, steps, _series(M.lane(ds, dtype, mode), "loss"), label, color=plotting.COLORS[i], log=True)
    ax.set(
        yscale="log",
        xlabel="step",
        ylabel="training loss (median, min-max over seeds)",
        title=f"training loss (x {_pow2(cfg['loss_weight'])} in the gradient)",
    )
    ax.legend(loc="lower left", fontsize=6.5, frameon=False)
    gaps, text = m.gaps, []
    if gaps is not None:
        text = [f"fp16 {mode} scaling: {gap:.2g} (<= {gaps.seed_range:.3g})" for mode, gap in gaps.scaled]
        if gaps.unscaled is not None:
            text.append(f"fp16 unscaled: {gaps.unscaled:.2g} (> {gaps.seed_range:.3g})")
    if text:
        plotting.note(ax, "|Δ log final loss| vs fp32\n" + "\n".join(text), loc="upper right")

    ax = axes[0, 2]
    if "float16" in m.dtypes:
        for i, (dtype, mode, label) in enumerate(lanes):
            if dtype == "float16":
                zero = _series(M.lane(ds, dtype, mode), "grad_zero")
                ax.plot(steps, 100 * np.median(zero, axis=0), color=plotting.COLORS[i], label=f"{label}: zero")
        if "float32" in m.dtypes:
            flush = _series(M.lane(ds, "float32", "none"), "grad_flush")
            ax.plot(
                steps,
                100 * np.median(flush, axis=0),
                color=plotting.COLORS[0],
                ls="--",
                label="fp32 run: |g| <= 2^-25 (would flush)",
            )
        ax.set(xlabel="step", ylabel="% of weight-gradient entries", title="gradients lost to float16 underflow")
        ax.legend(loc="center right", fontsize=6.5, frameon=False)

    d = m.dynamic
    if d is not None:
        ax = axes[1, 0]
        lane = M.lane(ds, "float16", "dynamic").isel(seed=0)
        scale, bad = lane["scale"].values.astype(float), lane["nonfinite"].values > 0
        ax.step(steps, np.log2(scale), where="post", color=plotting.COLORS[4], label="loss scale (log2)")
        ax.plot(
            steps[bad],
            np.log2(scale[bad]),
            "x",
            color=plotting.COLORS[1],
            ms=6,
            mew=1.5,
            label="non-finite gradients: step skipped",
        )
        ax.set(xlabel="step", ylabel="log2 loss scale", title=f"dynamic loss scaling (fp16, seed {int(lane['seed'])})")
        ax.legend(loc="lower right", fontsize=6.5, frameon=False)
        plotting.note(
            ax,
            f"all seeds: {d.halvings} halvings (= skipped steps),\n"
            f"{d.doublings} doublings after {m.growth_interval} finite steps;\n"
            f"steps off the replayed rule: {d.scale_mismatch}",
            loc="upper right",
        )

        ax = axes[1, 1]
        lane = M.lane(ds, "float16", "dynamic")
        mass = lane["update_mass"].where(lane["update_mass"] > 0)  # skipped steps moved nothing
        for name, color, label in (
            ("fp16", plotting.COLORS[1], "weights kept in fp16"),
            ("fp32", plotting.COLORS[0], "fp32 master weights"),
        ):
            with warnings.catch_warnings():  # steps every seed skipped have no update to lose
                warnings.simplefilter("ignore", RuntimeWarning)
                frac, closed = (
                    np.nanmedian((lane[f"lost_mass_{name}{kind}"] / mass).transpose("seed", "step").values, axis=0)
                    for kind in ("", "_closed")
                )
            ax.plot(steps, 100 * frac, color=color, label=f"{label}: w + u == w")
            every = max(1, len(steps) // 25)
            ax.plot(
                steps[::every],
                100 * closed[::every],
                "o",
                color=color,
                ms=3,
                mfc="none",
                label=f"{label}: closed form |u| < gap/2",
            )
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set(xlabel="step", ylabel="% of update mass Σ|u| lost", title="updates lost to rounding (fp16 dynamic run)")
        ax.legend(loc="center left", bbox_to_anchor=(0.25, 0.45), fontsize=6.5, frameon=False)
        plotting.note(
            ax,
            f"last quarter: fp16 weights lose {100 * d.lost_fp16:.1f}%,\n"
            f"master weights {100 * d.lost_fp32:.2g}% ({d.lost_fp32_bound:.2g} bound)",
            loc="upper left",
        )

        ax = axes[1, 2]
        lane = M.lane(ds, "float16", "dynamic").isel(step=late)
        ax.axvspan(precision.HALF_GAP_BINS[0], 0, color="#d55e00", alpha=0.12, lw=0)
        for name, color, label in (
            ("fp16", plotting.COLORS[1], "fp16 weights"),
            ("fp32", plotting.COLORS[0], "fp32 weights"),
        ):
            counts = lane[f"half_gap_hist_{name}"].sum(("step", "seed")).values.astype(float)
            _stairs(
                ax,
                precision.HALF_GAP_BINS,
                counts / max(counts.sum(), 1),
                color=color,
                lw=1.3,
                fill=name == "fp16",
                alpha=0.5 if name == "fp16" else 1.0,
                label=label,
            )
        ax.text(
            precision.HALF_GAP_BINS[0] + 0.5,
            0.9,
            "lost:\n|u| < gap/2",
            transform=ax.get_xaxis_transform(),
            fontsize=7,
            color="#d55e00",
            va="top",
        )
        ax.set(
            xlabel="log2( |u| / (half the gap to w's neighbour) )",
            ylabel="% of updates (last quarter)",
            title="update size vs the weight's spacing",
        )
        ax.legend(loc="upper center", fontsize=6.5, frameon=False)
    fig.suptitle(
        f"Mixed precision: depth-{cfg['model']['depth']} tanh MLP, {cfg['data']['task']}, "
        f"{cfg['optim']['name']}, {cfg['steps']} full-batch steps, {ds.sizes['seed']} seeds",
        fontsize=10,
    )
    return {"": fig}
