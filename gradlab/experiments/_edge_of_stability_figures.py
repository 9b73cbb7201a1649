"""edge_of_stability's figure: loss (top) and sharpness (bottom) against steps, one column per
variant, each rate's threshold/eta as a dashed line in its colour. numpy and matplotlib only."""

from __future__ import annotations

import numpy as np

from gradlab import plotting

LABEL = {
    "gd": ("GD", "2/η"),
    "momentum": ("heavy-ball momentum", "(2+2β)/η"),
    "adam": ("Adam: λmax(P⁻¹H)", "38/η"),
    "catapult": ("GD above 2/λ₀: catapult", "2/η"),
}


def draw(m, cfg: dict) -> dict:
    variants = list(dict.fromkeys(lane.variant for lane in m.lanes))
    fig, axes = plotting.figure(2, len(variants), width=3.5, height=2.8, sharex="col")
    for col, variant in enumerate(variants):
        title, line = LABEL[variant]
        top, bottom = axes[0, col], axes[1, col]
        for i, lane in enumerate(lane for lane in m.lanes if lane.variant == variant):
            color = plotting.COLORS[i % len(plotting.COLORS)]
            loss = np.where(np.isfinite(lane.loss), lane.loss, np.nan)
            catapult = variant == "catapult"
            blown = lane.blew_up(m.catapult_steps) if catapult else lane.diverged
            label = f"η={lane.lr:.3g}" + (f" = {lane.ratio[0]:.3g}·2/λ₀" if catapult else "")
            label += (" diverged ×" if lane.diverged else " blew up ×") if blown else ""
            top.plot(np.arange(len(loss)), loss, color=color, lw=0.9, label=label)
            if blown:
                finite = np.nonzero(np.isfinite(loss))[0]
                if finite.size:
                    at = finite[np.argmax(loss[finite])] if not lane.diverged else finite[-1]
                    top.plot(at, loss[at], "x", color=color, ms=7, mew=2)
            bottom.plot(lane.steps, lane.sharpness, color=color, lw=0.9)
            bottom.axhline(lane.threshold / lane.lr, color=color, ls="--", lw=0.9)
        top.set_yscale("log")
        top.set_title(title)
        top.legend(loc="upper right", fontsize=6.5, frameon=False)
        bottom.set_yscale("log")
        low = min(
            min(float(np.nanmin(lane.sharpness)), lane.threshold / lane.lr)
            for lane in m.lanes
            if lane.variant == variant
        )
        bottom.set_ylim(bottom=low / 5)  # room for the note below the curves
        bottom.set_xlabel("step")
        if variant == "catapult":
            bottom.axvline(m.catapult_steps, color="0.5", ls=":", lw=0.9)
        plotting.note(bottom, _note(m, variant, line), loc="lower right")
    axes[0, 0].set_ylabel("training loss (full batch, MSE)")
    axes[1, 0].set_ylabel("sharpness λmax (dashed: threshold)")
    model, data = cfg["model"], cfg["data"]
    fig.suptitle(
        f"Edge of stability: {model['activation']} MLP depth {model['depth']} width {model['width']}, "
        f"{data['examples']} examples, full batch; λmax every {cfg['sharpness_every']} steps by "
        f"{cfg['power_iterations']} warm-started power steps",
        fontsize=9,
    )
    return {"": fig}


def _note(m, variant: str, line: str) -> str:
    if variant == "catapult":
        parts = [f"dashed: 2/η; {m.catapult_survivors} catapult, {m.catapult_diverged} blow up"]
        if m.catapult_peak is not None:
            parts.append(f"peak loss / L₀ ≥ {m.catapult_peak:.3g} (> 1)")
            parts.append(f"ηλ/2 at step {m.catapult_steps} ≤ {m.catapult_final:.3g} (< 1)")
        return "\n".join(parts)
    total = sum(lane.variant == variant for lane in m.lanes)
    return (
        f"dashed: {line}; ηλ₀/thr ≤ {m.initial_ratio[variant]:.2f}\n"
        f"{m.reached[variant]}/{total} reach the edge;\n"
        f"last-half median ηλ/thr, worst: {m.worst_edge[variant]:.3f}"
    )
