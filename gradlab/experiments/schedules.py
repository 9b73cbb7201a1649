"""B4: learning-rate schedules apply their closed forms; annealed ones settle where a constant lr can't.

Every schedule is the traced peak `lr` times a shape with peak 1 (transforms.schedule_shape).
With T = steps, W = warmup_steps, n = T - W (the steps after warmup), r = decay_rate,
a = final_lr_fraction and c = cycles, the shapes are (t counted from the end of warmup):
  constant       1
  step           r**k after the k-th of c drops at steps floor(n i / (c + 1)), i = 1..c
  exponential    r**(t/n)                                     (optax.exponential_decay)
  inverse_time   1 / (1 + (1/r - 1) t/n), which reaches r at t = n
  cosine         a + (1 - a) (1 + cos(pi t/n)) / 2            (Loshchilov & Hutter 2017)
  sgdr           the cosine over each of c periods P = n // c (the last one takes the n - (c-1)P
                 steps left), back to 1 at every t = kP
  onecycle       cosine 1/25 -> 1 over p = W, or int(0.3 T) with no warmup, steps, then
                 1 -> 1/(25e4) over the rest (optax.cosine_onecycle_schedule; Smith & Topin 2017)
  warmup_cosine  t/W over W = warmup_steps or T // 10, then the cosine over T - W steps
A nonzero warmup_steps puts a linear 0 -> 1 warmup of W steps in front of the first seven.
The checks compare the recorded `lr`, and the learning rate the optimizer's inject_hyperparams
state actually applied, with these formulas written here in numpy (float64) at each schedule's
landmark steps; then compare the training loss each schedule ends at with a constant rate's:
with Adam at a peak lr of 0.03 a constant rate keeps the minibatch loss hovering (late in a long
run it even creeps up), while every schedule that anneals lets it settle lower.
"""

from __future__ import annotations

import math

import jax
import numpy as np
import optax

from gradlab import plotting, results, trials
from gradlab.config import ExperimentConfig
from gradlab.engine import Trial
from gradlab.experiments import Check

NAME = "schedules"
CLAIM = "each lr schedule applies its closed form; where a constant peak lr hovers, every annealed one ends lower"
Config = ExperimentConfig
TOLERANCE = 1e-6  # |recorded - closed form| / peak lr: float32 evaluation errs by ~1e-7 of the peak
ONECYCLE_PCT = 0.3
ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 25.0, 1e4


def trial(cfg) -> Trial:
    """supervised_mlp, plus `lr_applied`: the learning rate inject_hyperparams used this step."""
    base = trials.supervised_mlp(cfg)

    def is_value(path, value):  # hyperparams["learning_rate"], not the schedule's count state
        del path
        return isinstance(value, jax.Array)

    def step(hp, state):
        new_state, metrics = base.step(hp, state)
        applied = optax.tree_utils.tree_get(new_state.opt_state, "learning_rate", filtering=is_value)
        return new_state, {**metrics, "lr_applied": applied}

    return Trial(base.init, step, base.metric_dims)


# ----------------------------------------------------------------------------- closed forms


def _cosine(t, span, alpha):
    """alpha + (1 - alpha) (1 + cos(pi t/span)) / 2, held at alpha after span."""
    span = max(span, 1)  # a zero-length phase (onecycle with T < 4) is never on the taken branch
    t = np.minimum(t, span)
    return alpha + (1 - alpha) * 0.5 * (1 + np.cos(np.pi * t / span))


def _warmup_free(name: str, t, n: int, optim: dict):
    """The shape of a schedule with no warmup, over n steps."""
    r, a, c = optim["decay_rate"], optim["final_lr_fraction"], optim["cycles"]
    if name == "constant":
        return np.ones_like(t)
    if name == "step":
        drops = sorted({math.floor(n * i / (c + 1)) for i in range(1, c + 1)})
        return r ** np.sum([t >= b for b in drops], axis=0)
    if name == "exponential":
        return r ** (t / n)
    if name == "inverse_time":
        return 1 / (1 + (1 / r - 1) * np.minimum(t, n) / n)
    if name == "cosine":
        return _cosine(t, n, a)
    if name == "linear":
        return 1 + (a - 1) * np.minimum(t, n) / n
    if name == "sgdr":
        period = max(1, n // c)
        last = (c - 1) * period  # the last period runs from here to n
        return np.where(t < last, _cosine(t % period, period, a), _cosine(t - last, max(1, n - last), a))
    raise ValueError(f"no closed form for schedule {name!r}")


def closed_form(name: str, steps: int, optim: dict, t=None) -> np.ndarray:
    """The learning rate of schedule `name` at steps t (default 0..steps-1), from the formulas."""
    t = np.arange(steps, dtype=np.float64) if t is None else np.asarray(t, np.float64)
    lr = optim["lr"]
    if name == "onecycle":
        w = optim["warmup_steps"]
        p = w if 0 < w < steps else math.floor(ONECYCLE_PCT * steps)
        start, end = 1 / ONECYCLE_DIV, 1 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)
        up = start + (1 - start) * (1 - _cosine(t, p, 0.0))
        down = _cosine(t - p, steps - p, end)
        return lr * np.where(t < p, up, np.where(t < steps, down, end))
    if name == "warmup_cosine":
        w = optim["warmup_steps"] or max(1, steps // 10)
        span = max(steps, w + 1) - w
        return lr * np.where(t < w, t / w, _cosine(t - w, span, optim["final_lr_fraction"]))
    w = optim["warmup_steps"]
    n = max(1, steps - w)
    after = _warmup_free(name, np.maximum(t - w, 0), n, optim)
    return lr * (np.where(t < w, t / max(w, 1), after) if w else after)


def landmarks(name: str, steps: int, optim: dict) -> list[int]:
    """Steps where a schedule does something: its ends, quarters, boundaries and either side."""
    w = optim["warmup_steps"]
    n = max(1, steps - w)
    marks = {0, steps // 4, steps // 2, 3 * steps // 4, steps - 1}
    edges = set()
    if w and name not in ("onecycle", "warmup_cosine"):
        edges.add(w)
    if name == "step":
        c = optim["cycles"]
        edges |= {w + math.floor(n * i / (c + 1)) for i in range(1, c + 1)}
    if name == "sgdr":
        period = max(1, n // optim["cycles"])
        edges |= {w + k * period for k in range(optim["cycles"])}
    if name == "onecycle":
        edges.add(w if 0 < w < steps else math.floor(ONECYCLE_PCT * steps))
    if name == "warmup_cosine":
        wc = optim["warmup_steps"] or max(1, steps // 10)
        edges |= {wc // 2, wc}
    marks |= {e + d for e in edges for d in (-1, 0, 1)}
    return sorted(m for m in marks if 0 <= m < steps)


# ----------------------------------------------------------------------------- checks


def _setup(ds):
    cfg = results.config_of(ds)["config"]
    return cfg["steps"], cfg["optim"]


def _with_axes(ds):
    """`ds` with a schedule axis and a seed axis even when the run had a single value of either."""
    cfg = results.config_of(ds)["config"]
    if "optim.schedule" not in ds.dims:
        ds = ds.expand_dims({"optim.schedule": [cfg["optim"]["schedule"]]})
    if "seed" not in ds.dims:
        ds = ds.expand_dims({"seed": [cfg["seed"]]})
    return ds


def _schedules(ds) -> list[str]:
    return [str(s) for s in ds["optim.schedule"].values]


def _per_seed(ds, var: str, name: str) -> np.ndarray:
    """(seeds, steps) of a recorded metric under one schedule."""
    return ds[var].sel({"optim.schedule": name}).transpose("seed", "step").values


def schedule_error(ds, name: str, var: str = "lr") -> float:
    """Max |recorded - closed form| over seeds and landmark steps, as a fraction of the peak lr."""
    steps, optim = _setup(ds)
    marks = landmarks(name, steps, optim)
    expected = closed_form(name, steps, optim, marks)
    recorded = _per_seed(ds, var, name)[:, marks]
    return float(np.max(np.abs(recorded - expected)) / optim["lr"])


def epoch_loss(ds, name: str) -> np.ndarray:
    """(seeds, steps) training loss: the minibatch loss averaged over the trailing epoch."""
    data = results.config_of(ds)["config"]["data"]
    size, examples = data["batch_size"], data["examples"]
    window = max(1, examples // size) if 0 < size < examples else 1
    loss = _per_seed(ds, "loss", name)
    csum = np.cumsum(np.pad(loss, ((0, 0), (1, 0))), axis=1)
    end = np.arange(1, loss.shape[1] + 1)
    begin = np.maximum(end - window, 0)
    return (csum[:, end] - csum[:, begin]) / (end - begin)


def final_loss(ds, name: str) -> float:
    """Median over seeds of the last epoch's mean training loss."""
    return float(np.median(epoch_loss(ds, name)[:, -1]))


def _nan_first(x: float) -> tuple:
    """A sort key under which NaN (a diverged run) is the worst value, not an ignored one."""
    return (math.isnan(x), x)


def _landmark_checks(ds, names, steps, optim) -> list[Check]:
    lr, w = optim["lr"], optim["warmup_steps"]
    out = []
    if "step" in names:
        rec = _per_seed(ds, "lr", "step")[0]
        c, r = optim["cycles"], optim["decay_rate"]
        drops = sorted({w + math.floor((steps - w) * i / (c + 1)) for i in range(1, c + 1)})
        ratios = [rec[b] / rec[b - 1] for b in drops if 0 < b < steps]
        worst = max(ratios, key=lambda q: _nan_first(abs(q - r)))
        out.append(Check(f"step: lr[b]/lr[b-1] at drops b={drops}", worst, f"= decay_rate {r:g}",
                         abs(worst / r - 1) <= 1e-5))
    if "sgdr" in names:
        rec = _per_seed(ds, "lr", "sgdr")[0]
        period = max(1, (steps - w) // optim["cycles"])
        starts = [w + k * period for k in range(optim["cycles"])]
        back = float(np.min(rec[starts])) / lr
        out.append(Check(f"sgdr: min lr/peak at restarts t={starts}", back, "= 1", abs(back - 1) <= TOLERANCE))
    if "onecycle" in names:
        top = int(np.argmax(_per_seed(ds, "lr", "onecycle")[0]))
        want = w if 0 < w < steps else math.floor(ONECYCLE_PCT * steps)
        out.append(Check("onecycle: argmax_t lr / steps", top / steps, f"= {want / steps:g} (t={want})", top == want))
    if "warmup_cosine" in names:
        rec = _per_seed(ds, "lr", "warmup_cosine")[0]
        wc = optim["warmup_steps"] or max(1, steps // 10)
        half = rec[wc // 2] / lr
        out.append(Check(f"warmup_cosine: lr[{wc // 2}]/peak, lr[0] (W={wc})", half,
                         f"= {(wc // 2) / wc:g}, lr[0] = 0", rec[0] == 0 and abs(half - (wc // 2) / wc) <= TOLERANCE))
    return out


def checks(ds) -> list[Check]:
    ds = _with_axes(ds)
    steps, optim = _setup(ds)
    names = _schedules(ds)
    out = []
    for name in names:
        err = schedule_error(ds, name)
        out.append(Check(f"{name}: recorded lr = closed form (|err|/peak)", err, f"<= {TOLERANCE:g}", err <= TOLERANCE))
    out += _landmark_checks(ds, names, steps, optim)
    applied = float(np.max([schedule_error(ds, name, "lr_applied") for name in names]))
    out.append(Check("every schedule: optimizer's applied lr = closed form", applied, f"<= {TOLERANCE:g}",
                     applied <= TOLERANCE))
    annealed = [n for n in names if n != "constant"]
    if "constant" in names and annealed:
        worst = max(annealed, key=lambda n: _nan_first(final_loss(ds, n)))
        ratio = final_loss(ds, worst) / final_loss(ds, "constant")
        out.append(Check(f"final loss / constant's, worst annealed ({worst})", ratio, "< 1", ratio < 1))
    return out


# ----------------------------------------------------------------------------- figure

DECAYS = ("constant", "step", "exponential", "inverse_time", "cosine", "linear")
CYCLES = ("constant", "sgdr", "onecycle", "warmup_cosine")


def _loss_panel(ax, ds, names, colors, title):
    const = final_loss(ds, "constant") if "constant" in names else None
    t = ds["step"].values
    for name in names:
        if const is None:
            label = name
        elif name == "constant":
            label = f"constant ({const:.2g})"
        else:
            label = f"{name}  {final_loss(ds, name) / const:.2g}x"
        plotting.band(ax, t, epoch_loss(ds, name), label, color=colors[name])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(title)
    ax.legend(frameon=False, loc="upper right", fontsize=7,
              title="final loss / constant's" if const else None, title_fontsize=7)


def figures(ds) -> dict:
    ds = _with_axes(ds)
    steps, optim = _setup(ds)
    names = _schedules(ds)
    colors = {n: plotting.COLORS[i % len(plotting.COLORS)] for i, n in enumerate(names)}
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plotting.figure(rows + 2, cols, width=2.7, height=1.65)
    grid = axes[0, 0].get_gridspec()
    for ax in axes[rows:].flat:
        ax.remove()
    for ax in axes.flat[len(names):rows * cols]:
        ax.set_visible(False)

    t = ds["step"].values
    for i, name in enumerate(names):
        ax = axes.flat[i]
        ax.plot(t, _per_seed(ds, "lr", name)[0], color=colors[name], label="recorded lr")
        marks = landmarks(name, steps, optim)
        ax.plot(marks, closed_form(name, steps, optim, marks), "o", ms=3.2, mfc="none", mec="k", mew=0.7,
                label="closed form")
        ax.set_title(name, color=colors[name])
        ax.set_ylim(-0.05 * optim["lr"], 1.1 * optim["lr"])
        if i % cols == 0:
            ax.set_ylabel("learning rate")
    axes[0, 0].legend(loc="best", frameon=False, fontsize=6.5)

    panels = [(g, title) for g, title in ((DECAYS, "decays"), (CYCLES, "restarts, one cycle, warmup"))
              if any(n in names and n != "constant" for n in g)] or [(tuple(names), "")]
    span = cols // len(panels)
    for k, (group, title) in enumerate(panels):
        ax = fig.add_subplot(grid[rows:, k * span:(k + 1) * span])
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(True, alpha=0.25)
        title = f"training loss: {title}" if title else "training loss"
        _loss_panel(ax, ds, [n for n in names if n in group], colors, title)
        if k == 0:
            ax.set_ylabel("minibatch loss, mean over last epoch")

    cfg = results.config_of(ds)["config"]
    fig.suptitle(f"Learning-rate schedules (top: recorded lr, circles: closed form) and the training they give\n"
                 f"{cfg['optim']['name']}, peak lr {optim['lr']:g}, {steps} steps, batch {cfg['data']['batch_size']} "
                 f"of {cfg['data']['examples']}, {ds.sizes['seed']} seeds (line: median, band: min..max)", fontsize=10)
    return {"": fig}
