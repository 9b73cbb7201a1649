"""transformer_norm's figure, from its stored results and Measured numbers (numpy and matplotlib only):
the last block's gradient against depth at init, and the training loss with and without warmup."""

from __future__ import annotations

import numpy as np
from matplotlib.ticker import FuncFormatter

from gradlab import plotting
from gradlab.experiments import transformer_norm as T

TITLES = {"pre": "Pre-LN", "post": "Post-LN"}


MARKS = 10  # markers per loss curve: enough to tell the series apart, too few to hide the curve


def draw(ds, m: T.Measured) -> dict:
    """{"": the last block's gradient against depth at init, the training loss with and without warmup}."""
    fig, axes = plotting.figure(1, 2, width=4.4, height=3.4)
    _gradient_panel(axes[0, 0], m)
    _loss_panel(axes[0, 1], ds, m)
    # one legend for both panels, below them: colour and marker are the block, dash the warmup
    handles, labels = [], []
    for ax in axes[0]:
        h, lab = ax.get_legend_handles_labels()
        handles, labels = handles + h, labels + lab
    paper = getattr(fig, "gradlab_style", "screen") == "paper"
    if paper:  # rows of 2 in would leave the notes no room beside the curves
        fig.set_size_inches(fig.get_figwidth(), 4.2)
    fig.legend(handles, labels, loc="outside lower center", ncol=2 if paper else 3, frameon=False)
    model = m.cfg["model"]
    fig.suptitle(
        f"Pre-LN vs Post-LN attention blocks: width {model['width']}, {model['heads']} heads,\n"
        f"order-{m.cfg['data']['order']} Markov chain over {m.cfg['data']['vocab']} tokens"
    )
    return {"": fig}


def smooth(y: np.ndarray, window: int) -> np.ndarray:
    """Running mean over `window` steps (shorter at the ends), for display only: NaN stays NaN."""
    if window <= 1:
        return y
    ok = np.isfinite(y)
    kernel = np.ones(window)
    total = np.convolve(np.where(ok, y, 0.0), kernel, mode="same")
    count = np.convolve(ok.astype(float), kernel, mode="same")
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(ok, total / count, np.nan)


def _gradient_panel(ax, m: T.Measured):
    depths = m.depths
    lines = []
    for i, (position, g) in enumerate(m.grads.items()):
        plotting.band(ax, depths, g, f"{TITLES[position]} at init (left)", color=plotting.COLORS[i])
        mean, se = m.slopes[position]
        bound = f"within {T.SLOPE_TOL:g} of -0.5 or {m.theory:+.2f}" if position == "pre" else f">= {T.POST_FLOOR:g}"
        lines.append(f"{TITLES[position]}: slope {mean:+.3f} ± {se:.3f}\n   ({bound})")
    if "pre" in m.grads:
        start = np.median(m.grads["pre"][:, 0])
        ax.plot(depths, start * np.sqrt((depths[0] + 1) / (depths + 1)), "k--", lw=0.9, label="(L+1)$^{-1/2}$ (left)")
    ax.set(
        xscale="log",
        yscale="log",
        xlabel="depth L (blocks)",
        ylabel=r"last block $\|\partial L/\partial W\|_F$ at init",
        title=f"last block's gradient at init ({m.grads[next(iter(m.grads))].shape[0]} inits per depth)",
    )
    plotting.value_ticks(ax, depths)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo / (hi / lo) ** 0.8, hi)
    plotting.note(ax, "\n".join(lines), loc="lower left")


def _loss_panel(ax, ds, m: T.Measured):
    steps = ds["step"].values
    window = max(1, len(steps) // 50)
    for i, position in enumerate(str(p) for p in ds["model.norm_position"].values):
        for warmup in (bool(w) for w in ds["warmup"].values):
            loss = ds["loss"].sel({"model.norm_position": position, "warmup": warmup}).transpose("seed", "step").values
            final = m.finals[position, warmup]
            label = f"{TITLES[position]}, {'warmup' if warmup else 'no warmup'}: final {final:.3f} (right)"
            ax.plot(
                steps,
                smooth(np.median(loss, axis=0), window),
                color=plotting.COLORS[i],
                ls="-" if warmup else "--",
                marker=plotting.MARKERS[i],
                markevery=(0.05 * warmup, 1 / MARKS),  # the two warmups' markers apart
                lw=1.0,
                label=label,
            )
    ax.axhline(m.entropy_rate, color="0.2", lw=0.9, ls=":", label=f"entropy rate H = {m.entropy_rate:.3f}")
    ax.axhline(m.unigram, color="0.6", lw=0.9, ls="-.", label=f"unigram entropy {m.unigram:.3f}")
    optim = m.cfg["optim"]
    ax.set(
        yscale="log",
        xlabel="step",
        ylabel="training loss (nats / token)",
        title=f"adam lr {optim['lr']:g}, depth {m.cfg['model']['depth']}, warmup {optim['warmup_steps']} steps\n"
        + ("median of seeds" + (f", running mean over {window} steps (display)" if window > 1 else "")),
    )
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo, hi * (hi / lo) ** 0.6)  # headroom above the curves for the note (Post-LN stays near L0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(FuncFormatter(lambda y, _: f"{y:g}" if round(y, 6) in (1.5, 2, 3, 5) else ""))
    lines = []
    if m.warmup_gain is not None:
        lines.append(f"Post-LN excess over H,\nno warmup / warmup: {m.warmup_gain:.2f} (>= {T.WORSE:g})")
    if m.pre_excess is not None:
        lines.append(f"Pre-LN max excess / (L0 - H):\n{m.pre_excess:.3f} (<= {T.FINE:g})")
    if lines:
        plotting.note(ax, "\n".join(lines), loc="upper right")
