"""attention_logits' figure, from its stored results and Measured numbers (numpy and matplotlib only):
the end-of-training max attention logit and the final loss against the learning rate per variant, and
attention entropy against steps for a few rates with and without qk-layernorm."""

from __future__ import annotations

import matplotlib
import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import ListedColormap, LogNorm

from gradlab import analysis, plotting
from gradlab.experiments import attention_logits as A

REFERENCE = {  # the reference lines: each its own grey and dash, named in the figure's one legend
    "dhead": dict(color="0.45", lw=0.9, ls=(0, (5, 2, 1, 2, 1, 2))),
    "rate": dict(color="0.15", lw=0.9, ls="-."),
    "unigram": dict(color="0.55", lw=0.9, ls=":"),
}


def draw(ds, m: A.Measured) -> dict:
    """{"": logit growth and final loss against lr (top), entropy against steps without / with qk-LN}."""
    fig, grid = plotting.figure(2, 2, width=4.3, height=3.2)
    axes = grid.reshape(1, 4)
    colors = {v.label: plotting.COLORS[i % len(plotting.COLORS)] for i, v in enumerate(m.variants)}
    markers = {v.label: plotting.MARKERS[i % len(plotting.MARKERS)] for i, v in enumerate(m.variants)}
    styles = {False: "-", True: "--"}  # z-loss off / on
    handles, labels = [], []
    for v in m.variants:
        kw = dict(color=colors[v.label], ls=styles[v.z_loss > 0], marker=markers[v.label], ms=3.5)
        (line,) = axes[0, 0].plot(v.lrs, analysis.nan_if_bad(v.end_logit), **kw)
        axes[0, 1].plot(v.lrs, np.where(np.isfinite(v.final), v.final, np.nan), **kw)
        diverged = ~np.isfinite(v.final)
        axes[0, 1].plot(v.lrs[diverged], np.full(diverged.sum(), v.initial * 1.1), "x", color=colors[v.label])
        handles.append(line)
        labels.append(f"{v.label}: logit growth x{v.growth():.3g}, S={v.sensitivity():.3f}")
    ax = axes[0, 0]
    ax.set(xscale="log", yscale="log", xlabel="peak learning rate", ylabel="end max attention logit")
    ax.set_title(f"attention-logit growth\n(x: max / smallest lr's; >= {A.GROWTH:g} without qk-LN)")
    d_head = m.cfg["model"]["width"] // m.cfg["model"]["heads"]
    handles.append(ax.axhline(np.sqrt(d_head), **REFERENCE["dhead"]))
    labels.append(f"√d_head = {np.sqrt(d_head):.3g} (top left)")
    ax = axes[0, 1]
    handles.append(ax.axhline(m.entropy_rate, **REFERENCE["rate"]))
    labels.append(f"entropy rate H = {m.entropy_rate:.3f} (top right)")
    handles.append(ax.axhline(m.unigram, **REFERENCE["unigram"]))
    labels.append(f"unigram entropy {m.unigram:.3f} (top right)")
    ax.set(xscale="log", xlabel="peak learning rate", ylabel=f"final loss (last {A.TAIL} steps)")
    ax.set_title("final loss (x: diverged)\nS = LR sensitivity / L0")
    steps = ds["step"].values
    lrs = m.variants[0].lrs if m.variants else np.ones(1)
    norm = LogNorm(lrs.min(), lrs.max()) if len(lrs) > 1 and lrs.min() > 0 else None
    cmap = ListedColormap(matplotlib.colormaps["viridis"](np.linspace(0.0, 0.9, 256)))  # no faint yellow
    for col, qk in ((2, False), (3, True)):
        ax = axes[0, col]
        chosen = [v for v in m.variants if v.qk_layernorm == qk and v.z_loss == 0] or [
            v for v in m.variants if v.qk_layernorm == qk
        ]
        if not chosen:
            ax.axis("off")
            continue
        v = chosen[0]
        for i in range(0, len(v.lrs), max(1, len(v.lrs) // 5)):  # a sequence of rates: read off the colour bar
            ax.plot(steps, v.entropy[i], color=cmap(float(norm(v.lrs[i])) if norm else 0.0))
        ax.set(xlabel="step", ylabel="attention entropy (nats)", title=f"entropy, mean over heads: {v.label}")
        top = 1.3 * np.nanmax(v.entropy)
        if not qk:  # the collapse check is about these runs: its numbers go in this panel's headroom
            collapse = [
                f"{u.label}: {np.max(u.end_entropy[-u.high :]) / u.init_entropy:.3f} (< {A.COLLAPSE:g})"
                for u in m.variants
                if not u.qk_layernorm
            ]
            high = max(u.high for u in m.variants if not u.qk_layernorm)
            plotting.note(ax, f"top {high} lrs' end min-head entropy / init:\n" + "\n".join(collapse), "upper right")
            top = (1.45 + 0.1 * len(collapse)) * np.nanmax(v.entropy)
        ax.set_ylim(0, top)
    if norm is not None:
        bar = fig.colorbar(ScalarMappable(norm, cmap), ax=list(axes[0, 2:]), pad=0.01, fraction=0.04, aspect=30)
        bar.set_label("peak learning rate (entropy panels)")
    fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False)
    model = m.cfg["model"]
    fig.suptitle(
        f"Attention logits against the learning rate: Pre-LN decoder, {model['depth']} blocks, width {model['width']},"
        f" {model['heads']} heads,\nadam + warmup-cosine, {m.cfg['steps']} steps, "
        f"order-{m.cfg['data']['order']} Markov chain"
    )
    return {"": fig}
