"""clipping's figures, from its stored results and Measured numbers (numpy and matplotlib only):
training under each clipping rule (loss, pre-clip gradient norm, final loss against lr) and the
cliff of Pascanu et al. 2013 (`clipping_cliff`: loss and gradient surface, both descents' steps)."""

from __future__ import annotations

import warnings

import numpy as np

from gradlab import plotting, results
from gradlab.experiments import clipping as M
from gradlab.surfaces import CLIFF, Cliff


def draw(ds, m: M.Measured) -> dict:
    """{"": training under each clipping rule, "cliff": the cliff}."""
    return {"": _training_figure(ds, m), "cliff": _cliff_figure(M.stored_cliff(ds), m)}


def _training_figure(ds, m: M.Measured):
    cfg = results.run_config(ds)
    names = M.kinds(ds)
    lrs = ds["optim.lr"].values.astype(float)
    i = m.demo_lr_index
    thresholds = {
        "global_norm": f"τ={cfg['optim']['clip_threshold']:g}",
        "value": f"v={cfg['value_threshold']:g}",
        "agc": f"a={cfg['agc_threshold']:g}",
        "none": "",
    }
    fig, axes = plotting.figure(1, 3, width=3.8, height=3.0)
    steps = ds["step"].values
    for k, kind in enumerate(names):
        color = plotting.COLORS[k % len(plotting.COLORS)]
        frac = _clipped_steps(ds, kind)[i]
        bad = ds["diverged"].sel({"optim.clip": kind}).isel({"optim.lr": i}).values
        label = f"{M.KINDS.get(kind, kind)} {thresholds.get(kind, '')}".strip()
        if kind != "none":
            label += f": clipped {np.mean(frac):.0%} of steps"
        if kind in ("value", "agc"):  # global-norm clipping scales every entry of a clipped step
            with np.errstate(all="ignore"):
                entries = np.nanmean(M.by_kind(ds, "clipped_elements", kind)[i])
            label += f", {entries:.1%} of entries"
        if bad.any():
            first = ds["first_bad_step"].sel({"optim.clip": kind}).isel({"optim.lr": i}).values
            label += f"; {int(bad.sum())}/{bad.size} diverged (step {int(first[bad].min())})"
        with warnings.catch_warnings():  # a diverged run is all NaN after its first bad step
            warnings.simplefilter("ignore", RuntimeWarning)
            plotting.band(axes[0, 0], steps, M.by_kind(ds, "loss", kind)[i], label, color)
            plotting.band(axes[0, 1], steps, M.by_kind(ds, "grad_global_norm", kind)[i], label, color)
        final = M.final_loss(ds, kind)
        with np.errstate(all="ignore"):
            mid = np.median(final, axis=-1)
        ok = np.isfinite(mid)
        axes[0, 2].plot(lrs[ok], mid[ok], "o-", color=color, ms=3, label=label)
        axes[0, 2].plot(
            lrs[~ok],
            np.full((~ok).sum(), 0.95 - 0.05 * k),
            "x",
            color=color,
            ms=6,
            mew=1.5,
            transform=axes[0, 2].get_xaxis_transform(),
        )
    start = float(np.nanmedian(ds["loss"].isel(step=0).values))
    floor = np.nanmin(
        np.where(ds["loss"].isel({"optim.lr": i}).values > 0, ds["loss"].isel({"optim.lr": i}).values, np.nan)
    )
    axes[0, 0].set(
        yscale="log",
        xlabel="step",
        ylabel="training loss",
        title=f"loss, SGD lr={lrs[i]:.3g}",
        ylim=(0.5 * floor, 1e3 * start),
    )
    axes[0, 1].set(
        yscale="log",
        xlabel="step",
        ylabel="|g| before clipping",
        title=f"pre-clip global gradient norm, lr={lrs[i]:.3g}",
        ylim=(None, 1e6),
    )
    if "global_norm" in names:
        axes[0, 1].axhline(cfg["optim"]["clip_threshold"], color="k", lw=0.8, ls="--")
    axes[0, 2].set(
        xscale="log",
        yscale="log",
        xlabel="learning rate",
        ylabel="final loss (median over seeds)",
        title="final loss against lr (x: diverged)",
    )
    axes[0, 2].axvline(lrs[i], color="0.5", ls=":", lw=0.8)
    axes[0, 2].axhline(start, color="0.5", lw=0.8, ls="--")
    plotting.note(axes[0, 2], "dashed: loss at init\ndotted: lr of the left panels", loc="lower left")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False, fontsize=8)
    if m.update_error is not None:
        plotting.note(
            axes[0, 1], f"global norm: |update| = lr min(|g|, τ)\nmax rel. err {m.update_error:.1e}", loc="upper right"
        )
    fig.suptitle(
        f"Exploding gradients and clipping: depth-{cfg['model']['depth']} {cfg['model']['activation']} MLP, "
        f"init gain {cfg['model']['init_gain']:g}, full-batch SGD, {cfg['steps']} steps",
        fontsize=10,
    )
    return fig


PATHS = {"plain": ("#d55e00", "no clipping"), "clipped": ("#0072b2", "global norm τ={tau:g}")}  # colour, legend


def _cliff_figure(s: dict, m: M.Measured, cliff: Cliff = CLIFF):
    """The cliff's loss and |dL/dw| over (w, b) with both descents, and their step lengths; `s` as
    cliff_surface gives it."""
    fig, axes = plotting.figure(1, 3, width=3.8, height=3.1)
    ax = axes[0, 0]
    mesh = ax.pcolormesh(s["w"], s["b"], np.log10(s["loss"] + 1e-4).T, shading="auto", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="log10 loss")
    for key, shape in (("plain", "o"), ("clipped", "s")):  # a white halo keeps each path visible on the map
        ax.plot(*s[key].T, "-", color="white", lw=2.6, solid_capstyle="round")
        ax.plot(*s[key].T, "-", color=PATHS[key][0], marker=shape, ms=2.2, lw=0.9, mec="white", mew=0.3)
    ax.plot(*cliff.start, "*", color="#e69f00", mec="k", ms=10)
    ax.set(
        xlim=cliff.w_range[:2],
        ylim=cliff.b_range[:2],
        xlabel="w",
        ylabel="b",
        title=f"loss of x_t = w tanh(x_(t-1)) + b, T={cliff.steps}",
    )
    ax = axes[0, 1]
    grad = np.abs(s["grad"][..., 0])
    mesh = ax.pcolormesh(s["w"], s["b"], np.log10(grad + 1e-6).T, shading="auto", cmap="magma")
    fig.colorbar(mesh, ax=ax, label="log10 |dL/dw|")
    ratio = m.cliff_wall / m.cliff_median
    # the numbers in the title: a note on the map would cover the wall on a paper-sized panel
    title = f"the gradient wall: max |dL/dw| ≥ {m.cliff_wall:.3g},\n{ratio:.0f}× the median {m.cliff_median:.3g}"
    ax.set(xlabel="w", ylabel="b", title=title)
    ax = axes[0, 2]
    bound = cliff.lr * cliff.tau
    longest = {"plain": f"{m.thrown_step:.0f}", "clipped": f"{m.clipped_step:.3f}"}
    for key, shape in (("plain", "o"), ("clipped", "s")):
        color, name = PATHS[key]
        steps = M.step_lengths(s[key])
        ax.plot(
            np.arange(1, len(steps) + 1),
            steps,
            "-",
            color=color,
            marker=shape,
            ms=2.2,
            lw=0.9,
            label=f"{name.format(tau=cliff.tau)}: final loss {s[key + '_loss'][-1]:.2g}, "
            f"longest step {longest[key]}× lr τ",
        )
    ax.axhline(bound, color="k", ls="--", lw=0.8, label="lr τ: the clipped step's bound")
    ax.set(
        yscale="log",
        xlabel="iteration",
        ylabel="step length |Δ(w, b)|",
        title=f"gradient-descent steps, lr={cliff.lr:g}",
    )
    # one legend for the figure, below the panels: the paths on the loss map are these two
    handles, labels = ax.get_legend_handles_labels()
    paper = getattr(fig, "gradlab_style", "screen") == "paper"
    if paper:  # room for the two-line titles and the legend below 2-inch panels
        fig.set_size_inches(fig.get_figwidth(), 3.0)
    fig.legend(handles, labels, loc="outside lower center", ncol=2 if paper else len(labels), frameon=False)
    fig.suptitle(
        "The cliff (Pascanu et al. 2013): one step on the wall throws plain gradient descent away;\n"
        "clipped steps stay ≤ lr τ (paths start at the star)"
    )
    return fig


def _clipped_steps(ds, kind: str) -> np.ndarray:
    """(lr, seed): fraction of the steps run (before any divergence) whose gradient clipping changed."""
    scale = M.by_kind(ds, "clip_scale", kind)
    ran = np.isfinite(scale)
    with np.errstate(invalid="ignore"):
        hit = (scale < 1 - M.CLIPPED_RTOL) & ran
    return hit.sum(-1) / np.maximum(ran.sum(-1), 1)
