"""batch_size's figure, from its stored results and Measured numbers (numpy and matplotlib only): loss
against examples seen under each lr rule, k x B accumulated against kB, the noise scale along
training, and each batch's loss relative to the base batch's."""

from __future__ import annotations

import warnings

import numpy as np

from gradlab import plotting, results
from gradlab.experiments import batch_size as M


def draw(ds, m: M.Measured) -> dict:
    """{"": the figure}."""
    cfg = results.run_config(ds)
    base, steps = cfg["base_batch"], ds.sizes["step"]
    warm = float(max(ds["warmup_epochs"].values))
    fig, axes = plotting.figure(2, 3, width=3.7, height=3.0)
    groups = [(b, k) for b, k in M.runs(ds) if k == 1 or (b * k, 1) not in M.runs(ds)]
    colors = {b * k: plotting.COLORS[i % len(plotting.COLORS)] for i, (b, k) in enumerate(groups)}
    start = float(np.median(ds["loss"].isel(step=0).values))
    panels = [
        (axes[0, 0], 1.0, warm, f"linear rule + warmup ({warm:g} epochs)"),
        (axes[0, 1], 1.0, 0.0, "linear rule, no warmup"),
        (axes[0, 2], 0.0, 0.0, "fixed lr (no scaling)"),
    ]
    for ax, scaling, w, title in panels:
        for b, k in groups:
            label = f"B={b * k}" + (f" ({b}x{k})" if k > 1 else "")
            loss = M.smoothed(M.select(ds, b, k, lr_scaling=scaling, warmup_epochs=w)["loss"].values, b)
            with warnings.catch_warnings():  # steps after every seed diverged: all nan, drawn as a gap
                warnings.simplefilter("ignore", RuntimeWarning)
                mid = np.nanmedian(loss, axis=0)
            seen = (np.arange(loss.shape[-1]) + 1) * b
            ax.plot(seen, np.minimum(mid, 3 * start), color=colors[b * k], lw=1.2, label=label)
            bad = M.select(ds, b, k, lr_scaling=scaling, warmup_epochs=w)["first_bad_step"].values.ravel()
            for step in bad[bad >= 0]:  # a diverged seed: x where it went non-finite, at the top
                ax.plot(seen[step], 3 * start, "x", color=colors[b * k], ms=6, mew=1.5)
        ax.axvline(base * steps, color="0.5", ls=":", lw=1)
        ax.set(xscale="log", yscale="log", xlabel="examples seen", title=title)
        ax.set_ylim(top=4 * start)
    axes[0, 0].set_ylabel(f"minibatch loss (mean over {M.WINDOW_EXAMPLES} examples)")
    axes[0, 0].legend(loc="lower left", frameon=False, fontsize=6.5)

    # Accumulation: k x B against kB, loss per update.
    ax = axes[1, 0]
    for b, k in M.runs(ds):
        if k > 1 and (b * k, 1) in M.runs(ds):
            acc = np.nanmedian(
                M.per_update(M.select(ds, b, k, lr_scaling=0.0, warmup_epochs=0.0)["loss"].values, k), axis=0
            )
            big = np.nanmedian(M.select(ds, b * k, 1, lr_scaling=0.0, warmup_epochs=0.0)["loss"].values, axis=0)[
                : len(acc)
            ]
            ax.plot(big, color=colors[b * k], lw=2.5, alpha=0.45, label=f"B={b * k}")
            ax.plot(acc, color="k", lw=0.8, ls="--", label="k x B accumulated" if b == min(M.runs(ds))[0] else None)
    if m.accumulation_pairs:
        plotting.note(
            ax, f"max rel. diff, first {M.ACCUMULATION_UPDATES}\nupdates: {m.accumulation_error:.2g}", loc="lower left"
        )
    ax.set(
        yscale="log",
        xlabel="optimizer update",
        ylabel="loss of the update's batch",
        title="MultiSteps: k x B against kB (fixed lr)",
    )
    ax.legend(loc="upper right", frameon=False, fontsize=6.5)

    # Noise scale along training, per effective batch (fixed lr lanes).
    ax = axes[1, 1]
    for b, k in groups:
        n = ds.sizes["step"]
        window = max(4, n // 16)
        centres, values = [], []
        for lo in range(0, n - window + 1, window):
            centres.append((lo + window / 2) * b)
            values.append(M.noise_scale(ds, b, k, slice(lo, lo + window)))
        ax.plot(
            centres,
            np.where(np.asarray(values) > 0, values, np.nan),
            "o-",
            ms=2.5,
            color=colors[b * k],
            lw=1,
            label=f"B={b * k}",
        )
    if m.noise_scale is not None:
        ax.axhline(m.noise_scale, color="0.3", ls=":", lw=1)
        at_init = M.noise_scale(ds, base, 1, slice(0, max(2, steps // 16)))
        plotting.note(
            ax,
            f"B={base}: B_simple {at_init:.0f} at first,\n{m.noise_scale:.0f} over its last quarter",
            loc="lower right",
        )
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="examples seen",
        ylabel=r"$B_{simple} = tr(\Sigma)/|G|^2$",
        title="noise scale (McCandlish et al. 2018)",
    )

    # Summary: loss at the base run's examples against batch size.
    ax = axes[1, 2]
    if m.table is not None:
        bs = np.array([base] + [r[0] for r in m.table])
        for j, (label, marker) in enumerate([("linear + warmup", "o"), ("linear", "s"), ("fixed lr", "^")]):
            ratio = np.array([1.0] + [r[1 + j] for r in m.table])
            ax.plot(
                bs,
                np.where(np.isfinite(ratio), ratio, np.nan),
                marker=marker,
                ms=4,
                lw=1,
                label=label,
                color=plotting.COLORS[j],
            )
            for b in bs[~np.isfinite(ratio)]:
                ax.plot(b, 5 * 1.3**j, "x", ms=7, mew=1.5, color=plotting.COLORS[j])
        ax.axhline(M.HOLDS, color="0.5", ls="--", lw=0.8)
        ax.axvline(m.noise_scale, color="0.3", ls=":", lw=1)
        ax.annotate(" B_simple", (m.noise_scale, 0.55), xycoords=("data", "axes fraction"), fontsize=7, color="0.3")
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False, fontsize=6.5)
    ax.set(
        xscale="log",
        yscale="log",
        ylim=(0.8, 40),
        xlabel="effective batch size B",
        ylabel=f"loss / B={base}'s at {base * steps} examples",
        title="does the rule hold? (x: diverged)",
    )
    notes = (
        ([f"B <= B_simple = {m.noise_scale:.0f}: {m.holds[1]:.3g} (<= {M.HOLDS:g}: holds)"] if m.holds else [])
        + ([f"B >= 2 B_simple: {m.breaks[1]:.3g} (> {M.HOLDS:g}: breaks)"] if m.breaks else [])
        + (
            [f"linear rule at B={m.warmup_gain[0]}: {m.warmup_gain[1]:.3g} (> 1: warmup helps)"]
            if m.warmup_gain
            else []
        )
    )
    if notes:
        plotting.note(ax, "\n".join(notes), loc="upper left")
    fig.suptitle(
        f"Batch size: {cfg['optim']['name']} at lr {cfg['optim']['lr']:g} x (B/{base})^s, {steps} steps each, "
        f"{cfg['data']['examples']} examples, {ds.sizes['seed']} seeds (median); dotted: the base run's end",
        fontsize=9.5,
    )
    return {"": fig}
