"""rnn_bptt's figures, from its stored results and Measured numbers (numpy and matplotlib only): the
input gradient against the distance to the loss per cell, at init and after training, and the
training loss per cell, length and clipping threshold (`rnn_bptt_training`)."""

from __future__ import annotations

import numpy as np

from gradlab import analysis, plotting, results
from gradlab.experiments import rnn_bptt as M

CELL_NAMES = {"simple": "vanilla RNN (SimpleCell)", "lstm": "LSTM", "gru": "GRU"}
NO_CLIP = 1e6  # thresholds at or above this are drawn and reported as "no clipping"
SMOOTH = 5  # loss curves: running mean over this many steps (drawn at the window's last step)
TAIL = 20  # final loss / accuracy: mean of the last TAIL steps


def final(ds, var: str) -> np.ndarray:
    """Mean of `var` over the last TAIL steps: (cell, seq_len, lr, clip, seed)."""
    return analysis.tail_mean(ds[var].transpose(*M.AXES, "step").values, TAIL)


def _clip_label(threshold: float) -> str:
    return "no clipping" if threshold >= NO_CLIP else f"clip {threshold:g}"


def draw(ds, m: M.Measured) -> dict:
    """{"": the gradient through time, "training": the loss curves}."""
    cfg = results.run_config(ds)
    colors = {T: plotting.COLORS[i % len(plotting.COLORS)] for i, T in enumerate(m.lengths)}
    fig, best_lr = _gradient_figure(ds, m, colors)
    fig.suptitle(
        f"Gradient through time, loss at the last step (hidden {cfg['hidden']}, batch {cfg['batch']})"
        + (f"; vanilla vs mean field: max err {m.vanilla.mean_field_error:.3f}" if m.vanilla is not None else ""),
        fontsize=10,
    )
    fig2 = _training_figure(ds, m, colors, best_lr)
    fig2.suptitle(
        f"Recall the first input's sign after T steps: {cfg['optim']['name']}, "
        f"median over {ds.sizes['seed']} seeds (band: min..max)",
        fontsize=10,
    )
    return {"": fig, "training": fig2}


def _gradient_figure(ds, m: M.Measured, colors):
    """Gradient against distance, at init and after training, per cell; and each cell's lr drawn after
    training (the best final loss at the longest length, no clipping if present)."""
    cells, lengths = m.cells, m.lengths
    lrs = ds["optim.lr"].values.astype(float)
    clips = ds["optim.clip_threshold"].values.astype(float)
    last = ds.sizes["step"] - 1
    fig, axes = plotting.figure(2, len(cells), width=3.5, height=2.8)
    best_lr = {}
    for col, cell in enumerate(cells):
        for row, (step, when) in enumerate(((0, "at init"), (last, f"after {last} steps"))):
            ax = axes[row, col]
            prof = M.profile(ds, cell, step)
            sl = m.slopes[cell, step]
            text = []
            c = int(np.argmax(clips)) if row else 0
            i = int(np.nanargmin(np.nanmedian(final(ds, "loss")[cells.index(cell), -1, :, c], axis=-1))) if row else 0
            best_lr[cell] = lrs[i]
            for j, T in enumerate(lengths):
                k = np.arange(prof.shape[-1])
                plotting.band(ax, k[:T], prof[j, i, c, :, :T], label=f"T = {T}", color=colors[T])
                text.append(f"T={T}: {np.nanmedian(sl[j, i, c]):+.3f}")
            ax.set_yscale("log")
            ax.set_title(
                f"{CELL_NAMES[cell]}, {when}" + (f"\n(lr {lrs[i]:g}, {_clip_label(clips[c])})" if row else ""),
                fontsize=9,
            )
            ax.set_xlabel("distance to the loss T - 1 - t")
            if col == 0:
                ax.set_ylabel(r"$\|\partial \ell / \partial x_t\|$ (median, min..max seeds)")
            if cell == "simple" and row == 0 and m.mean_field is not None:
                mf = np.nanmedian(m.mean_field, axis=(1, 2, 3))
                for j, T in enumerate(lengths):
                    k = np.arange(M.FIT_SKIP, T)
                    start = np.nanmedian(prof[j, 0, 0, :, M.FIT_SKIP])
                    ax.plot(k, start * np.exp(mf[j] * (k - M.FIT_SKIP)), ":", color="k", lw=1)
                text.append(f"dotted: mean field {np.nanmean(mf):+.3f}")
            plotting.note(ax, "log-slope per step:\n" + "\n".join(text), loc="lower left")
    axes[0, -1].legend(loc="upper right", frameon=False, fontsize=7)
    return fig, best_lr


def _training_figure(ds, m: M.Measured, colors, best_lr: dict):
    """Training loss per cell (at its best_lr) and length, one row per clipping threshold."""
    cells, lengths = m.cells, m.lengths
    lrs = ds["optim.lr"].values.astype(float)
    clips = ds["optim.clip_threshold"].values.astype(float)
    fig, axes = plotting.figure(len(clips), len(cells), width=3.5, height=2.6)
    loss = ds["loss"].transpose(*M.AXES, "step").values.astype(float)
    acc = final(ds, "accuracy")
    steps = np.arange(ds.sizes["step"])
    for col, cell in enumerate(cells):
        ci = cells.index(cell)
        i = int(np.where(np.isclose(lrs, best_lr[cell]))[0][0])
        for row, thr in enumerate(clips):
            ax = axes[row, col]
            text = []
            for j, T in enumerate(lengths):
                w = min(SMOOTH, len(steps))
                smooth = analysis.moving_average(loss[ci, j, i, row], w)
                plotting.band(ax, steps[w - 1 :], smooth, label=f"T = {T}", color=colors[T], log=False)
                text.append(f"T={T}: acc {np.nanmedian(acc[ci, j, i, row]):.2f}")
            ax.axhline(np.log(2), color="k", ls=":", lw=1)
            ax.set_ylim(0, 1.0)
            ax.set_title(f"{CELL_NAMES[cell]}, lr {lrs[i]:g}, {_clip_label(thr)}", fontsize=9)
            ax.set_xlabel("step")
            if col == 0:
                ax.set_ylabel(f"training loss ({SMOOTH}-step mean;\ndotted: chance ln 2)")
            plotting.note(ax, f"final {TAIL} steps:\n" + "\n".join(text), loc="lower left")
    axes[0, -1].legend(loc="upper right", frameon=False, fontsize=7)
    return fig
