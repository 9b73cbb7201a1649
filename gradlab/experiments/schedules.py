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
A nonzero warmup_steps puts a linear 0 -> 1 warmup of W steps in front of the first six (onecycle's
rise and warmup_cosine's warmup last W instead).
The checks compare the recorded `lr`, and the learning rate the optimizer's inject_hyperparams
state actually applied, with these formulas written in numpy (float64) in gradlab.schedule_forms
at each schedule's landmark steps; then compare the training loss each schedule ends at with a
constant rate's: with Adam at a peak lr of 0.03 a constant rate keeps the minibatch loss hovering
(late in a long run it even creeps up), while every schedule that anneals lets it settle lower.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import numpy as np
import optax

from gradlab import results, trials
from gradlab.config import ExperimentConfig
from gradlab.engine import Trial
from gradlab.experiments import Check
from gradlab.schedule_forms import boundaries, closed_form, landmarks

NAME = "schedules"
CLAIM = "each lr schedule applies its closed form; where a constant peak lr hovers, every annealed one ends lower"
Config = ExperimentConfig
AXES = ["optim.schedule", "seed"]
TOLERANCE = 1e-6  # |recorded - closed form| / peak lr: float32 evaluation errs by ~1e-7 of the peak
STEP_RTOL = 1e-5  # step: |lr[b] / lr[b-1] - decay_rate| / decay_rate at each drop b


def trial(cfg) -> Trial:
    """supervised_mlp, plus `lr_applied`: the learning rate inject_hyperparams used this step."""
    base = trials.supervised_mlp(cfg)

    def step(hp, state):
        new_state, metrics = base.step(hp, state)
        # the learning rate in inject_hyperparams' hyperparams, not a schedule's count state
        applied = optax.tree_utils.tree_get(
            new_state.opt_state, "learning_rate", filtering=lambda _, value: isinstance(value, jax.Array)
        )
        return new_state, {**metrics, "lr_applied": applied}

    return Trial(base.init, step, base.metric_dims)


# ----------------------------------------------------------------------------- measured


def _per_seed(ds, var: str, name: str) -> np.ndarray:
    """(seeds, steps) of a recorded metric under one schedule."""
    return ds[var].sel({"optim.schedule": name}).transpose("seed", "step").values


def schedule_error(recorded_SxT, name: str, steps: int, optim: dict) -> float:
    """Max |recorded - closed form| over seeds and landmark steps, as a fraction of the peak lr."""
    marks = landmarks(name, steps, optim)
    expected = closed_form(name, steps, optim, marks)
    return float(np.max(np.abs(recorded_SxT[:, marks] - expected)) / optim["lr"])


def epoch_loss(loss_SxT, data: dict) -> np.ndarray:
    """(seeds, steps) training loss: the minibatch loss averaged over the trailing epoch."""
    size, examples = data["batch_size"], data["examples"]
    window = max(1, examples // size) if 0 < size < examples else 1
    csum = np.cumsum(np.pad(loss_SxT, ((0, 0), (1, 0))), axis=1)
    end = np.arange(1, loss_SxT.shape[1] + 1)
    begin = np.maximum(end - window, 0)
    return (csum[:, end] - csum[:, begin]) / (end - begin)


def _nan_first(x: float) -> tuple:
    """A sort key under which NaN (a diverged run) is the worst value, not an ignored one."""
    return (math.isnan(x), x)


class Measured(NamedTuple):
    steps: int
    optim: dict  # the run's optim config: the peak lr and each schedule's parameters
    lr: dict  # schedule -> recorded lr of the first seed, (steps,)
    lr_error: dict  # schedule -> max |recorded lr - closed form| / peak over seeds and landmarks
    applied_error: float  # the same for the lr the optimizer applied, max over schedules
    epoch_loss: dict  # schedule -> (seeds, steps) minibatch loss averaged over the trailing epoch
    final_loss: dict  # schedule -> median over seeds of the last epoch's mean loss
    step_ratio: float | None  # step: the lr[b] / lr[b-1] farthest from decay_rate over the drops b
    sgdr_restart: float | None  # sgdr: min lr / peak over the restarts
    onecycle_peak: int | None  # onecycle: argmax_t lr
    warmup_cosine_half: float | None  # warmup_cosine: lr[W // 2] / peak
    warmup_cosine_start: float | None  # warmup_cosine: lr[0]
    worst_annealed: str | None  # the annealed schedule with the highest final loss (None: no constant)


def measure(ds) -> Measured:
    cfg = results.run_config(ds)
    steps, optim = cfg["steps"], cfg["optim"]
    names = [str(s) for s in ds["optim.schedule"].values]
    recorded = {name: _per_seed(ds, "lr", name) for name in names}
    errors = {name: schedule_error(recorded[name], name, steps, optim) for name in names}
    applied = float(np.max([schedule_error(_per_seed(ds, "lr_applied", n), n, steps, optim) for n in names]))
    epochs = {name: epoch_loss(_per_seed(ds, "loss", name), cfg["data"]) for name in names}
    finals = {name: float(np.median(epochs[name][:, -1])) for name in names}
    lr = {name: rec[0] for name, rec in recorded.items()}
    at = boundaries(steps, optim)
    step_ratio = restart = peak = half = start = worst = None
    if "step" in names:
        ratios = [lr["step"][b] / lr["step"][b - 1] for b in at["step"] if 0 < b < steps]
        step_ratio = max(ratios, key=lambda q: _nan_first(abs(q - optim["decay_rate"])))
    if "sgdr" in names:
        restart = float(np.min(lr["sgdr"][at["sgdr"]])) / optim["lr"]
    if "onecycle" in names:
        peak = int(np.argmax(lr["onecycle"]))
    if "warmup_cosine" in names:
        half = lr["warmup_cosine"][at["warmup_cosine"] // 2] / optim["lr"]
        start = lr["warmup_cosine"][0]
    annealed = [n for n in names if n != "constant"]
    if "constant" in names and annealed:
        worst = max(annealed, key=lambda n: _nan_first(finals[n]))
    return Measured(steps, optim, lr, errors, applied, epochs, finals, step_ratio, restart, peak, half, start, worst)


def checks(m: Measured) -> list[Check]:
    steps, optim, at = m.steps, m.optim, boundaries(m.steps, m.optim)
    out = [
        Check.at_most(f"{name}: recorded lr = closed form (|err|/peak)", err, TOLERANCE)
        for name, err in m.lr_error.items()
    ]
    if m.step_ratio is not None:
        r = optim["decay_rate"]
        out.append(
            Check.near(f"step: lr[b]/lr[b-1] at drops b={at['step']}", m.step_ratio, r, STEP_RTOL * r, "decay_rate")
        )
    if m.sgdr_restart is not None:
        out.append(Check.near(f"sgdr: min lr/peak at restarts t={at['sgdr']}", m.sgdr_restart, 1.0, TOLERANCE))
    if m.onecycle_peak is not None:
        want = at["onecycle"]
        out.append(
            Check.near("onecycle: argmax_t lr / steps", m.onecycle_peak / steps, want / steps, 0.0, f"t={want}:")
        )
    if m.warmup_cosine_half is not None:
        wc = at["warmup_cosine"]
        target = (wc // 2) / wc
        out.append(
            Check.holds(
                f"warmup_cosine: lr[{wc // 2}]/peak, lr[0] (W={wc})",
                m.warmup_cosine_half,
                m.warmup_cosine_start == 0 and abs(m.warmup_cosine_half - target) <= TOLERANCE,
                f"{target:g} +- {TOLERANCE:g}, lr[0] = 0",
            )
        )
    out.append(Check.at_most("every schedule: optimizer's applied lr = closed form", m.applied_error, TOLERANCE))
    if m.worst_annealed is not None:
        ratio = m.final_loss[m.worst_annealed] / m.final_loss["constant"]
        out.append(Check.below(f"final loss / constant's, worst annealed ({m.worst_annealed})", ratio, 1.0))
    return out


# ----------------------------------------------------------------------------- figure


def figures(ds, m: Measured) -> dict:
    """Recorded lr against the closed forms, and the training losses (gradlab/experiments/_schedules_figures.py)."""
    from gradlab.experiments import _schedules_figures

    return _schedules_figures.draw(ds, m)
