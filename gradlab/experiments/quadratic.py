"""B1: optimizer paths on the ill-conditioned bowl L(w) = w0^2 + 4 w1^2 and on Rosenbrock (gradlab.surfaces).

On the bowl, gradient descent multiplies each coordinate by its own factor per step,
w_t = ((1 - 2 eta)^t w0, (1 - 8 eta)^t w1), so it is stable only for eta < 2 / lambda_max
= 2 / 8 = 0.25, and at the largest stable rates the steep coordinate flips sign every step
(the zigzag). Momentum, Nesterov and the adaptive methods (RMSProp, Adam, AdamW) take other
paths to the minimum; on Rosenbrock's curved valley GD crawls. Each optimizer is drawn at the
learning rate of the sweep whose loss settles below the tolerance in the fewest steps.
RMSProp is optax.rmsprop (decay = optim.b2, no bias correction), so its first step is
eta / sqrt(1 - b2), about 32 eta per coordinate at b2 = 0.999: the long first jump in the figure.

Stored results: `w` (dims ..., step, coord) is the iterate after step + 1 updates and `loss`
is L at that iterate, so the last step holds the final iterate and its loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, cast

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradlab import analysis, results, transforms
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.experiments import Check
from gradlab.surfaces import BOWL_CURVATURE, SURFACE, gd_closed_form

NAME = "quadratic"
CLAIM = (
    "GD zigzags on an ill-conditioned bowl and diverges for eta > 2/lambda_max = 0.25; "
    "momentum and Adam take other paths"
)
SURFACES = ("bowl", "rosenbrock")
AXES = ["surface", "optim.name", "optim.lr", "optim.weight_decay"]
STABLE_LR = 2.0 / max(BOWL_CURVATURE)  # GD is stable on the bowl iff eta < 0.25
TOLERANCE = 1e-6  # a path has arrived when its loss is at most this (best_paths, figure legend)
CHECK_STEPS = 30  # the closed-form check compares the iterate after this many updates
CLOSED_FORM_RTOL = 1e-4  # float32: ~30 steps x eps32 x 1/|1 - 8 eta| cancellation
GROWTH_RTOL = 1e-3  # past the edge: |w1| factor/step against |1 - 8 eta|, relative
TINY = 1e-30  # below this a float32 iterate may be flushed to zero; growth is measured above it
LABELS = {
    "sgd": "GD",
    "momentum": "momentum",
    "nesterov": "Nesterov",
    "rmsprop": "RMSProp",
    "adam": "Adam",
    "adamw": "AdamW",
    "adamw_decoupled": "AdamW (paper)",
    "adagrad": "AdaGrad",
    "lion": "Lion",
}


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the surface and where the optimizers start."""

    surface: str = param("bowl", choices=SURFACES, sweep="static", doc="the loss surface the optimizers descend")
    start: tuple[float, float] = param((3.0, 2.0), doc="start on the bowl (w0, w1)")
    rosenbrock_start: tuple[float, float] = param((-1.2, 1.0), doc="start on Rosenbrock (w0, w1)")


class State(NamedTuple):
    w: jax.Array  # (1, 2): a matrix, so the weight-decay mask of transforms (ndim >= 2) covers it
    opt_state: optax.OptState


def trial(cfg) -> Trial:
    """One optimizer on one surface from its start; records the iterate and loss after each update."""
    surface = SURFACE[cfg.surface]
    start = tuple(cfg.start) if cfg.surface == "bowl" else tuple(cfg.rosenbrock_start)

    def loss_fn(w_1x2):
        return surface.loss(w_1x2[0, 0], w_1x2[0, 1])

    def init(hp, key):
        del key  # the path is deterministic; the engine still passes a seed's key
        w = jnp.asarray([start], jnp.float32)
        return State(w, transforms.build(cfg.optim, hp, cfg.steps).init(w))

    def step(hp, state):
        tx = transforms.build(cfg.optim, hp, cfg.steps)
        grad = jax.grad(loss_fn)(state.w)
        updates, opt_state = tx.update(grad, state.opt_state, state.w)
        w = cast(jax.Array, optax.apply_updates(state.w, updates))  # optax types it as any pytree
        return State(w, opt_state), {"w": w[0], "loss": loss_fn(w)}

    return Trial(init, step, {"w": ("coord",)})


# ----------------------------------------------------------------------------- reading results


class Path2D(NamedTuple):
    """One sweep point's path, the start prepended: xy (updates + 1, 2), loss (updates + 1,)."""

    surface: str
    optimizer: str
    lr: float
    weight_decay: float
    xy: np.ndarray
    loss: np.ndarray
    diverged: bool

    def steps_to(self, tol: float) -> int | None:
        """Updates after which the loss stays <= tol to the end (None: it does not settle)."""
        return analysis.settling_step(self.loss, tol)


def paths(ds) -> list[Path2D]:
    """Every sweep point of a result set as a path from its start."""
    cfg = results.run_config(ds)
    sweep = [d for d in ds["loss"].dims if d != "step"]
    out = []
    for index in np.ndindex(*(ds.sizes[d] for d in sweep)):
        point = ds.isel(dict(zip(sweep, index)))
        surface = str(point["surface"].item())
        start = np.asarray(cfg["start"] if surface == "bowl" else cfg["rosenbrock_start"], float)
        xy = np.concatenate([start[None], point["w"].transpose("step", "coord").values.astype(float)])
        loss = np.concatenate([[SURFACE[surface].loss(*start)], point["loss"].values.astype(float)])
        out.append(
            Path2D(
                surface,
                str(point["optim.name"].item()),
                float(point["optim.lr"]),
                float(point["optim.weight_decay"]),
                xy,
                loss,
                bool(point["diverged"].item()),
            )
        )
    return out


def closed_form_error(p: Path2D) -> float:
    """Max relative error of the iterate after min(steps, 30) updates against the closed form."""
    t = min(CHECK_STEPS, len(p.xy) - 1)
    expected, got = gd_closed_form(p.xy[0], p.lr, t), p.xy[t]
    err = np.where(expected == 0, np.abs(got), np.abs(got - expected) / np.where(expected == 0, 1, np.abs(expected)))
    return float(np.max(err))


def growth_per_step(p: Path2D) -> float:
    """(|w1_t| / |w1_0|)^(1/t) over the first 30 updates (fewer where it leaves float32's range)."""
    return analysis.growth_per_step(p.xy[: CHECK_STEPS + 1, 1], TINY, 1e30)


def grows(p: Path2D) -> bool:
    """Whether the path diverged or its last finite iterate lies farther out than its start."""
    finite = np.all(np.isfinite(p.xy), axis=1)
    return p.diverged or bool(np.linalg.norm(p.xy[finite][-1]) > np.linalg.norm(p.xy[0]))


class Measured(NamedTuple):
    best: dict[str, dict[str, Path2D | None]]  # surface -> optimizer -> its fastest path (best_paths)
    gd: list[Path2D]  # GD on the bowl with no decay, clipping or schedule, by lr (the closed form holds)
    exact: list[Path2D]  # those finite through CHECK_STEPS updates
    closed_form_error: float | None  # max over `exact` of the relative error against the closed form
    stable_growth: float | None  # max |w1| factor per step over GD at eta < 2/8 (None: none, or w1 = 0)
    stable_stays: bool  # none of those diverges or ends farther out than it starts
    unstable_growth: float | None  # |w1| factor per step of GD at the smallest eta > 2/8
    unstable_theory: float | None  # |1 - 8 eta| at that eta
    unstable_all_grow: bool  # every GD path at eta > 2/8 diverges or ends farther out than it starts


def measure(ds) -> Measured:
    every = paths(ds)
    optim = results.run_config(ds)["optim"]
    gd = []
    if optim["clip"] == "none" and optim["schedule"] == "constant" and not optim["warmup_steps"]:
        gd = sorted(
            [p for p in every if p.surface == "bowl" and p.optimizer == "sgd" and p.weight_decay == 0],
            key=lambda p: p.lr,
        )
    exact = [p for p in gd if np.all(np.isfinite(p.xy[: CHECK_STEPS + 1]))]
    error = max(closed_form_error(p) for p in exact) if exact else None
    moves = bool(gd) and gd[0].xy[0, 1] != 0  # on the flat axis the steep direction never moves
    stable = [p for p in gd if p.lr < STABLE_LR] if moves else []
    unstable = [p for p in gd if p.lr > STABLE_LR] if moves else []
    stable_growth = max(growth_per_step(p) for p in stable) if stable else None
    unstable_growth = growth_per_step(unstable[0]) if unstable else None
    theory = abs(1 - max(BOWL_CURVATURE) * float(np.float32(unstable[0].lr))) if unstable else None
    stays, all_grow = not any(grows(p) for p in stable), all(grows(p) for p in unstable)
    return Measured(best_paths(every), gd, exact, error, stable_growth, stays, unstable_growth, theory, all_grow)


def checks(m: Measured) -> list[Check]:
    out = []
    if m.closed_form_error is not None:
        t = min(CHECK_STEPS, len(m.exact[0].xy) - 1)
        lrs = "eta=" + ", ".join(f"{p.lr:g}" for p in m.exact) if len(m.exact) <= 3 else f"{len(m.exact)} lrs"
        name = f"GD bowl, {lrs}: w_{t} vs ((1-2eta)^{t} w0, (1-8eta)^{t} w1), rel. err"
        out.append(Check.at_most(name, m.closed_form_error, CLOSED_FORM_RTOL))
    if m.stable_growth is not None:
        count = sum(p.lr < STABLE_LR for p in m.gd)
        out.append(
            Check.holds(
                f"GD bowl, eta < {STABLE_LR:g}: max |w1| factor/step ({count} lrs)",
                m.stable_growth,
                m.stable_growth < 1 and m.stable_stays,
                "< 1 (converges)",
            )
        )
    if m.unstable_growth is not None and m.unstable_theory is not None:
        lr = next(p.lr for p in m.gd if p.lr > STABLE_LR)
        ok = m.unstable_growth > 1 and abs(m.unstable_growth / m.unstable_theory - 1) < GROWTH_RTOL
        out.append(
            Check.holds(
                f"GD bowl, eta={lr:g} > {STABLE_LR:g}: |w1| factor/step",
                m.unstable_growth,
                ok and m.unstable_all_grow,
                f"|1-8eta| = {m.unstable_theory:.4g} > 1 (diverges)",
            )
        )
    return out


def best_paths(every: list[Path2D]) -> dict[str, dict[str, Path2D | None]]:
    """Per surface, per optimizer: the sweep point whose loss settles <= TOLERANCE first (else the
    lowest final loss); None where every point of that optimizer diverged.

    AdamW is taken at the largest weight decay of the sweep, the others at the smallest.
    """
    decays = sorted({p.weight_decay for p in every})
    order = {name: i for i, name in enumerate(LABELS)}
    best: dict[str, dict[str, Path2D | None]] = {}
    for p in sorted(every, key=lambda p: (SURFACES.index(p.surface), order[p.optimizer])):
        chosen = best.setdefault(p.surface, {}).setdefault(p.optimizer, None)
        if p.diverged or p.weight_decay != (decays[-1] if p.optimizer == "adamw" else decays[0]):
            continue
        if chosen is None or _speed(p) < _speed(chosen):
            best[p.surface][p.optimizer] = p
    return best


def _speed(p: Path2D) -> tuple[float, float]:
    n = p.steps_to(TOLERANCE)
    return (n if n is not None else np.inf, p.loss[-1])


def figures(ds, m: Measured) -> dict:
    """The paths on each surface and GD's stability edge (gradlab/experiments/_quadratic_figures.py)."""
    from gradlab.experiments import _quadratic_figures

    return _quadratic_figures.draw(ds, m)
