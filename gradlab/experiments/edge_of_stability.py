"""Full-batch training rises to the edge of stability: the top Hessian eigenvalue climbs to the
optimizer's stability threshold and hovers there while the loss keeps falling.

Gradient descent on a quadratic with curvature lambda is stable iff eta * lambda < 2. On a neural
net full-batch GD sharpens progressively: lambda_max(t) rises from well below 2/eta until it reaches
2/eta and then stays at it, the loss falling non-monotonically (Cohen et al. 2021). Heavy-ball
momentum beta has the threshold (2 + 2 beta)/eta; Adam's preconditioned sharpness lambda_max(P^-1 H),
P = diag(sqrt(v_hat) + eps), settles at (2 + 2 beta1)/((1 - beta1) eta) = 38/eta for beta1 = 0.9
(Cohen et al. 2022). Started above 2/lambda_0 (the catapult, Lewkowycz et al. 2020) the loss first
spikes, the sharpness falls below 2/eta and training goes on; far enough above it diverges.

Each `variant` is one compiled program (gd, momentum, adam, catapult); its learning rates are vmapped
along `lr_index` (gd_lrs, momentum_lrs, adam_lrs; the catapult's as catapult_factors x 2/lambda_0 of
each lane's own init). lambda_max is tracked inside the scan every `sharpness_every` steps by
`power_iterations` warm-started HVP power steps (gradlab.curvature.top_eigenpair: rerun shifted when it
lands on a negative eigenvalue, as Adam's P^-1 H can early on; skipped, not masked, in between).
Heavy-ball runs at beta = 0.5 (optim.momentum): at beta = 0.9 the effective rate eta/(1 - beta) fits
the 256 examples (loss ~1e-12) before lambda_max reaches 3.8/eta (1 of 4 rates did); the threshold
(2 + 2 beta)/eta holds for any beta.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import curvature, data, models, results, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check
from gradlab.inits import INIT_SCHEMES

NAME = "edge_of_stability"
CLAIM = "full-batch GD, momentum and Adam sharpen until lambda_max sits at their 2/eta-type threshold; catapults"
VARIANTS = ("gd", "momentum", "adam", "catapult")
OPTIMIZER = {"gd": "sgd", "momentum": "momentum", "adam": "adam", "catapult": "sgd"}
# the Config key of each variant's learning rates (the catapult's: factors of 2/lambda_0)
RATES = {"gd": "gd_lrs", "momentum": "momentum_lrs", "adam": "adam_lrs", "catapult": "catapult_factors"}
AXES = ["variant", "lr_index"]
INIT_ITERATIONS = 100  # power steps for lambda_0 at init (the catapult's unit, every lane's warm start)
EDGE = (0.9, 1.1)  # the median over the last half of eta lambda / threshold, for every lane at the edge
ADAM_EDGE = (0.85, 1.15)
REACHED = EDGE[0]  # a lane reaches the edge when eta lambda / threshold first exceeds this in the first half
BLOW_UP = 1e3  # a catapult's loss peak above this x the initial loss: beyond its limit
WELL_BELOW = 0.75  # progressive sharpening: eta lambda_0 / threshold at most this


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the variant (its own program), its learning rates and the tracking cost."""

    variant: str = param("gd", choices=VARIANTS, sweep="static", doc="optimizer variant (one compile each)")
    lr_index: int = param(0, low=0, sweep="traced", doc="which of the variant's learning rates (vmapped)")
    gd_lrs: tuple[float, ...] = param((0.08, 0.1, 0.12, 0.14), doc="full-batch GD learning rates")
    momentum_lrs: tuple[float, ...] = param((0.11, 0.14, 0.17, 0.2), doc="heavy-ball (optim.momentum) rates")
    adam_lrs: tuple[float, ...] = param((0.005, 0.007, 0.01, 0.014), doc="Adam rates (optim.b1, b2, eps)")
    catapult_factors: tuple[float, ...] = param((1.5, 2.0, 3.0, 16.0), doc="catapult rates in units of 2/lambda_0")
    catapult_steps: int = param(200, low=1, doc="the catapult is read over these first steps")
    catapult_activation: str = param("relu", choices=models.ACTIVATIONS, doc="the catapult variant's activation")
    catapult_init: str = param("he_normal", choices=INIT_SCHEMES, doc="the catapult variant's init scheme")
    sharpness_every: int = param(5, low=1, doc="measure lambda_max every this many steps")
    power_iterations: int = param(20, low=1, doc="warm-started power steps (HVPs) per measurement")

    def validate(self) -> None:
        super().validate()
        for key in RATES.values():
            values = getattr(self, key)
            if not values or min(values) <= 0:
                raise ConfigError(f"needs a non-empty list of positive numbers, got {list(values)}", key=key)
            if self.lr_index >= len(values):
                raise ConfigError(f"{self.lr_index} indexes no rate of {key} ({len(values)} of them)", key="lr_index")
        if self.catapult_steps > self.steps:
            raise ConfigError(f"must be <= steps = {self.steps}, got {self.catapult_steps}", key="catapult_steps")


def cost(cfg) -> str:
    """The curvature tracking's cost, for --dry-run."""
    per_run = -(-cfg.steps // cfg.sharpness_every)
    return (
        f"curvature: {cfg.power_iterations} HVPs per measurement (~2 gradients each; twice that on one that lands on "
        f"a negative eigenvalue), {per_run} measurements per "
        f"lane (every {cfg.sharpness_every} steps) + {INIT_ITERATIONS + 1} HVPs at init"
    )


class State(NamedTuple):
    train: trials.TrainState
    lr: jax.Array
    vector: jax.Array  # the last measurement's eigenvector: the next one's warm start


def trial(cfg) -> Trial:
    """supervised_mlp with the lane's rate and lambda_max (of H, or of P^-1 H for Adam) tracked."""
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, name=OPTIMIZER[cfg.variant]))
    if cfg.variant == "catapult":  # a ReLU net catapults over a wide range, up to ~12/lambda_0 (Lewkowycz et al.)
        model = dataclasses.replace(cfg.model, activation=cfg.catapult_activation, init=cfg.catapult_init)
        cfg = dataclasses.replace(cfg, model=model)
    scheme = INIT_SCHEMES.index(cfg.model.init)
    base = trials.supervised_mlp(cfg, hp_map=lambda hp, step: {**hp, "model.init": scheme})
    spec = trials.mlp_spec(cfg)
    table = jnp.asarray(getattr(cfg, RATES[cfg.variant]), jnp.float32)

    def loss_of(hp, xy):
        hyper = models.MLPHyper.from_hp(hp)
        return lambda params: data.loss(cfg.data, models.apply(params, xy.x, spec, hyper)[0], xy.y)

    def init(hp, key):
        train = base.init(hp, key)
        matvec, n = curvature.flat_hvp(loss_of(hp, train.data), train.params)
        v0 = jax.random.normal(jax.random.fold_in(key, 1), (n,))
        lam0, v = curvature.power_iteration(matvec, v0, INIT_ITERATIONS)
        factor = table[hp["lr_index"]]
        lr = factor * 2.0 / lam0 if cfg.variant == "catapult" else factor
        return State(train, lr, v)

    def step(hp, state):
        train, metrics = base.step({**hp, "optim.lr": state.lr}, state.train)
        matvec, _ = curvature.flat_hvp(loss_of(hp, state.train.data), state.train.params)
        if cfg.variant == "adam":  # P from the state after this step's update: the P that update used
            p_diag = curvature.adam_preconditioner(train.opt_state, hp["optim.b2"], hp["optim.eps"])
            matvec = curvature.preconditioned(matvec, p_diag)
        due = state.train.step % cfg.sharpness_every == 0
        lam, v = curvature.top_eigenpair(matvec, state.vector, jnp.where(due, cfg.power_iterations, 0))
        return State(train, state.lr, v), {**metrics, "sharpness": lam, "lr": state.lr}

    return Trial(init, step)


# ----------------------------------------------------------------------------- measured


class Lane(NamedTuple):
    variant: str
    lr: float
    threshold: float  # eta lambda at the edge
    loss: np.ndarray  # (steps,)
    steps: np.ndarray  # the measured steps
    sharpness: np.ndarray  # lambda_max (of P^-1 H for adam) at those steps
    diverged: bool

    @property
    def ratio(self) -> np.ndarray:
        """eta lambda / threshold at the measured steps: 1 at the edge."""
        return self.lr * self.sharpness / self.threshold

    def reached(self, steps: int) -> bool:
        first = self.steps < steps / 2
        return not self.diverged and bool(np.any(self.ratio[first] >= REACHED))

    def blew_up(self, window: int) -> bool:
        """Beyond the catapult's limit: diverged, or the loss thrown up BLOW_UP-fold in the first `window`
        steps (a ReLU net thrown that far lands dead: finite, its loss flat, its sharpness ~0)."""
        return self.diverged or bool(np.nanmax(self.loss[:window]) > BLOW_UP * self.loss[0])

    def edge_median(self, steps: int) -> float:
        return float(np.median(self.ratio[self.steps >= steps / 2]))


def lanes(ds) -> list[Lane]:
    optim = results.run_config(ds)["optim"]
    out = []
    for variant in ds["variant"].values:
        for i in ds["lr_index"].values:
            point = ds.sel({"variant": variant, "lr_index": i})
            if not np.isfinite(point["lr"].isel(step=0).values):  # an index this variant has no rate for
                continue
            sharp = point["sharpness"].values.astype(float)
            measured = np.nonzero(np.isfinite(sharp))[0]
            out.append(
                Lane(
                    str(variant),
                    float(point["lr"].isel(step=0)),
                    curvature.stability_threshold(OPTIMIZER[str(variant)], optim["momentum"], optim["b1"]),
                    point["loss"].values.astype(float),
                    measured,
                    sharp[measured],
                    bool(point["diverged"].values),
                )
            )
    return out


class Measured(NamedTuple):
    lanes: list[Lane]
    steps: int
    catapult_steps: int
    initial_ratio: dict[str, float]  # variant -> max over lanes of eta lambda_0 / threshold (EoS variants)
    reached: dict[str, int]  # variant -> lanes reaching the edge in the first half
    worst_edge: dict[str, float]  # variant -> the lane's last-half median farthest from 1
    catapult_peak: float | None  # min over surviving catapult lanes of peak loss / initial loss
    catapult_final: float | None  # max over them of eta lambda / 2 at the end of catapult_steps
    catapult_survivors: int
    catapult_diverged: int  # diverged or blew up (Lane.blew_up)


def measure(ds) -> Measured:
    cfg = results.run_config(ds)
    steps, window = int(cfg["steps"]), int(cfg["catapult_steps"])
    found = lanes(ds)
    initial, reached, worst = {}, {}, {}
    for variant in dict.fromkeys(lane.variant for lane in found if lane.variant != "catapult"):
        mine = [lane for lane in found if lane.variant == variant]
        initial[variant] = max(float(lane.ratio[0]) for lane in mine)
        edge = [lane.edge_median(steps) for lane in mine if lane.reached(steps)]
        reached[variant] = len(edge)
        worst[variant] = max(edge, key=lambda r: abs(r - 1)) if edge else float("nan")
    jumps = [lane for lane in found if lane.variant == "catapult"]
    alive = [lane for lane in jumps if not lane.blew_up(window)]
    peak = final = None
    if alive:
        peak = min(float(np.max(lane.loss[:window]) / lane.loss[0]) for lane in alive)
        late = [lane.ratio[(lane.steps >= 0.75 * window) & (lane.steps < window)] for lane in alive]
        final = max(float(np.median(r)) for r in late)  # the last quarter's median: GD at 2/eta oscillates
    return Measured(found, steps, window, initial, reached, worst, peak, final, len(alive), len(jumps) - len(alive))


def checks(m: Measured) -> list[Check]:
    out = []
    for variant, ratio in m.initial_ratio.items():
        out.append(Check.at_most(f"{variant}: eta lambda_0 / threshold (max over rates)", ratio, WELL_BELOW))
        total = sum(lane.variant == variant for lane in m.lanes)
        rising = f"{variant}: rates whose sharpness rises to the edge in the first half"
        want = f"all {total} (eta lambda / threshold >= {REACHED:g})"
        out.append(Check.holds(rising, m.reached[variant], m.reached[variant] == total, want))
        low, high = ADAM_EDGE if variant == "adam" else EDGE
        out.append(
            Check.between(
                f"{variant}: last-half median eta lambda / threshold (worst rate)", m.worst_edge[variant], low, high
            )
        )
    if m.catapult_peak is not None and m.catapult_final is not None:
        out.append(Check.above("catapult: peak loss / initial loss (min over surviving rates)", m.catapult_peak, 1.0))
        late = f"catapult: eta lambda / 2, median over steps {3 * m.catapult_steps // 4}-{m.catapult_steps} (max)"
        out.append(Check.below(late, m.catapult_final, 1.0))
    elif m.catapult_diverged:
        out.append(Check.at_least("catapult: surviving rates", m.catapult_survivors, 1))
    return out


def figures(ds, m: Measured) -> dict:
    from gradlab.experiments import _edge_of_stability_figures

    return _edge_of_stability_figures.draw(m, results.run_config(ds))
