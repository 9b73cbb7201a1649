"""attention_logits' figure, from its stored results and Measured numbers (numpy and matplotlib only):
the end-of-training max attention logit and the final loss against the learning rate per variant, and
attention entropy against steps for a few rates with and without qk-layernorm."""

from __future__ import annotations

import numpy as np

from gradlab import analysis, plotting
from gradlab.experiments import attention_logits as A


def draw(ds, m: A.Measured) -> dict:
    fig, grid = plotting.figure(2, 2, width=4.3, height=3.2)
    axes = grid.reshape(1, 4)
    colors = {v.label: plotting.COLORS[i % len(plotting.COLORS)] for i, v in enumerate(m.variants)}
    styles = {False: "-", True: "--"}  # z-loss off / on
    for v in m.variants:
        kw = dict(color=colors[v.label], ls=styles[v.z_loss > 0], marker=".", ms=4)
        axes[0, 0].plot(v.lrs, analysis.nan_if_bad(v.end_logit), label=f"{v.label}: x{v.growth():.3g}", **kw)
        axes[0, 1].plot(
            v.lrs, np.where(np.isfinite(v.final), v.final, np.nan), label=f"{v.label}: S={v.sensitivity():.3f}", **kw
        )
        diverged = ~np.isfinite(v.final)
        axes[0, 1].plot(v.lrs[diverged], np.full(diverged.sum(), v.initial * 1.1), "x", color=colors[v.label])
    ax = axes[0, 0]
    ax.set(xscale="log", yscale="log", xlabel="peak learning rate", ylabel="max attention logit at the end")
    ax.set_title(f"attention-logit growth (x: max / smallest lr's; >= {A.GROWTH:g} without qk-LN)", fontsize=8.5)
    ax.axhline(np.sqrt(m.cfg["model"]["width"] // m.cfg["model"]["heads"]), color="0.5", lw=0.8, ls=":")
    ax.legend(loc="upper left", fontsize=6.5, frameon=False)
    ax = axes[0, 1]
    ax.axhline(m.entropy_rate, color="0.2", lw=0.9, ls=":", label=f"entropy rate H = {m.entropy_rate:.3f}")
    ax.axhline(m.unigram, color="0.6", lw=0.9, ls=":", label=f"unigram entropy {m.unigram:.3f}")
    ax.set(xscale="log", xlabel="peak learning rate", ylabel=f"final loss (mean of last {A.TAIL} steps)")
    ax.set_title("final loss (x: diverged); S = LR sensitivity / L0", fontsize=8.5)
    ax.legend(loc="lower center", fontsize=6.5, frameon=False)
    steps = ds["step"].values
    for col, qk in ((2, False), (3, True)):
        ax = axes[0, col]
        chosen = [v for v in m.variants if v.qk_layernorm == qk and v.z_loss == 0] or [
            v for v in m.variants if v.qk_layernorm == qk
        ]
        if not chosen:
            ax.axis("off")
            continue
        v = chosen[0]
        shades = plotting.matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, len(v.lrs)))
        for i in range(0, len(v.lrs), max(1, len(v.lrs) // 5)):
            ax.plot(steps, v.entropy[i], color=shades[i], label=f"lr {v.lrs[i]:.2g}")
        ax.set(xlabel="step", ylabel="attention entropy (nats, mean over heads)", title=f"entropy: {v.label}")
        ax.set_ylim(0, 1.3 * np.nanmax(v.entropy))
        ax.legend(loc="upper right", fontsize=6, frameon=False, ncol=4)
        if not qk:
            collapse = [
                f"{u.label}: top {u.high} lrs' end min-head entropy / init "
                f"{np.max(u.end_entropy[-u.high :]) / u.init_entropy:.3f} (< {A.COLLAPSE:g})"
                for u in m.variants
                if not u.qk_layernorm
            ]
            plotting.note(axes[0, 3], "\n".join(collapse), loc="lower left")  # the qk-LN panel's empty corner
    model = m.cfg["model"]
    fig.suptitle(
        f"Attention logits against the learning rate: Pre-LN decoder, {model['depth']} blocks, width {model['width']}, "
        f"{model['heads']} heads, adam + warmup-cosine, {m.cfg['steps']} steps, order-{m.cfg['data']['order']} "
        "Markov chain",
        fontsize=9,
    )
    return {"": fig}
