"""schedules' figure, from its stored results and Measured numbers (numpy and matplotlib only): each schedule's
recorded learning rate against its closed form, and the training losses the decays and cycles give."""

from __future__ import annotations

import math

from gradlab import plotting, results
from gradlab.experiments import schedules as M

DECAYS = ("constant", "step", "exponential", "inverse_time", "cosine", "linear")
CYCLES = ("constant", "sgdr", "onecycle", "warmup_cosine")


def _loss_panel(ax, t, m: M.Measured, names, colors, title):
    const = m.final_loss.get("constant") if "constant" in names else None
    for name in names:
        if const is None:
            label = name
        elif name == "constant":
            label = f"constant ({const:.2g})"
        else:
            label = f"{name}  {m.final_loss[name] / const:.2g}x"
        plotting.band(ax, t, m.epoch_loss[name], label, color=colors[name])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(
        frameon=False,
        loc="upper right",
        fontsize=7,
        title="final loss / constant's" if const else None,
        title_fontsize=7,
    )


def draw(ds, m: M.Measured) -> dict:
    steps, optim = m.steps, m.optim
    names = list(m.lr)
    colors = {n: plotting.COLORS[i % len(plotting.COLORS)] for i, n in enumerate(names)}
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plotting.figure(rows + 2, cols, width=2.7, height=1.65)
    grid = axes[0, 0].get_gridspec()
    for ax in axes[rows:].flat:
        ax.remove()
    for ax in axes.flat[len(names) : rows * cols]:
        ax.set_visible(False)

    t = ds["step"].values
    for i, name in enumerate(names):
        ax = axes.flat[i]
        ax.plot(t, m.lr[name], color=colors[name], label="recorded lr")
        marks = M.landmarks(name, steps, optim)
        ax.plot(
            marks,
            M.closed_form(name, steps, optim, marks),
            "o",
            ms=3.2,
            mfc="none",
            mec="k",
            mew=0.7,
            label="closed form",
        )
        ax.set_title(name, color=colors[name])
        ax.set_ylim(-0.05 * optim["lr"], 1.1 * optim["lr"])
        if i % cols == 0:
            ax.set_ylabel("learning rate")
    axes[0, 0].legend(loc="best", frameon=False, fontsize=6.5)

    panels = [
        (g, title)
        for g, title in ((DECAYS, "decays"), (CYCLES, "restarts, one cycle, warmup"))
        if any(n in names and n != "constant" for n in g)
    ] or [(tuple(names), "")]
    span = cols // len(panels)
    for k, (group, title) in enumerate(panels):
        ax = fig.add_subplot(grid[rows:, k * span : (k + 1) * span])
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(True, alpha=0.25)
        title = f"training loss: {title}" if title else "training loss"
        _loss_panel(ax, t, m, [n for n in names if n in group], colors, title)
        if k == 0:
            ax.set_ylabel("minibatch loss, mean over last epoch")

    cfg = results.run_config(ds)
    fig.suptitle(
        f"Learning-rate schedules (top: recorded lr, circles: closed form) and the training they give\n"
        f"{cfg['optim']['name']}, peak lr {optim['lr']:g}, {steps} steps, batch {cfg['data']['batch_size']} "
        f"of {cfg['data']['examples']}, {ds.sizes['seed']} seeds (line: median, band: min..max)",
        fontsize=10,
    )
    return {"": fig}
