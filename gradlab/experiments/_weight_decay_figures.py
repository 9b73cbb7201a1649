"""weight_decay's figure, from its stored results and Measured numbers (numpy and matplotlib only): held-out loss
over (lr, decay) per form, the weight norm at each form's best rate, and decay-only weights against the closed forms."""

from __future__ import annotations

import numpy as np

from gradlab import plotting
from gradlab.experiments import weight_decay as M

FORMS = {
    "adam": "Adam + L2",
    "adamw": "AdamW, optax (decay x lr)",
    "adamw_decoupled": "AdamW, paper (decay x schedule)",
}
DEMO_LR = 1e-3  # the rate of the decay-only panels


def _ticks(values) -> list[str]:
    return [f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e") if v else "0" for v in values]


def draw(ds, m: M.Measured) -> dict:
    names, lrs, wds, grids = m.forms, m.lrs, m.wds, m.test_loss
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    start = float(np.median(ds["test_loss"].isel(step=0).values))
    vmin = float(finite.min())
    vmax = min(float(finite.max()), start, 2 * vmin)  # resolve the good region; worse cells saturate
    fig, axes = plotting.figure(3, len(names), width=3.7, height=3.0)
    errors = {"adam": m.l2_error, **m.decay_error}
    for col, name in enumerate(names):
        ax = axes[0, col]
        grid = grids[name]
        image = ax.imshow(
            np.where(np.isfinite(grid), grid, np.nan).T,
            origin="lower",
            aspect="auto",
            cmap="viridis_r",
            vmin=vmin,
            vmax=vmax,
        )
        ax.plot(*np.nonzero(~np.isfinite(grid)), "x", color="#d55e00", ms=5, mew=1.2)
        i, j = np.unravel_index(int(np.argmin(grid)), grid.shape)
        ax.plot(i, j, "*", color="white", mec="k", ms=11)
        ax.set_xticks(range(len(lrs)), _ticks(lrs), rotation=60, fontsize=6.5)
        ax.set_yticks(range(len(wds)), _ticks(wds), fontsize=6.5)
        ax.set_xlabel("peak learning rate α")
        no_decay = f"; λ=0: {np.min(grid[:, 0]):.3g}" if wds[0] == 0 else ""
        ax.set_title(
            f"{FORMS.get(name, name)}\nbest {grid[i, j]:.3g} (α={lrs[i]:.2g}, λ={wds[j]:.2g}){no_decay}", fontsize=8.5
        )
        # Weight norm over training at the best cell's learning rate, one line per decay.
        ax = axes[1, col]
        colors = plotting.matplotlib.colormaps["plasma"](np.linspace(0, 0.85, len(wds)))
        for k, wd in enumerate(wds):
            ax.plot(
                np.median(M._grid(ds, name, "weight_norm")[i, k], axis=0), color=colors[k], lw=1.1, label=f"λ={wd:g}"
            )
        ax.set(yscale="log", xlabel="step")
        ax.set_title(f"weight norm at α={lrs[i]:.2g}", fontsize=9)
        # Decay-only weights: measured (lines) against the closed form (dots), at the rate nearest
        # DEMO_LR, where Adam + L2's steps of ~alpha take the whole run to cross the weights.
        ax = axes[2, col]
        i = int(np.argmin(np.abs(np.log(lrs / DEMO_LR))))
        if name in m.paths:
            measured, expected = m.paths[name]
            steps = np.arange(measured.shape[-1])
            every = max(1, len(steps) // 15)
            for k in range(len(wds)):
                ax.plot(steps, measured[i, k, 0], color=colors[k], lw=1.1)
                ax.plot(steps[::every], expected[i, k, 0, ::every], "o", color=colors[k], ms=2.5, mfc="none")
        what = "max |w|" if name == "adam" else "‖w‖"
        ax.set_title(f"decay-only inputs: {what} / start, α={lrs[i]:.2g}", fontsize=9)
        ax.set(xlabel="step", ylim=(-0.05, 1.05))
        if errors.get(name) is not None:
            form = {"adam": "scalar Adam on g=λw", "adamw": "∏(1-αη_tλ)", "adamw_decoupled": "∏(1-η_tλ)"}[name]
            same = "\nevery λ > 0 on one line" if name == "adam" else ""
            plotting.note(ax, f"o: {form}\nmax rel. err {errors[name]:.2g}{same}", loc="lower left")
    axes[0, 0].set_ylabel("weight decay λ\n(color: held-out loss, x: diverged)")
    axes[1, 0].set_ylabel(r"$\sqrt{\sum_l \|W_l\|_F^2}$")
    axes[2, 0].set_ylabel("relative to step 0")
    fig.colorbar(image, ax=axes[0, :].tolist(), shrink=0.9, label="held-out loss (last steps)")
    axes[1, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=6.5, title="decay")
    fig.suptitle(
        f"Adam + L2 against AdamW, both forms: {m.cfg['optim']['schedule']} schedule, {m.cfg['steps']} steps, "
        f"{m.cfg['data']['examples']} noisy examples (star: best cell)",
        fontsize=10,
    )
    return {"": fig}
