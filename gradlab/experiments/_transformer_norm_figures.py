"""transformer_norm's figure, from its stored results and Measured numbers (numpy and matplotlib only):
the last block's gradient against depth at init, and the training loss with and without warmup."""

from __future__ import annotations

import numpy as np

from gradlab import plotting
from gradlab.experiments import transformer_norm as T

TITLES = {"pre": "Pre-LN", "post": "Post-LN"}


def draw(ds, m: T.Measured) -> dict:
    fig, axes = plotting.figure(1, 2, width=4.4, height=3.4)
    _gradient_panel(axes[0, 0], m)
    _loss_panel(axes[0, 1], ds, m)
    model = m.cfg["model"]
    fig.suptitle(
        f"Pre-LN vs Post-LN attention blocks: width {model['width']}, {model['heads']} heads, "
        f"order-{m.cfg['data']['order']} Markov chain over {m.cfg['data']['vocab']} tokens",
        fontsize=10,
    )
    return {"": fig}


def _gradient_panel(ax, m: T.Measured):
    depths = m.depths
    lines = []
    for i, (position, g) in enumerate(m.grads.items()):
        plotting.band(ax, depths, g, TITLES[position], color=plotting.COLORS[i])
        mean, se = m.slopes[position]
        bound = f"within {T.SLOPE_TOL:g} of -0.5 or {m.theory:+.2f}" if position == "pre" else f">= {T.POST_FLOOR:g}"
        lines.append(f"{TITLES[position]}: slope {mean:+.3f} ± {se:.3f} ({bound})")
    if "pre" in m.grads:
        start = np.median(m.grads["pre"][:, 0])
        ax.plot(depths, start * np.sqrt((depths[0] + 1) / (depths + 1)), "k--", lw=0.9, label="(L+1)$^{-1/2}$")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="depth L (blocks)",
        ylabel=r"last block $\|\partial L/\partial W\|_F$ at init",
        title=f"last block's gradient at init ({m.grads[next(iter(m.grads))].shape[0]} inits per depth)",
    )
    plotting.value_ticks(ax, depths)
    ax.legend(loc="upper right", fontsize=7, frameon=False)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo / (hi / lo) ** 0.8, hi)
    plotting.note(ax, "\n".join(lines), loc="lower left")


def _loss_panel(ax, ds, m: T.Measured):
    steps = ds["step"].values
    for i, position in enumerate(str(p) for p in ds["model.norm_position"].values):
        for warmup in (bool(w) for w in ds["warmup"].values):
            loss = ds["loss"].sel({"model.norm_position": position, "warmup": warmup}).transpose("seed", "step").values
            label = f"{TITLES[position]}, {'warmup' if warmup else 'no warmup'}: {m.finals[position, warmup]:.3f}"
            ax.plot(
                steps,
                np.median(loss, axis=0),
                color=plotting.COLORS[i],
                ls="-" if warmup else "--",
                marker="none",
                lw=1.0,
                label=label,
            )
    ax.axhline(m.entropy_rate, color="0.2", lw=0.9, ls=":", label=f"entropy rate H = {m.entropy_rate:.3f}")
    ax.axhline(m.unigram, color="0.6", lw=0.9, ls=":", label=f"unigram entropy {m.unigram:.3f}")
    optim = m.cfg["optim"]
    ax.set(
        yscale="log",
        xlabel="step",
        ylabel="training loss (nats / token)",
        title=f"adam lr {optim['lr']:g}, depth {m.cfg['model']['depth']}, warmup {optim['warmup_steps']} steps",
    )
    ax.legend(loc="upper right", fontsize=6.5, frameon=False, title="final (median of seeds)", title_fontsize=6.5)
    lines = []
    if m.warmup_gain is not None:
        lines.append(f"Post-LN excess over H, no warmup / warmup: {m.warmup_gain:.2f} (>= {T.WORSE:g})")
    if m.pre_excess is not None:
        lines.append(f"Pre-LN max excess / (L0 - H): {m.pre_excess:.3f} (<= {T.FINE:g})")
    if lines:
        plotting.note(ax, "\n".join(lines), loc="center right")
