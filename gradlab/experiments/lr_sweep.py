"""B2: too small a learning rate crawls, too large diverges; warmup, clipping and norms move the edge.

Each curve is the final training loss (mean of the last TAIL steps, median over seeds) against 32+
log-spaced learning rates. The rate, the seed and two switches are vmapped, one compile serving
them all: `warmup` (steps of a linear 0 -> 1 ramp multiplied into the lr, as
optim.warmup_steps would give) and `clip` (global-norm clipping at optim.clip_threshold, or at an
infinite threshold, which optax leaves bit-for-bit unclipped). Optimizer and normalization change
the program: one compile per pair. A diverged run (non-finite: ds['diverged'],
ds['first_bad_step']) is drawn as a marker above the axis, not dropped.

LR sensitivity (Wortsman et al. 2023, "Small-scale proxies for large-scale Transformer training
instabilities", Sec. 3.2): S = E_eta[min(L(eta), L0) - L*] with L(eta) the final loss at rate eta,
L* = min_eta L(eta) the curve's best, L0 the loss at initialisation (a diverged run counts as L0)
and eta log-uniform over the sweep's range, so E is the mean over the log-spaced grid. We report
S / L0: 0 when every rate of the range is as good as the best. The edge of a curve is the first
rate past its best that diverges or ends above L0.

Plain gradient descent on the local quadratic model of the loss is stable iff eta < 2/lambda0,
lambda0 the top eigenvalue of the loss Hessian at init (power iteration on Hessian-vector
products here). So no rate below 2/lambda0 should make the loss rise in the first RISE_STEPS
steps. Above it a network need not diverge: the loss rises, the curvature falls below 2/eta and
training goes on (the catapult phase, Lewkowycz et al. 2020); the figure shows how far past
2/lambda0 the edge lies. The checks: that lower bound; and that clipping, and warmup in unnormalised
nets (whose sharpness at init is high), move the edge to larger rates. What LayerNorm does to the
edge depends on the net (up at the quick size, down at width 8): the figure shows it, with the
with/without ratio in its note.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import analysis, curvature, data, models, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.experiments import Check

NAME = "lr_sweep"
CLAIM = "final loss against lr: too small crawls, too large diverges; warmup, clipping and norms widen the window"
POWER_ITERATIONS = 40
TAIL = 10  # final loss: mean of the last TAIL steps
RISE_STEPS = 20  # plain GD "rises" if its loss exceeds the initial one within this many steps
GD_BOUND = 1.0  # plain GD's first rising lr x lambda0 / 2: GD is stable below 2 / lambda0
CURVE_AXES = ("optim.name", "model.norm", "warmup", "clip")  # one curve of final loss against lr each
AXES = [*CURVE_AXES, "optim.lr", "seed"]


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus warmup and clipping as traced switches (on and off share a compile)."""

    warmup: int = param(0, low=0, sweep="traced", doc="linear lr warmup 0 -> 1 over this many steps (0: none)")
    clip: bool = param(False, sweep="traced", doc="clip at optim.clip_threshold (global norm unless optim.clip says)")


class State(NamedTuple):
    train: trials.TrainState
    sharpness: jax.Array  # lambda_max of the full-data loss Hessian at initialisation (0: not sgd)


def switched(hp, step):
    """hp with this step's warmup factor in the lr and an infinite clip threshold where clip is off.

    The factor is t / warmup for t < warmup, as optax.linear_schedule(0, 1, warmup) (and so
    optim.warmup_steps) gives; optax's clipping returns gradients untouched below the threshold.
    """
    t = step.astype(jnp.float32)
    warm = jnp.where(hp["warmup"] > 0, jnp.minimum(t / jnp.maximum(hp["warmup"], 1), 1.0), 1.0)
    threshold = jnp.where(hp["clip"], hp["optim.clip_threshold"], jnp.inf)
    return {**hp, "optim.lr": hp["optim.lr"] * warm, "optim.clip_threshold": threshold}


def trial(cfg) -> Trial:
    """supervised_mlp under the traced warmup and clip switches; records `sharpness_init` too."""
    clip = cfg.optim.clip if cfg.optim.clip != "none" else "global_norm"
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, clip=clip))
    base = trials.supervised_mlp(cfg, hp_map=switched)
    spec = trials.mlp_spec(cfg)

    def init(hp, key):
        state = base.init(hp, key)
        if cfg.optim.name != "sgd":  # 2 / lambda_max bounds plain gradient descent only
            return State(state, jnp.float32(0.0))  # a nan in the state would read as divergence
        hyper = models.MLPHyper.from_hp(hp)

        def loss_fn(params):
            return data.loss(cfg.data, models.apply(params, state.data.x, spec, hyper)[0], state.data.y)

        return State(
            state, curvature.top_eigenvalue(loss_fn, state.params, jax.random.fold_in(key, 1), POWER_ITERATIONS)
        )

    def step(hp, state):
        train, metrics = base.step(hp, state.train)
        sharpness = state.sharpness if cfg.optim.name == "sgd" else jnp.float32(jnp.nan)
        return State(train, state.sharpness), {**metrics, "sharpness_init": sharpness}

    return Trial(init, step, base.metric_dims)


# ----------------------------------------------------------------------------- measured


class Curve(NamedTuple):
    """One optimizer x norm x warmup x clip: final loss per learning rate (median over seeds)."""

    name: str
    norm: str
    warmup: int
    clip: bool
    lrs: np.ndarray
    final: np.ndarray  # (lrs,) median over seeds; inf where the median seed diverged
    diverged: np.ndarray  # (lrs,) bool: the median is a non-finite run
    initial: float
    first_rise: np.ndarray  # (seeds,) smallest lr whose loss exceeds L0 within RISE_STEPS (nan: none)
    sharpness: np.ndarray  # (seeds,) lambda_max at init (nan unless sgd)

    @property
    def label(self) -> str:
        parts = (["warmup"] if self.warmup else []) + (["clip"] if self.clip else [])
        return " + ".join(parts) or "plain"

    def sensitivity(self) -> float:
        """Wortsman et al. 2023's LR sensitivity E[min(L, L0) - L*], divided by L0."""
        capped = np.minimum(np.where(np.isfinite(self.final), self.final, self.initial), self.initial)
        return float(np.mean(capped - capped.min()) / self.initial)

    def edge(self) -> float:
        """The smallest rate above the best one whose run diverges or ends above L0 (inf: none)."""
        fails = ~(self.final <= self.initial)
        best = int(np.argmin(np.where(fails, np.inf, self.final)))
        above = np.nonzero(fails[best:])[0]
        return float(self.lrs[best + above[0]]) if above.size else float("inf")


def curves(ds) -> list[Curve]:
    lrs = ds["optim.lr"].values.astype(float)
    out = []
    for name, norm, warmup, clip in itertools.product(*(ds[axis].values for axis in CURVE_AXES)):
        point = ds.sel(dict(zip(CURVE_AXES, (name, norm, warmup, clip))))
        loss = point["loss"].transpose("optim.lr", "seed", "step").values.astype(float)
        final = np.median(analysis.final(loss, point["diverged"].transpose("optim.lr", "seed").values, TAIL), axis=1)
        early = analysis.inf_if_bad(loss[:, :, : RISE_STEPS + 1])
        rises = np.max(early[:, :, 1:], axis=2) > early[:, :, 0]
        first = np.where(rises.any(axis=0), lrs[np.argmax(rises, axis=0)], np.nan)
        sharpness = point["sharpness_init"].isel({"step": 0, "optim.lr": 0}).values.astype(float)
        out.append(
            Curve(
                str(name),
                str(norm),
                int(warmup),
                bool(clip),
                lrs,
                final,
                ~np.isfinite(final),
                float(np.median(loss[:, :, 0])),
                first,
                sharpness,
            )
        )
    return out


class Measured(NamedTuple):
    curves: list[Curve]
    gd_rise: float | None  # plain GD: min over seeds of (smallest lr rising within RISE_STEPS) x lambda0/2;
    # NaN where a seed never rises or has no lambda0 (None: no plain GD curve)
    edge_shifts: dict[str, tuple[float, int, str]]  # switch -> (min over the curves it changes of the edge
    # with / without it, how many curves, the optimizer of the min)
    layernorm_edge: float | None  # min over optimizers of LayerNorm's edge / no norm's (not a check)


def measure(ds) -> Measured:
    found = curves(ds)
    gd_rise = None
    plain_gd = [c for c in found if c.name == "sgd" and not c.warmup and not c.clip]
    if plain_gd:
        ratio = np.concatenate([c.first_rise * c.sharpness / 2 for c in plain_gd])
        gd_rise = float(np.min(ratio)) if np.all(np.isfinite(ratio)) else float("nan")
    plain = {(c.name, c.norm): c for c in found if not c.warmup and not c.clip}
    switches = {  # each alone against the plain curve of the same optimizer and norm; warmup without a norm
        # only: with LayerNorm the sharpness at init is already low and warmup does not move SGD's edge
        "clipping": [(c, plain[c.name, c.norm]) for c in found if c.clip and not c.warmup],
        "warmup (no norm)": [(c, plain[c.name, c.norm]) for c in found if c.warmup and not c.clip and c.norm == "none"],
    }
    shifts = {}
    for what, pairs in switches.items():
        if pairs:
            ratios = [c.edge() / ref.edge() for c, ref in pairs]
            i = int(np.argmin(ratios))
            shifts[what] = (float(ratios[i]), len(pairs), pairs[i][0].name)
    ln = [
        plain[n, "layernorm"].edge() / plain[n, "none"].edge()
        for n in dict.fromkeys(c.name for c in found)
        if (n, "layernorm") in plain and (n, "none") in plain
    ]
    return Measured(found, gd_rise, shifts, min(ln) if ln else None)


def checks(m: Measured) -> list[Check]:
    out = []
    if m.gd_rise is not None:
        out.append(
            Check.at_least(f"plain GD: smallest lr rising within {RISE_STEPS} steps x lambda0/2", m.gd_rise, GD_BOUND)
        )
    for what, (ratio, pairs, optimizer) in m.edge_shifts.items():
        out.append(Check.above(f"{what}: divergence edge, with / without (min of {pairs}: {optimizer})", ratio, 1.0))
    return out


# ----------------------------------------------------------------------------- figure


def figures(ds, m: Measured) -> dict:
    """Final loss against peak lr, one panel per optimizer and norm (gradlab/experiments/_lr_sweep_figures.py)."""
    from gradlab.experiments import _lr_sweep_figures

    return _lr_sweep_figures.draw(ds, m)
