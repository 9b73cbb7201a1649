"""B4: learning-rate schedules apply their closed forms; annealing beats a constant rate's noise floor.

Every schedule is the traced peak `lr` times a shape with peak 1 (transforms.schedule_shape).
With T = steps, W = warmup_steps, n = T - W (the steps after warmup), r = decay_rate,
a = final_lr_fraction and c = cycles, the shapes are (t counted from the end of warmup):
  constant       1
  step           r**k after the k-th of c drops at steps floor(n i / (c + 1)), i = 1..c
  exponential    r**(t/n)                                     (optax.exponential_decay)
  inverse_time   1 / (1 + (1/r - 1) t/n), which reaches r at t = n
  cosine         a + (1 - a) (1 + cos(pi t/n)) / 2            (Loshchilov & Hutter 2017)
  sgdr           the cosine over each of c periods P = n // c, back to 1 at every t = kP
  onecycle       cosine 1/25 -> 1 over p = floor(0.3 T) steps, then 1 -> 1/(25e4) over the
                 rest (optax.cosine_onecycle_schedule; Smith & Topin 2017)
  warmup_cosine  t/W over W = warmup_steps or T // 10, then the cosine over T - W steps
A nonzero warmup_steps puts a linear 0 -> 1 warmup of W steps in front of the first six.
The checks compare the recorded `lr` (and the learning rate the optimizer's
inject_hyperparams state actually applied) with these formulas, written here in numpy.
"""

from __future__ import annotations

import math

import numpy as np

from gradlab import plotting, results, trials
from gradlab.config import ExperimentConfig
from gradlab.engine import Trial
from gradlab.experiments import Check

NAME = "schedules"
CLAIM = "each lr schedule applies its closed form; annealed schedules end below a constant lr's noise floor"
Config = ExperimentConfig
TOLERANCE = 1e-5  # float32 schedule arithmetic: relative error, or absolute below FLOOR
FLOOR = 1e-3  # values below FLOOR x peak are compared absolutely (cos(pi t/T) near -1 cancels)
ONECYCLE_PCT = 0.3
ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 25.0, 1e4


def trial(cfg) -> Trial:
    """supervised_mlp, plus `lr_applied`: the learning rate inject_hyperparams used this step."""
    import jax
    import optax

    base = trials.supervised_mlp(cfg)
    is_array = lambda path, value: isinstance(value, jax.Array)  # noqa: E731 (not the schedule's own state)

    def step(hp, state):
        new_state, metrics = base.step(hp, state)
        applied = optax.tree_utils.tree_get(new_state.opt_state, "learning_rate", filtering=is_array)
        return new_state, {**metrics, "lr_applied": applied}

    return Trial(base.init, step, base.metric_dims)


# ----------------------------------------------------------------------------- closed forms


def _cosine(t, span, alpha):
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
        return np.where(t < c * period, _cosine(t % period, period, a), a)
    raise ValueError(f"no closed form for schedule {name!r}")


def closed_form(name: str, steps: int, optim: dict, t=None) -> np.ndarray:
    """The learning rate of schedule `name` at steps t (default 0..steps-1), from the formulas."""
    t = np.arange(steps, dtype=np.float64) if t is None else np.asarray(t, np.float64)
    lr = optim["lr"]
    if name == "onecycle":
        p = math.floor(ONECYCLE_PCT * steps)
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
        edges.add(math.floor(ONECYCLE_PCT * steps))
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
    """`ds` with a schedule axis (and a seed axis) even when the run had a single value."""
    cfg = results.config_of(ds)["config"]
    if "optim.schedule" not in ds.dims:
        ds = ds.expand_dims({"optim.schedule": [cfg["optim"]["schedule"]]})
    if "seed" not in ds.dims:
        ds = ds.expand_dims({"seed": [cfg["seed"]]})
    return ds


def _lr(ds, name, var="lr") -> np.ndarray:
    """(seeds, steps) of a recorded learning rate."""
    da = ds[var].sel({"optim.schedule": name})
    return da.transpose(..., "step").values.reshape(-1, ds.sizes["step"])


def schedule_error(ds, name: str, var: str = "lr") -> float:
    """Max relative error of the recorded lr against its closed form at the landmark steps."""
    steps, optim = _setup(ds)
    marks = landmarks(name, steps, optim)
    expected = closed_form(name, steps, optim, marks)
    recorded = _lr(ds, name, var)[:, marks]
    scale = np.maximum(np.abs(expected), FLOOR * optim["lr"])
    return float(np.max(np.abs(recorded - expected) / scale))


def _schedules(ds) -> list[str]:
    return [str(s) for s in ds["optim.schedule"].values]


def epoch_loss(ds, name: str) -> np.ndarray:
    """(seeds, steps) training loss, the minibatch loss averaged over the trailing epoch."""
    cfg = results.config_of(ds)["config"]["data"]
    size = cfg["batch_size"]
    window = max(1, cfg["examples"] // size) if 0 < size < cfg["examples"] else 1
    loss = ds["loss"].sel({"optim.schedule": name}).transpose(..., "step").values.reshape(-1, ds.sizes["step"])
    csum = np.cumsum(np.pad(loss, ((0, 0), (1, 0))), axis=1)
    idx = np.arange(1, loss.shape[1] + 1)
    lo = np.maximum(idx - window, 0)
    return (csum[:, idx] - csum[:, lo]) / (idx - lo)


def final_loss(ds, name: str) -> float:
    """Median over seeds of the last epoch's mean training loss."""
    return float(np.median(epoch_loss(ds, name)[:, -1]))


def checks(ds) -> list[Check]:
    ds = _with_axes(ds)
    steps, optim = _setup(ds)
    names = _schedules(ds)
    out = []
    for name in names:
        err = schedule_error(ds, name)
        out.append(Check(f"{name}: lr = closed form (max rel err)", err, f"<= {TOLERANCE:g}", err <= TOLERANCE))
    lr = optim["lr"]
    if "step" in names:
        rec = _lr(ds, "step")[0]
        w, c = optim["warmup_steps"], optim["cycles"]
        drops = [w + math.floor((steps - w) * i / (optim["cycles"] + 1)) for i in range(1, c + 1)]
        ratios = [rec[b] / rec[b - 1] for b in drops]
        worst = max(ratios, key=lambda q: abs(q - optim["decay_rate"]))
        out.append(Check(f"step: lr[b]/lr[b-1] at drops {drops}", worst, f"= decay_rate {optim['decay_rate']:g}",
                         math.isclose(worst, optim["decay_rate"], rel_tol=TOLERANCE)))
    if "sgdr" in names:
        rec = _lr(ds, "sgdr")[0]
        w = optim["warmup_steps"]
        period = max(1, (steps - w) // optim["cycles"])
        starts = [w + k * period for k in range(optim["cycles"])]
        peak = min(rec[s] for s in starts) / lr
        out.append(Check(f"sgdr: min lr/peak at restarts {starts}", peak, "= 1", abs(peak - 1) <= TOLERANCE))
    if "onecycle" in names:
        top = int(np.argmax(_lr(ds, "onecycle")[0])) / steps
        out.append(Check("onecycle: argmax lr / steps", top, f"= {ONECYCLE_PCT:g} (floor of 0.3 T)",
                         int(np.argmax(_lr(ds, "onecycle")[0])) == math.floor(ONECYCLE_PCT * steps)))
    if "warmup_cosine" in names:
        rec = _lr(ds, "warmup_cosine")[0]
        wc = optim["warmup_steps"] or max(1, steps // 10)
        half = rec[wc // 2] / lr
        out.append(Check(f"warmup_cosine: lr[0], lr[{wc // 2}]/peak (W={wc})", half, f"lr[0] = 0, {(wc // 2) / wc:g}",
                         rec[0] == 0 and abs(half - (wc // 2) / wc) <= TOLERANCE))
    applied = max(schedule_error(ds, name, "lr_applied") for name in names)
    out.append(Check("optimizer's applied lr = closed form (all)", applied, f"<= {TOLERANCE:g}", applied <= TOLERANCE))
    if "constant" in names:
        const = final_loss(ds, "constant")
        annealed = [n for n in ("cosine", "warmup_cosine", "step") if n in names]
        if annealed:
            best = max(final_loss(ds, n) for n in annealed) / const
            out.append(Check(f"final loss {'/'.join(annealed)} / constant (worst)", best, "< 1", best < 1))
    return out


# ----------------------------------------------------------------------------- figure


def figures(ds) -> dict:
    ds = _with_axes(ds)
    steps, optim = _setup(ds)
    names = _schedules(ds)
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plotting.figure(rows + 2, cols, width=2.6, height=1.7)
    gs = axes[0, 0].get_gridspec()
    for ax in axes[rows:].flat:
        ax.remove()
    loss_ax = fig.add_subplot(gs[rows:, :])
    loss_ax.grid(True, alpha=0.25)
    loss_ax.spines[["top", "right"]].set_visible(False)
    t = np.arange(ds.sizes["step"])
    for i, name in enumerate(names):
        color = plotting.COLORS[i % len(plotting.COLORS)]
        ax = axes.flat[i]
        ax.plot(t, _lr(ds, name)[0], color=color, label="recorded lr")
        marks = landmarks(name, steps, optim)
        ax.plot(marks, closed_form(name, steps, optim, marks), "o", ms=3.2, mfc="none", mec="k", mew=0.7,
                label="closed form")
        ax.set_title(name, color=color)
        ax.set_ylim(-0.05 * optim["lr"], 1.08 * optim["lr"])
        if i % cols == 0:
            ax.set_ylabel("learning rate")
        if i // cols == rows - 1:
            ax.set_xlabel("step")
        plotting.band(loss_ax, t, epoch_loss(ds, name), name, color=color)
    for ax in axes.flat[len(names):rows * cols]:
        ax.set_visible(False)
    axes[0, 0].legend(loc="upper right", frameon=False, fontsize=6.5)
    loss_ax.set_yscale("log")
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss (mean over last epoch)")
    loss_ax.legend(ncol=4, frameon=False, loc="upper right")
    const = final_loss(ds, "constant") if "constant" in names else None
    if const is not None:
        lines = [f"final loss / constant's ({const:.2g}):"]
        lines += [f"{n}: {final_loss(ds, n) / const:.2f}" for n in names if n != "constant"]
        plotting.note(loss_ax, "\n".join(lines), loc="lower left")
    cfg = results.config_of(ds)["config"]
    fig.suptitle(f"Learning-rate schedules: shape (line: recorded lr; circles: closed form) and training loss\n"
                 f"{cfg['optim']['name']}, peak lr {optim['lr']:g}, {steps} steps, batch {cfg['data']['batch_size']}, "
                 f"{ds.sizes['seed']} seeds (band: min..max)", fontsize=10)
    return {"": fig}
