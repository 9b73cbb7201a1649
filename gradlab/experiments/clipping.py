"""C1: exploding gradients and their fix, gradient clipping (Pascanu et al. 2013).

A deep ReLU MLP trained by plain SGD at learning rates past the edge of stability, under the four
clipping rules of optim.clip (one compile each; lr and seeds vmapped):
  none         g
  global_norm  g min(1, tau / |g|)                    transforms.clip_by_global_norm(tau), tau = optim.clip_threshold
  value        clip(g_i, -v, v) element by element    optax.clip(v), v = value_threshold
  agc          per unit, g_u min(1, a max(|w_u|, 1e-3) / |g_u|)   optax.adaptive_grad_clip(a), a = agc_threshold
With SGD the update is -lr clip(g), so under global-norm clipping its norm is lr min(|g|, tau) exactly;
the checks test that on optax's chain directly and on every recorded step. Without clipping the net
diverges at the large rates; with global-norm clipping a step is at most lr tau long, and it trains.

The cliff (Pascanu et al. 2013, Sec. 3 and Fig. 6): the one-neuron recurrent map x_t = w tanh(x_{t-1}) + b,
x_0 = 0.5, loss (x_T - target)^2 after T = 50 steps. For w > cosh^2(x_0) the map has an unstable fixed
point between two stable ones, and x_0 sits on it along the line b = x_0 - w tanh(x_0): on one side x_T
goes to the positive branch, on the other to the negative one, and the gap from x_0 to the unstable
point is amplified by (w sech^2 x_0)^T. The loss falls a cliff there; across a sliver of (w, b) the
gradient is orders of magnitude larger than anywhere else. Gradient descent started beside it is
thrown far away by one step unless the step is clipped; clipped, a step is at most lr tau long.
Computed once per run in plain JAX (vmap over the grid) by `reference`, not in the sweep (it does not
depend on the sweep's values), and stored with the results: the figure reads it from there.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradlab import analysis, plotting, results, telemetry, transforms, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.experiments import Check

NAME = "clipping"
CLAIM = "global-norm clipping makes |update| = lr min(|g|, tau): training survives rates where unclipped SGD explodes"
AXES = ["optim.clip", "optim.lr", "seed"]
KINDS = {"none": "no clipping", "global_norm": "global norm", "value": "per value", "agc": "adaptive (AGC)"}
UPDATE_RTOL = 1e-5  # |update| against lr min(|g|, tau): float32 sums of ~1e4 squares, ~1e-6 relative
TRAINS = 0.5  # "trains": final loss below half the initial loss
CLIPPED_RTOL = 1e-6  # a step counts as clipped when clipping changed its gradient's norm by more than this


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the thresholds of the two clipping rules other than global norm."""

    value_threshold: float = param(0.01, low=0.0, low_open=True, doc="optim.clip=value: bound on each |g_i|")
    agc_threshold: float = param(0.01, low=0.0, low_open=True,
                                 doc="optim.clip=agc: bound on |g_u| / max(|w_u|, 1e-3) per unit")


def with_threshold(cfg, hp: dict) -> dict:
    """hp with optim.clip_threshold set to the threshold of the config's clipping rule."""
    threshold = {"value": hp["value_threshold"], "agc": hp["agc_threshold"]}.get(cfg.optim.clip,
                                                                                hp["optim.clip_threshold"])
    return {**hp, "optim.clip_threshold": threshold}


def trial(cfg) -> Trial:
    """supervised_mlp (its grad_global_norm is before clipping), recording also, before each update:
    clip_scale = |clip(g)| / |g|, clipped_elements (fraction of g's entries clipping changed) and
    update_global_norm (of the whole update the optax chain returns, biases included)."""

    def clip_metrics(view: trials.StepView) -> dict:
        # The clipping rules keep no state across steps: applying the rule alone to this step's
        # gradient shows what it did to it.
        rule = transforms.clipping(cfg.optim, view.hp["optim.clip_threshold"])
        clipped, _ = rule.update(view.grads, rule.init(view.state.params), view.state.params)
        changed = sum(jnp.sum(c != g) for c, g in zip(jax.tree.leaves(clipped), jax.tree.leaves(view.grads)))
        size = sum(g.size for g in jax.tree.leaves(view.grads))
        return {
            "clip_scale": telemetry.safe_ratio(telemetry.global_norm(clipped), telemetry.global_norm(view.grads)),
            "clipped_elements": changed.astype(jnp.float32) / size,
            "update_global_norm": telemetry.global_norm(view.updates),
        }

    return trials.supervised_mlp(cfg, hp_map=lambda hp, step: with_threshold(cfg, hp), metrics=clip_metrics)


# ----------------------------------------------------------------------------- the cliff


class Cliff(NamedTuple):
    """The one-neuron RNN of Pascanu et al. 2013, Fig. 6 (tanh instead of their sigmoid)."""

    steps: int = 50
    x0: float = 0.5
    target: float = -1.0
    w_range: tuple = (0.5, 3.0, 251)  # grid: lo, hi, points
    b_range: tuple = (-1.5, 0.5, 201)
    start: tuple = (2.5, -0.5)  # (w, b) beside the wall
    lr: float = 0.01
    tau: float = 5.0
    iterations: int = 80


CLIFF = Cliff()


def rnn_final(w, b, x0, steps: int):
    """x_T of x_t = w tanh(x_{t-1}) + b."""
    return jax.lax.scan(lambda x, _: (w * jnp.tanh(x) + b, None), jnp.asarray(x0, jnp.float32), None, length=steps)[0]


def cliff_loss(params, cliff: Cliff = CLIFF):
    """(x_T - target)^2 at params = (w, b)."""
    return jnp.square(rnn_final(params[0], params[1], cliff.x0, cliff.steps) - cliff.target)


def descend(cliff: Cliff, clip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Gradient descent on the cliff loss from cliff.start: (points (iterations + 1, 2), losses)."""
    tx = optax.sgd(cliff.lr)
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(cliff.tau), tx)
    loss_and_grad = jax.value_and_grad(lambda p: cliff_loss(p, cliff))

    def body(carry, _):
        p, opt_state = carry
        loss, g = loss_and_grad(p)
        u, opt_state = tx.update(g, opt_state, p)
        return (optax.apply_updates(p, u), opt_state), (p, loss)

    p0 = jnp.asarray(cliff.start, jnp.float32)
    (last, _), (points, losses) = jax.lax.scan(body, (p0, tx.init(p0)), None, length=cliff.iterations)
    points = np.vstack([np.asarray(points), np.asarray(last)[None]])
    return points, np.append(np.asarray(losses), float(cliff_loss(last, cliff)))


def cliff_surface(cliff: Cliff = CLIFF) -> dict:
    """Loss and gradient over the (w, b) grid (vmapped) and both descents, as numpy arrays."""
    ws, bs = np.linspace(*cliff.w_range), np.linspace(*cliff.b_range)
    grid = jnp.stack(jnp.meshgrid(jnp.asarray(ws, jnp.float32), jnp.asarray(bs, jnp.float32), indexing="ij"), -1)
    f = jax.jit(jax.vmap(jax.vmap(jax.value_and_grad(lambda p: cliff_loss(p, cliff)))))
    loss, grad = f(grid)
    plain, plain_loss = descend(cliff, clip=False)
    clipped, clipped_loss = descend(cliff, clip=True)
    return {"w": ws, "b": bs, "loss": np.asarray(loss, float), "grad": np.asarray(grad, float), "plain": plain,
            "plain_loss": plain_loss, "clipped": clipped, "clipped_loss": clipped_loss}


CLIFF_KEYS = ("w", "b", "loss", "grad", "plain", "plain_loss", "clipped", "clipped_loss")


def reference(cfg) -> dict:
    """The cliff's surface and both descents (cliff_surface), stored as ref.cliff_<key>; the loss and
    gradient grids in the float32 they were computed in."""
    del cfg
    s = cliff_surface(CLIFF)
    return {f"cliff_{key}": s[key].astype(np.float32) if key in ("loss", "grad") else s[key] for key in CLIFF_KEYS}


def stored_cliff(ds) -> dict:
    """cliff_surface's dict, read back from the results."""
    s = {key: analysis.reference(ds, f"cliff_{key}") for key in CLIFF_KEYS}
    return {**s, "loss": s["loss"].astype(float), "grad": s["grad"].astype(float)}


def wall_slope(surface: dict) -> float:
    """max |L(w + h, b) - L(w, b)| / h over neighbouring grid points: by the mean value theorem the
    true max |dL/dw| between them is at least this, however thin the wall is."""
    return float(np.max(np.abs(np.diff(surface["loss"], axis=0)) / np.diff(surface["w"])[:, None]))


def step_lengths(points: np.ndarray) -> np.ndarray:
    return np.linalg.norm(np.diff(points, axis=0), axis=1)


# ----------------------------------------------------------------------------- reading results


def _by_kind(ds, var: str, kind: str) -> np.ndarray:
    """(lr, seed, step, ...) of one clipping rule."""
    point = ds[var].sel({"optim.clip": kind})
    return point.transpose("optim.lr", "seed", "step", ...).values.astype(float)


def kinds(ds) -> list[str]:
    return [str(k) for k in ds["optim.clip"].values]


def final_loss(ds, kind: str) -> np.ndarray:
    """(lr, seed): mean loss of the last 10 steps; inf where the run diverged or its loss is not finite."""
    diverged = ds["diverged"].sel({"optim.clip": kind}).transpose("optim.lr", "seed").values
    return analysis.final(_by_kind(ds, "loss", kind), diverged, tail=10)


def demo_lr_index(ds) -> int:
    """The smallest rate at which no clipping fails to train (diverges, or ends above TRAINS x its
    start) on every seed; the largest rate if it trains everywhere."""
    lrs = ds["optim.lr"].values
    if "none" not in kinds(ds):
        return len(lrs) - 1
    start = _by_kind(ds, "loss", "none")[..., 0]
    fails = np.all(~(final_loss(ds, "none") < TRAINS * start), axis=-1)
    return int(np.argmax(fails)) if fails.any() else len(lrs) - 1


def clipped_steps(ds, kind: str) -> np.ndarray:
    """(lr, seed): fraction of the steps run (before any divergence) whose gradient clipping changed."""
    scale = _by_kind(ds, "clip_scale", kind)
    ran = np.isfinite(scale)
    with np.errstate(invalid="ignore"):
        hit = (scale < 1 - CLIPPED_RTOL) & ran
    return hit.sum(-1) / np.maximum(ran.sum(-1), 1)


def update_norm_error(ds, tau: float) -> float:
    """max over recorded SGD steps of | |update| / (lr min(|g|, tau)) - 1 | under global-norm clipping."""
    lr = _by_kind(ds, "lr", "global_norm")
    expected = lr * np.minimum(_by_kind(ds, "grad_global_norm", "global_norm"), tau)
    measured = _by_kind(ds, "update_global_norm", "global_norm")
    with np.errstate(invalid="ignore"):
        return float(np.nanmax(np.abs(measured / expected - 1)))


def layer_update_error(ds, tau: float) -> float:
    """The same from the stock per-layer telemetry: update_norm_l = lr min(1, tau / |g|) grad_norm_l."""
    g = _by_kind(ds, "grad_global_norm", "global_norm")
    scale = (_by_kind(ds, "lr", "global_norm") * np.minimum(1.0, tau / g))[..., None]
    expected = scale * _by_kind(ds, "grad_norm", "global_norm")
    with np.errstate(invalid="ignore"):
        return float(np.nanmax(np.abs(_by_kind(ds, "update_norm", "global_norm") / expected - 1)))


class Measured(NamedTuple):
    demo_lr_index: int  # the rate of the training panels and the clipping checks
    demo_lr: float
    update_error: float | None  # global_norm, SGD: max | |update| / (lr min(|g|, tau)) - 1 |
    layer_update_error: float | None  # the same per layer from the stock telemetry
    unclipped_final: float | None  # no clipping at demo_lr: final / initial loss, best seed (inf: diverged)
    clipped_final: float | None  # global_norm at demo_lr: final / initial loss, worst seed
    cliff_wall: float  # max |dL/dw| over the cliff's grid (at least the grid's difference quotient)
    cliff_median: float  # median |dL/dw| over the grid
    clipped_step: float  # the clipped descent's longest step / (lr tau)
    step_slack: float  # float32 rounding of the descent's points, relative to lr tau
    thrown_step: float  # the unclipped descent's longest step / (lr tau)


def measure(ds) -> Measured:
    cfg = results.run_config(ds)
    names = kinds(ds)
    i = demo_lr_index(ds)
    sgd_global = "global_norm" in names and cfg["optim"]["name"] == "sgd"
    tau = cfg["optim"]["clip_threshold"]
    trains = {}
    if {"none", "global_norm"} <= set(names):
        start = _by_kind(ds, "loss", "none")[i, :, 0]
        trains = {"unclipped_final": float(np.min(final_loss(ds, "none")[i] / start)),
                  "clipped_final": float(np.max(final_loss(ds, "global_norm")[i] / start))}
    surface = stored_cliff(ds)
    bound = CLIFF.lr * CLIFF.tau
    return Measured(
        i, float(ds["optim.lr"].values[i]),
        update_norm_error(ds, tau) if sgd_global else None, layer_update_error(ds, tau) if sgd_global else None,
        trains.get("unclipped_final"), trains.get("clipped_final"),
        cliff_wall=max(wall_slope(surface), float(np.max(np.abs(surface["grad"][..., 0])))),
        cliff_median=float(np.median(np.abs(surface["grad"][..., 0]))),
        clipped_step=float(step_lengths(surface["clipped"]).max() / bound),
        # The points are float32: each coordinate of p + u is rounded by at most eps32 |p| / 2, so a
        # measured step may exceed lr tau by sqrt(2) eps32 max|p| (~1e-5 of lr tau here).
        step_slack=float(np.sqrt(2) * np.finfo(np.float32).eps * np.abs(surface["clipped"]).max() / bound),
        thrown_step=float(step_lengths(surface["plain"]).max() / bound),
    )


def checks(m: Measured) -> list[Check]:
    out = []
    if m.update_error is not None:
        out.append(Check.at_most("global_norm, SGD: | |update| / (lr min(|g|, tau)) - 1 |, max over steps",
                                 m.update_error, UPDATE_RTOL))
        out.append(Check.at_most("global_norm, SGD: per-layer update_norm / (lr min(1, tau/|g|) grad_norm) - 1, max",
                                 m.layer_update_error, UPDATE_RTOL))
    if m.unclipped_final is not None:
        out.append(Check.at_least(f"no clipping at lr={m.demo_lr:.3g}: final / initial loss, best seed",
                                  m.unclipped_final, TRAINS))
        out.append(Check.below(f"global_norm at lr={m.demo_lr:.3g}: final / initial loss, worst seed",
                               m.clipped_final, TRAINS))
    out.append(Check.at_least("cliff: max |dL/dw| (>= grid difference quotient) / median |dL/dw|",
                              m.cliff_wall / m.cliff_median, 100))
    out.append(Check.at_most("cliff: clipped descent, longest step / (lr tau)", m.clipped_step, 1 + m.step_slack,
                             f"1 + {m.step_slack:.1g} (float32 rounding of the points)"))
    out.append(Check.at_least("cliff: unclipped descent, longest step / (lr tau)", m.thrown_step, 10))
    return out


# ----------------------------------------------------------------------------- figures


def figures(ds, m: Measured) -> dict:
    return {"": training_figure(ds, m), "cliff": cliff_figure(stored_cliff(ds), m)}


def training_figure(ds, m: Measured):
    cfg = results.run_config(ds)
    names = kinds(ds)
    lrs = ds["optim.lr"].values.astype(float)
    i = m.demo_lr_index
    thresholds = {"global_norm": f"τ={cfg['optim']['clip_threshold']:g}", "value": f"v={cfg['value_threshold']:g}",
                  "agc": f"a={cfg['agc_threshold']:g}", "none": ""}
    fig, axes = plotting.figure(1, 3, width=3.8, height=3.0)
    steps = ds["step"].values
    for k, kind in enumerate(names):
        color = plotting.COLORS[k % len(plotting.COLORS)]
        frac = clipped_steps(ds, kind)[i]
        bad = ds["diverged"].sel({"optim.clip": kind}).isel({"optim.lr": i}).values
        label = f"{KINDS.get(kind, kind)} {thresholds.get(kind, '')}".strip()
        if kind != "none":
            label += f": clipped {np.mean(frac):.0%} of steps"
        if kind in ("value", "agc"):  # global-norm clipping scales every entry of a clipped step
            with np.errstate(all="ignore"):
                entries = np.nanmean(_by_kind(ds, "clipped_elements", kind)[i])
            label += f", {entries:.1%} of entries"
        if bad.any():
            first = ds["first_bad_step"].sel({"optim.clip": kind}).isel({"optim.lr": i}).values
            label += f"; {int(bad.sum())}/{bad.size} diverged (step {int(first[bad].min())})"
        with warnings.catch_warnings():  # a diverged run is all NaN after its first bad step
            warnings.simplefilter("ignore", RuntimeWarning)
            plotting.band(axes[0, 0], steps, _by_kind(ds, "loss", kind)[i], label, color)
            plotting.band(axes[0, 1], steps, _by_kind(ds, "grad_global_norm", kind)[i], label, color)
        final = final_loss(ds, kind)
        with np.errstate(all="ignore"):
            mid = np.median(final, axis=-1)
        ok = np.isfinite(mid)
        axes[0, 2].plot(lrs[ok], mid[ok], "o-", color=color, ms=3, label=label)
        axes[0, 2].plot(lrs[~ok], np.full((~ok).sum(), 0.95 - 0.05 * k), "x", color=color, ms=6, mew=1.5,
                        transform=axes[0, 2].get_xaxis_transform())
    start = float(np.nanmedian(ds["loss"].isel(step=0).values))
    floor = np.nanmin(np.where(ds["loss"].isel({"optim.lr": i}).values > 0, ds["loss"].isel({"optim.lr": i}).values, np.nan))
    axes[0, 0].set(yscale="log", xlabel="step", ylabel="training loss", title=f"loss, SGD lr={lrs[i]:.3g}",
                   ylim=(0.5 * floor, 1e3 * start))
    axes[0, 1].set(yscale="log", xlabel="step", ylabel="|g| before clipping",
                   title=f"pre-clip global gradient norm, lr={lrs[i]:.3g}", ylim=(None, 1e6))
    if "global_norm" in names:
        axes[0, 1].axhline(cfg["optim"]["clip_threshold"], color="k", lw=0.8, ls="--")
    axes[0, 2].set(xscale="log", yscale="log", xlabel="learning rate", ylabel="final loss (median over seeds)",
                   title="final loss against lr (x: diverged)")
    axes[0, 2].axvline(lrs[i], color="0.5", ls=":", lw=0.8)
    axes[0, 2].axhline(start, color="0.5", lw=0.8, ls="--")
    plotting.note(axes[0, 2], "dashed: loss at init\ndotted: lr of the left panels", loc="lower left")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=2, frameon=False, fontsize=8)
    if m.update_error is not None:
        plotting.note(axes[0, 1], f"global norm: |update| = lr min(|g|, τ)\nmax rel. err {m.update_error:.1e}",
                      loc="upper right")
    fig.suptitle(f"Exploding gradients and clipping: depth-{cfg['model']['depth']} {cfg['model']['activation']} MLP, "
                 f"init gain {cfg['model']['init_gain']:g}, full-batch SGD, {cfg['steps']} steps", fontsize=10)
    return fig


def cliff_figure(s: dict, m: Measured, cliff: Cliff = CLIFF):
    """The cliff's loss and |dL/dw| over (w, b) with both descents, and their step lengths; `s` as
    cliff_surface gives it."""
    fig, axes = plotting.figure(1, 3, width=3.8, height=3.1)
    ax = axes[0, 0]
    mesh = ax.pcolormesh(s["w"], s["b"], np.log10(s["loss"] + 1e-4).T, shading="auto", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="log10 loss")
    for key, color, name in (("plain", "#d1495b", "no clipping"), ("clipped", "white", f"global norm τ={cliff.tau:g}")):
        ax.plot(s[key][:, 0], s[key][:, 1], ".-", color=color, ms=2.5, lw=0.9, label=name)
    ax.plot(*cliff.start, "*", color="#edae49", mec="k", ms=10)
    ax.set(xlim=cliff.w_range[:2], ylim=cliff.b_range[:2], xlabel="w", ylabel="b",
           title=f"loss of x_t = w tanh(x_(t-1)) + b, T={cliff.steps}")
    ax.legend(loc="lower right", fontsize=7, facecolor="0.7")
    ax = axes[0, 1]
    grad = np.abs(s["grad"][..., 0])
    mesh = ax.pcolormesh(s["w"], s["b"], np.log10(grad + 1e-6).T, shading="auto", cmap="magma")
    fig.colorbar(mesh, ax=ax, label="log10 |dL/dw|")
    ax.set(xlabel="w", ylabel="b", title="the gradient wall")
    plotting.note(ax, f"max |dL/dw| ≥ {m.cliff_wall:.3g}\nmedian {m.cliff_median:.3g}\n"
                      f"ratio {m.cliff_wall / m.cliff_median:.0f}", loc="upper right")
    ax = axes[0, 2]
    bound = cliff.lr * cliff.tau
    for key, color, name in (("plain", "#d1495b", "no clipping"), ("clipped", "#1b6ca8", f"global norm τ={cliff.tau:g}")):
        steps = step_lengths(s[key])
        ax.plot(np.arange(1, len(steps) + 1), steps, ".-", color=color, ms=3, lw=0.9,
                label=f"{name}: final loss {s[key + '_loss'][-1]:.2g}")
    ax.axhline(bound, color="k", ls="--", lw=0.8, label="lr τ")
    ax.set(yscale="log", xlabel="iteration", ylabel="step length |Δ(w, b)|",
           title=f"gradient-descent steps, lr={cliff.lr:g}")
    ax.legend(loc="upper right", fontsize=7)
    plotting.note(ax, f"longest step / (lr τ):\nunclipped {m.thrown_step:.0f}, clipped {m.clipped_step:.3f}",
                  loc="lower left")
    fig.suptitle("The cliff (Pascanu et al. 2013): one step on the wall throws plain gradient descent away; "
                 "clipped steps stay ≤ lr τ", fontsize=10)
    return fig
