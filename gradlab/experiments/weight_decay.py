"""B3: Adam + L2 is not AdamW, and AdamW comes in two forms (Loshchilov & Hutter 2019).

With g the data gradient, m_hat / sqrt(v_hat) Adam's normalised direction of its input, eta_t the
schedule's multiplier (peak 1), alpha the learning rate and lambda the weight decay:
  adam             L2: Adam of (g + lambda w):        w -= alpha eta_t Adam(g + lambda w)
  adamw            optax.adamw / torch.optim.AdamW:   w -= alpha eta_t (Adam(g) + lambda w)
  adamw_decoupled  the paper, Algorithm 2 line 12:    w -= eta_t (alpha Adam(g) + lambda w)
so per step optax's AdamW decays a weight by alpha eta_t lambda, the paper's by eta_t lambda alone,
and Adam + L2 normalises the decay with the gradient: with no data gradient Adam(lambda w) is
sign(w), a step of alpha eta_t whatever lambda.

The `dead_inputs` last input features are zero in every example, so the input-projection rows
that read them get no data gradient and move by decay alone: the checks compare their norm with
prod_t (1 - alpha eta_t lambda) (optax), prod_t (1 - eta_t lambda) (paper), and, for Adam + L2,
the fall of their largest |w| with sum_t alpha eta_t, the same at every lambda > 0. (Their share
of the teacher's signal becomes label noise.) The heatmaps of held-out loss over alpha x lambda are
exploratory: the figure marks each form's best cell and its gain over lambda = 0.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from gradlab import data, models, plotting, results, telemetry, transforms, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "weight_decay"
CLAIM = "Adam+L2 moves decayed weights by ~lr whatever the decay; AdamW decays them by lr*wd (optax) or wd (paper)"
FORMS = {"adam": "Adam + L2", "adamw": "AdamW, optax (decay x lr)",
         "adamw_decoupled": "AdamW, paper (decay x schedule)"}
AXES = ["optim.name", "optim.lr", "optim.weight_decay", "seed"]
TAIL = 20  # final held-out loss: mean of the last TAIL steps
DEMO_LR = 1e-3  # the rate of the decay-only panels
DECAY_ATOL = 1e-4  # measured against closed-form norm ratio: ~steps x float32 rounding of w (1 - c)
L2_RTOL = 1e-4  # float32 run against the float64 recursion: ~steps x 1e-7 of w_0


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus a held-out set and the zero input features."""

    held_out: int = param(512, low=1, doc="held-out examples of the same teacher")
    dead_inputs: int = param(4, low=0, doc="input features zero in every example (decay-only weights)")


class State(NamedTuple):
    train: trials.TrainState
    test: data.Data


def split(cfg) -> tuple[data.Data, data.Data]:
    """Train and held-out sets of one teacher, the last `dead_inputs` features set to zero."""
    n, d, k = cfg.data.examples, cfg.data.input_dim, cfg.dead_inputs
    if k >= d:
        raise ConfigError(f"dead_inputs={k} must be smaller than data.input_dim={d}")
    full = data.make(dataclasses.replace(cfg.data, examples=n + cfg.held_out))
    x = full.x.at[:, d - k:].set(0.0) if k else full.x
    return data.Data(x[:n], full.y[:n]), data.Data(x[n:], full.y[n:])


def trial(cfg) -> Trial:
    """supervised_mlp on the train split, recording also (before each update, like the loss):
    test_loss, weight_norm (all weight matrices), dead_norm and dead_max (Frobenius norm and
    largest |w| of the decay-only rows) and lr."""
    base = trials.supervised_mlp(cfg)
    spec = trials.mlp_spec(cfg)
    k = cfg.dead_inputs

    def init(hp, key):
        train, test = split(cfg)
        return State(base.init(hp, key)._replace(data=train), test)

    def step(hp, state):
        train, metrics = base.step(hp, state.train)
        params = state.train.params
        out, _ = models.apply(params, state.test.x, spec, models.MLPHyper.from_hp(hp))
        dead = params["input"]["w"][cfg.data.input_dim - k:]
        return State(train, state.test), {
            **metrics,
            "test_loss": data.loss(cfg.data, out, state.test.y),
            "weight_norm": jnp.sqrt(jnp.sum(jnp.square(models.per_layer(params, telemetry.frobenius)))),
            "dead_norm": telemetry.frobenius(dead) if k else jnp.float32(jnp.nan),
            "dead_max": jnp.max(jnp.abs(dead)) if k else jnp.float32(jnp.nan),
            "lr": transforms.learning_rate(cfg.optim, hp["optim.lr"], cfg.steps)(state.train.step),
        }

    return Trial(init, step, base.metric_dims)


# ----------------------------------------------------------------------------- checks


def _grid(ds, name: str, var: str) -> np.ndarray:
    """(lr, wd, seed, step) of one form."""
    point = ds[var].sel({"optim.name": name})
    return point.transpose("optim.lr", "optim.weight_decay", "seed", "step").values.astype(float)


def predicted_ratio(ds, name: str) -> np.ndarray:
    """Closed-form dead_norm[t] / dead_norm[0], (lr, wd, seed, step), from the recorded lr."""
    lr_t = _grid(ds, name, "lr")
    peak = ds["optim.lr"].values.astype(float)[:, None, None, None]
    wd = ds["optim.weight_decay"].values.astype(float)[None, :, None, None]
    per_step = 1.0 - wd * (lr_t if name == "adamw" else lr_t / peak)
    with np.errstate(over="ignore"):  # a decay past 2 per step flips and grows the weights: they diverge
        prod = np.cumprod(per_step[..., :-1], axis=-1)
    return np.abs(np.concatenate([np.ones_like(per_step[..., :1]), prod], axis=-1))


def decay_error(ds, name: str) -> float:
    """max |dead_norm_t / dead_norm_0 - closed form| / max(closed form, 1) over the grid and the
    steps before any divergence: absolute while the weights shrink, relative where they grow."""
    norm = _grid(ds, name, "dead_norm")
    expected = predicted_ratio(ds, name)
    with np.errstate(invalid="ignore"):
        err = np.abs(norm / norm[..., :1] - expected) / np.maximum(expected, 1.0)
    return float(np.nanmax(np.where(np.isfinite(expected), err, np.nan)))


def scalar_adam_l2(w0, lr_t, wd: float, b1: float, b2: float, eps: float) -> np.ndarray:
    """A weight with no data gradient under Adam + L2, in float64: w_t before each update."""
    w, m, v = np.asarray(w0, float), 0.0, 0.0
    out = np.empty(np.shape(lr_t)[-1:] + np.shape(w))
    for t, lr in enumerate(np.moveaxis(np.asarray(lr_t, float), -1, 0)):
        out[t] = w
        g = wd * w
        m, v = b1 * m + (1 - b1) * g, b2 * v + (1 - b2) * g * g
        w = w - lr * (m / (1 - b1 ** (t + 1))) / (np.sqrt(v / (1 - b2 ** (t + 1))) + eps)
    return np.moveaxis(out, 0, -1)


def l2_paths(ds):
    """Adam + L2's largest decay-only |w|, measured and from scalar_adam_l2 (lr, wd, seed, step),
    masked to where the simulated weight is still above half its start (it tracks one weight)."""
    optim = results.config_of(ds)["config"]["optim"]
    top, lr_t = _grid(ds, "adam", "dead_max"), _grid(ds, "adam", "lr")
    sim = np.stack([scalar_adam_l2(top[:, j, :, 0], lr_t[:, j], wd, optim["b1"], optim["b2"], optim["eps"])
                    for j, wd in enumerate(ds["optim.weight_decay"].values.astype(float))], axis=1)
    return top, np.where(sim >= 0.5 * top[..., :1], sim, np.nan), lr_t


def checks(ds) -> list[Check]:
    ds = results.with_axes(ds, AXES)
    names = [str(n) for n in ds["optim.name"].values]
    if "dead_norm" not in ds or np.all(np.isnan(ds["dead_norm"].values)):
        return []
    out = []
    for name, scale in (("adamw", "lr wd eta_t"), ("adamw_decoupled", "wd eta_t")):
        if name in names:
            err = decay_error(ds, name)
            out.append(Check(f"{name}: decay-only |w|_t/|w|_0 vs |prod(1 - {scale})|, max err", err,
                             f"<= {DECAY_ATOL:g}", err <= DECAY_ATOL))
    wds = ds["optim.weight_decay"].values.astype(float)
    if "adam" in names and (wds > 0).any():
        top, sim, lr_t = l2_paths(ds)
        decayed = wds > 0
        err = float(np.nanmax(np.abs(top - sim)[:, decayed] / top[:, decayed, :, :1]))
        out.append(Check("adam+L2: decay-only max|w| vs scalar Adam on g = wd w, max rel. err", err,
                         f"<= {L2_RTOL:g}", err <= L2_RTOL))
        # While |w| >= |w_0|/2 Adam's step is between |g_t|/max|g| >= 1/2 and 1 times the lr
        # (m_hat averages past gradients, all at least g_t; sqrt(v_hat) is at most their max).
        # Measured at each point's last such step, where the fall dwarfs float32's resolution of w.
        spent = np.cumsum(lr_t, axis=-1) - lr_t
        last = np.maximum(np.isfinite(sim).sum(axis=-1, keepdims=True) - 1, 1)
        fall = top[..., :1] - np.take_along_axis(top, last, axis=-1)
        per_lr = (fall / np.take_along_axis(spent, last, axis=-1))[:, decayed]
        lo, hi = float(np.nanmin(per_lr)), float(np.nanmax(per_lr))
        out.append(Check("adam+L2: fall of max|w| / sum of lr, every wd > 0", lo,
                         f"in [0.5, 1] (max {hi:.4g})", 0.5 <= lo and hi <= 1.0 + 1e-4))
    if 0.0 in wds:
        still = float(np.nanmax(np.abs(ds["dead_max"].sel({"optim.weight_decay": 0.0}).diff("step"))))
        out.append(Check("wd = 0: decay-only weights, max |change| per step", still, "== 0 (no gradient, no decay)",
                         still == 0.0))
    return out


# ----------------------------------------------------------------------------- figure


def final_test_loss(ds, name: str) -> np.ndarray:
    """(lr, wd): held-out loss, mean of the last TAIL steps and median over seeds; inf if diverged."""
    test = _grid(ds, name, "test_loss")
    diverged = ds["diverged"].sel({"optim.name": name}).transpose("optim.lr", "optim.weight_decay", "seed").values
    final = np.where(diverged, np.inf, np.mean(test[..., -TAIL:], axis=-1))
    return np.median(np.where(np.isfinite(final), final, np.inf), axis=-1)


def best_cell(ds, name: str) -> tuple[int, int]:
    grid = final_test_loss(ds, name)
    return np.unravel_index(int(np.argmin(grid)), grid.shape)


def _ticks(values) -> list[str]:
    return [f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e") if v else "0" for v in values]


def figures(ds) -> dict:
    ds = results.with_axes(ds, AXES)
    names = [str(n) for n in ds["optim.name"].values]
    lrs, wds = ds["optim.lr"].values.astype(float), ds["optim.weight_decay"].values.astype(float)
    grids = {n: final_test_loss(ds, n) for n in names}
    finite = np.concatenate([g[np.isfinite(g)] for g in grids.values()])
    start = float(np.median(ds["test_loss"].isel(step=0).values))
    vmin = float(finite.min())
    vmax = min(float(finite.max()), start, 2 * vmin)  # resolve the good region; worse cells saturate
    fig, axes = plotting.figure(3, len(names), width=3.7, height=3.0)
    errors = {c.name.split(":")[0]: c.measured for c in checks(ds) if "err" in c.name}
    for col, name in enumerate(names):
        ax = axes[0, col]
        grid = grids[name]
        image = ax.imshow(np.where(np.isfinite(grid), grid, np.nan).T, origin="lower", aspect="auto", cmap="viridis_r",
                          vmin=vmin, vmax=vmax)
        bad = ~np.isfinite(grid)
        ax.plot(*np.nonzero(bad), "x", color="#d1495b", ms=5, mew=1.2)
        i, j = best_cell(ds, name)
        ax.plot(i, j, "*", color="white", mec="k", ms=11)
        ax.set_xticks(range(len(lrs)), _ticks(lrs), rotation=60, fontsize=6.5)
        ax.set_yticks(range(len(wds)), _ticks(wds), fontsize=6.5)
        ax.set_xlabel("peak learning rate α")
        no_decay = f"; λ=0: {np.min(grid[:, 0]):.3g}" if wds[0] == 0 else ""
        ax.set_title(f"{FORMS.get(name, name)}\nbest {grid[i, j]:.3g} (α={lrs[i]:.2g}, λ={wds[j]:.2g}){no_decay}",
                     fontsize=8.5)
        if col == 0:
            ax.set_ylabel("weight decay λ\n(color: held-out loss, x: diverged)")
        # Weight norm over training at the best cell's learning rate, one line per decay.
        ax = axes[1, col]
        colors = plotting.matplotlib.colormaps["plasma"](np.linspace(0, 0.85, len(wds)))
        for k, wd in enumerate(wds):
            norm = np.median(_grid(ds, name, "weight_norm")[i, k], axis=0)
            ax.plot(norm, color=colors[k], lw=1.1, label=f"λ={wd:g}")
        ax.set_yscale("log")
        ax.set_title(f"weight norm at α={lrs[i]:.2g}", fontsize=9)
        ax.set_xlabel("step")
        if col == 0:
            ax.set_ylabel(r"$\sqrt{\sum_l \|W_l\|_F^2}$")
        # Decay-only weights: measured (lines) against the closed form (dots), at the rate nearest
        # DEMO_LR, where Adam + L2's steps of ~alpha take the whole run to cross the weights.
        ax = axes[2, col]
        i = int(np.argmin(np.abs(np.log(lrs / DEMO_LR))))
        if name == "adam":
            top, sim, _ = l2_paths(ds)
            measured, expected = top / top[..., :1], sim / top[..., :1]
        else:
            norm = _grid(ds, name, "dead_norm")
            measured, expected = norm / norm[..., :1], predicted_ratio(ds, name)
        steps = np.arange(measured.shape[-1])
        every = max(1, len(steps) // 15)
        for k in range(len(wds)):
            ax.plot(steps, measured[i, k, 0], color=colors[k], lw=1.1)
            ax.plot(steps[::every], expected[i, k, 0, ::every], "o", color=colors[k], ms=2.5, mfc="none")
        what = "max |w|" if name == "adam" else "‖w‖"
        ax.set_title(f"decay-only inputs: {what} / start, α={lrs[i]:.2g}", fontsize=9)
        ax.set_xlabel("step")
        ax.set_ylim(-0.05, 1.05)
        key = {"adam": "adam+L2"}.get(name, name)
        if key in errors:
            form = {"adam": "scalar Adam on g=λw", "adamw": "∏(1-αη_tλ)",
                    "adamw_decoupled": "∏(1-η_tλ)"}[name]
            same = "\nevery λ > 0 on one line" if name == "adam" else ""
            plotting.note(ax, f"o: {form}\nmax rel. err {errors[key]:.2g}{same}", loc="lower left")
        if col == 0:
            ax.set_ylabel("relative to step 0")
    fig.colorbar(image, ax=axes[0, :].tolist(), shrink=0.9, label="held-out loss (last steps)")
    axes[1, -1].legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False, fontsize=6.5, title="decay")
    cfg = results.config_of(ds)["config"]
    fig.suptitle(f"Adam + L2 against AdamW, both forms: {cfg['optim']['schedule']} schedule, {cfg['steps']} steps, "
                 f"{cfg['data']['examples']} noisy examples (star: best cell)", fontsize=10)
    return {"": fig}
