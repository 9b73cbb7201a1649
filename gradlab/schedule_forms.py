"""Closed forms of gradlab's learning-rate schedules in numpy (float64): an independent reference.

gradlab.transforms builds its schedules from optax; this module writes the same shapes from their
formulas, with no jax import, so that a recorded or applied learning rate can be compared with what
the schedule should be. Every schedule is the peak `lr` times a shape with peak 1. With T = steps,
W = warmup_steps, n = T - W (the steps after warmup), r = decay_rate, a = final_lr_fraction and
c = cycles, the shapes are (t counted from the end of warmup):
  constant       1
  step           r**k after the k-th of c drops at steps floor(n i / (c + 1)), i = 1..c
  exponential    r**(t/n)                                     (optax.exponential_decay)
  inverse_time   1 / (1 + (1/r - 1) t/n), which reaches r at t = n
  cosine         a + (1 - a) (1 + cos(pi t/n)) / 2            (Loshchilov & Hutter 2017)
  linear         1 + (a - 1) t/n, held at a after n
  sgdr           the cosine over each of c periods P = n // c (the last one takes the n - (c-1)P
                 steps left), back to 1 at every t = kP
  onecycle       cosine 1/25 -> 1 over p = W, or int(0.3 T) with no warmup, steps, then
                 1 -> 1/(25e4) over the rest (optax.cosine_onecycle_schedule; Smith & Topin 2017)
  warmup_cosine  t/W over W = warmup_steps or T // 10, then the cosine over T - W steps
A nonzero warmup_steps puts a linear 0 -> 1 warmup of W steps in front of all but onecycle and
warmup_cosine, whose own rise it sets.

`optim` is an optim config as a dict: lr, warmup_steps, decay_rate, final_lr_fraction, cycles.
"""

from __future__ import annotations

import math

import numpy as np

ONECYCLE_PCT = 0.3
ONECYCLE_DIV, ONECYCLE_FINAL_DIV = 25.0, 1e4


def _cosine(t, span, alpha):
    """alpha + (1 - alpha) (1 + cos(pi t/span)) / 2, held at alpha after span."""
    span = max(span, 1)  # a zero-length phase (onecycle with T < 4) is never on the taken branch
    t = np.minimum(t, span)
    return alpha + (1 - alpha) * 0.5 * (1 + np.cos(np.pi * t / span))


def boundaries(steps: int, optim: dict) -> dict:
    """Where schedules change course: step's drops W + floor(n i / (c + 1)), i = 1..c; sgdr's restarts
    W + k P, k = 0..c-1; onecycle's peak (W, or int(0.3 T) with no warmup); warmup_cosine's W."""
    w, c = optim["warmup_steps"], optim["cycles"]
    n = max(1, steps - w)
    return {
        "step": sorted({w + math.floor(n * i / (c + 1)) for i in range(1, c + 1)}),
        "sgdr": [w + k * max(1, n // c) for k in range(c)],
        "onecycle": w if 0 < w < steps else math.floor(ONECYCLE_PCT * steps),
        "warmup_cosine": w or max(1, steps // 10),
    }


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
        p = boundaries(steps, optim)["onecycle"]
        start, end = 1 / ONECYCLE_DIV, 1 / (ONECYCLE_DIV * ONECYCLE_FINAL_DIV)
        up = start + (1 - start) * (1 - _cosine(t, p, 0.0))
        down = _cosine(t - p, steps - p, end)
        return lr * np.where(t < p, up, np.where(t < steps, down, end))
    if name == "warmup_cosine":
        w = boundaries(steps, optim)["warmup_cosine"]
        span = max(steps, w + 1) - w
        return lr * np.where(t < w, t / w, _cosine(t - w, span, optim["final_lr_fraction"]))
    w = optim["warmup_steps"]
    n = max(1, steps - w)
    after = _warmup_free(name, np.maximum(t - w, 0), n, optim)
    return lr * (np.where(t < w, t / max(w, 1), after) if w else after)


def landmarks(name: str, steps: int, optim: dict) -> list[int]:
    """Steps where a schedule does something: its ends, quarters, boundaries and either side."""
    w, at = optim["warmup_steps"], boundaries(steps, optim)
    marks = {0, steps // 4, steps // 2, 3 * steps // 4, steps - 1}
    edges = {w} if w and name not in ("onecycle", "warmup_cosine") else set()
    if name in ("step", "sgdr"):
        edges |= set(at[name])
    if name == "onecycle":
        edges.add(at[name])
    if name == "warmup_cosine":
        edges |= {at[name] // 2, at[name]}
    marks |= {e + d for e in edges for d in (-1, 0, 1)}
    return sorted(m for m in marks if 0 <= m < steps)
