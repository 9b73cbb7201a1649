"""dead_relu's figure, from its stored results and Measured numbers (numpy and matplotlib only): the dead and
no-gradient fractions of units against learning rate per activation, and the dead fraction over training."""

from __future__ import annotations

import numpy as np

from gradlab import plotting
from gradlab.experiments import dead_relu as M

LABELS = {"relu": "ReLU", "leaky_relu": "Leaky ReLU", "gelu": "GELU"}


def draw(ds, m: M.Measured) -> dict:
    cfg, acts, lrs = m.cfg, m.activations, m.lrs
    fig, axes = plotting.figure(1, 3, width=3.8, height=3.1)
    colors = {a: plotting.COLORS[k % len(plotting.COLORS)] for k, a in enumerate(acts)}
    for k, act in enumerate(acts):
        for ax, fraction in ((axes[0, 0], m.dead), (axes[0, 1], m.nograd)):
            plotting.band(ax, lrs, fraction[act][..., -1].T, LABELS.get(act, act), colors[act], log=False)
            gone = m.diverged[act].all(axis=-1)
            ax.plot(
                lrs[gone],
                np.full(gone.sum(), 0.95 - 0.05 * k),
                "x",
                color=colors[act],
                ms=6,
                mew=1.5,
                transform=ax.get_xaxis_transform(),
            )
    notes = [
        f"ReLU dead at init: {m.init_dead[0]:.0f} units" if m.init_dead is not None else "",
        f"ReLU large - small lr: {m.grown:+.2f}" if m.grown is not None else "",
    ]
    plotting.note(axes[0, 0], "\n".join(n for n in notes if n), loc="upper left")
    axes[0, 0].set(
        xscale="log",
        xlabel=f"learning rate ({cfg['optim']['name']})",
        ylabel="fraction of units",
        title="dead at the end: pre-act. ≤ 0 on all n",
        ylim=(-0.03, 1.03),
    )
    if m.leaky_nograd is not None:
        plotting.note(
            axes[0, 1],
            f"Leaky ReLU: {m.leaky_nograd:.3g} of units without gradient\n(max over lr, seed, step)",
            loc="upper left",
        )
    axes[0, 1].set(
        xscale="log",
        xlabel=f"learning rate ({cfg['optim']['name']})",
        ylabel="fraction of units",
        title=f"no gradient: |∇unit| ≤ {cfg['grad_threshold']:g} × layer max",
        ylim=(-0.03, 1.03),
    )
    axes[0, 1].legend(loc="center left", fontsize=7.5)
    # Over training: a few rates, ReLU solid, the others dashed / dotted.
    ax = axes[0, 2]
    alive = np.flatnonzero(~np.all([m.diverged[a].all(axis=-1) for a in acts], axis=0))
    picks = alive[np.unique(np.linspace(0, len(alive) - 1, 4).round().astype(int))] if alive.size else np.arange(1)
    shades = plotting.matplotlib.colormaps["viridis"](np.linspace(0, 0.85, len(picks)))
    styles = {"relu": "-", "leaky_relu": "--", "gelu": ":"}
    steps = ds["step"].values
    for act in acts:
        for shade, i in zip(shades, picks):
            with np.errstate(all="ignore"):
                ax.plot(
                    steps,
                    np.nanmedian(m.dead[act][i], axis=0),
                    styles.get(act, "-."),
                    color=shade,
                    lw=1.2,
                    label=f"lr={lrs[i]:.2g}" if act == acts[0] else None,
                )
    ax.set(
        xlabel="step",
        ylabel="dead fraction (full data)",
        ylim=(-0.03, 1.03),
        title="dead over training (" + ", ".join(f"{styles.get(a, '-.')} {LABELS.get(a, a)}" for a in acts) + ")",
    )
    ax.title.set_fontsize(8.5)
    ax.legend(loc="upper left", fontsize=7)
    fig.suptitle(
        f"Dead units against learning rate: depth-{cfg['model']['depth']} width-{cfg['model']['width']} MLP, "
        f"He init, zero biases, {cfg['optim']['name']} batch {cfg['data']['batch_size']} of {cfg['data']['examples']}, "
        f"{cfg['steps']} steps (x: diverged; band: seeds)",
        fontsize=9.5,
    )
    return {"": fig}
