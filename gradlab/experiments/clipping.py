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
The surface and both descents are gradlab.surfaces' (cliff_surface), computed once per run in plain
JAX (vmap over the grid) by `reference`, not in the sweep (it does not depend on the sweep's values),
and stored with the results: the figure reads it from there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import analysis, results, telemetry, transforms, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.experiments import Check
from gradlab.surfaces import CLIFF, CLIFF_KEYS, cliff_surface, step_lengths, wall_slope

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
    agc_threshold: float = param(
        0.01, low=0.0, low_open=True, doc="optim.clip=agc: bound on |g_u| / max(|w_u|, 1e-3) per unit"
    )


def with_threshold(cfg, hp: dict) -> dict:
    """hp with optim.clip_threshold set to the threshold of the config's clipping rule."""
    threshold = {"value": hp["value_threshold"], "agc": hp["agc_threshold"]}.get(
        cfg.optim.clip, hp["optim.clip_threshold"]
    )
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
            "clipped_elements": jnp.asarray(changed, jnp.float32) / size,
            "update_global_norm": telemetry.global_norm(view.updates),
        }

    return trials.supervised_mlp(cfg, hp_map=lambda hp, step: with_threshold(cfg, hp), metrics=clip_metrics)


# ----------------------------------------------------------------------------- the cliff


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


# ----------------------------------------------------------------------------- reading results


def by_kind(ds, var: str, kind: str) -> np.ndarray:
    """(lr, seed, step, ...) of one clipping rule."""
    point = ds[var].sel({"optim.clip": kind})
    return point.transpose("optim.lr", "seed", "step", ...).values.astype(float)


def kinds(ds) -> list[str]:
    return [str(k) for k in ds["optim.clip"].values]


def final_loss(ds, kind: str) -> np.ndarray:
    """(lr, seed): mean loss of the last 10 steps; inf where the run diverged or its loss is not finite."""
    diverged = ds["diverged"].sel({"optim.clip": kind}).transpose("optim.lr", "seed").values
    return analysis.final(by_kind(ds, "loss", kind), diverged, tail=10)


def demo_lr_index(ds) -> int:
    """The smallest rate at which no clipping fails to train (diverges, or ends above TRAINS x its
    start) on every seed; the largest rate if it trains everywhere."""
    lrs = ds["optim.lr"].values
    if "none" not in kinds(ds):
        return len(lrs) - 1
    start = by_kind(ds, "loss", "none")[..., 0]
    fails = np.all(~(final_loss(ds, "none") < TRAINS * start), axis=-1)
    return int(np.argmax(fails)) if fails.any() else len(lrs) - 1


def update_errors(ds, tau: float) -> tuple[float, float]:
    """Under global-norm clipping with SGD, max over recorded steps of | |update| / (lr min(|g|, tau)) - 1 |,
    and the same from the stock per-layer telemetry: update_norm_l = lr min(1, tau / |g|) grad_norm_l."""
    lr, g = by_kind(ds, "lr", "global_norm"), by_kind(ds, "grad_global_norm", "global_norm")
    expected = lr * np.minimum(g, tau)
    expected_layer = (lr * np.minimum(1.0, tau / g))[..., None] * by_kind(ds, "grad_norm", "global_norm")
    with np.errstate(invalid="ignore"):
        error = np.nanmax(np.abs(by_kind(ds, "update_global_norm", "global_norm") / expected - 1))
        return float(error), float(np.nanmax(np.abs(by_kind(ds, "update_norm", "global_norm") / expected_layer - 1)))


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
        start = by_kind(ds, "loss", "none")[i, :, 0]
        trains = {
            "unclipped_final": float(np.min(final_loss(ds, "none")[i] / start)),
            "clipped_final": float(np.max(final_loss(ds, "global_norm")[i] / start)),
        }
    surface = stored_cliff(ds)
    bound = CLIFF.lr * CLIFF.tau
    return Measured(
        i,
        float(ds["optim.lr"].values[i]),
        *(update_errors(ds, tau) if sgd_global else (None, None)),
        trains.get("unclipped_final"),
        trains.get("clipped_final"),
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
    if m.update_error is not None and m.layer_update_error is not None:
        out += [
            Check.at_most(
                "global_norm, SGD: | |update| / (lr min(|g|, tau)) - 1 |, max over steps", m.update_error, UPDATE_RTOL
            ),
            Check.at_most(
                "global_norm, SGD: per-layer update_norm / (lr min(1, tau/|g|) grad_norm) - 1, max",
                m.layer_update_error,
                UPDATE_RTOL,
            ),
        ]
    if m.unclipped_final is not None and m.clipped_final is not None:
        lr = f"lr={m.demo_lr:.3g}"
        out += [
            Check.at_least(f"no clipping at {lr}: final / initial loss, best seed", m.unclipped_final, TRAINS),
            Check.below(f"global_norm at {lr}: final / initial loss, worst seed", m.clipped_final, TRAINS),
        ]
    wall = m.cliff_wall / m.cliff_median
    return out + [
        Check.at_least("cliff: max |dL/dw| (>= grid difference quotient) / median |dL/dw|", wall, 100),
        Check.at_most(
            "cliff: clipped descent, longest step / (lr tau)",
            m.clipped_step,
            1 + m.step_slack,
            f"1 + {m.step_slack:.1g} (float32 rounding of the points)",
        ),
        Check.at_least("cliff: unclipped descent, longest step / (lr tau)", m.thrown_step, 10),
    ]


def figures(ds, m: Measured) -> dict:
    """The training figure and the cliff's (gradlab/experiments/_clipping_figures.py)."""
    from gradlab.experiments import _clipping_figures

    return _clipping_figures.draw(ds, m)
