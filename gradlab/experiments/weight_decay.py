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

from gradlab import analysis, data, models, results, telemetry, transforms, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "weight_decay"
CLAIM = "Adam+L2 moves decayed weights by ~lr whatever the decay; AdamW decays them by lr*wd (optax) or wd (paper)"
AXES = ["optim.name", "optim.lr", "optim.weight_decay", "seed"]
TAIL = 20  # final held-out loss: mean of the last TAIL steps
DECAY_ATOL = 1e-4  # measured against closed-form norm ratio: ~steps x float32 rounding of w (1 - c)
L2_RTOL = 1e-4  # float32 run against the float64 recursion: ~steps x 1e-7 of w_0
# While |w| >= |w_0|/2 Adam's step is between |g_t|/max|g| >= 1/2 and 1 times the lr (m_hat averages past
# gradients, all at least g_t; sqrt(v_hat) is at most their max); the top allows float32's resolution of w.
FALL_BAND, FALL_SLACK = (0.5, 1.0), 1e-4


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus a held-out set and the zero input features."""

    held_out: int = param(512, low=1, doc="held-out examples of the same teacher")
    dead_inputs: int = param(4, low=0, doc="input features zero in every example (decay-only weights)")

    def validate(self) -> None:
        super().validate()
        if self.dead_inputs >= self.data.input_dim:
            raise ConfigError(
                f"must be below data.input_dim={self.data.input_dim} (a live feature), got {self.dead_inputs}",
                key="dead_inputs",
            )


def split(cfg) -> tuple[data.Data, data.Data]:
    """Train and held-out sets of one teacher, the last `dead_inputs` features set to zero."""
    n, d, k = cfg.data.examples, cfg.data.input_dim, cfg.dead_inputs
    full = data.make(dataclasses.replace(cfg.data, examples=n + cfg.held_out))
    x = full.x.at[:, d - k :].set(0.0) if k else full.x
    return data.Data(x[:n], full.y[:n]), data.Data(x[n:], full.y[n:])


def trial(cfg) -> Trial:
    """supervised_mlp on the train split, recording also (before each update, like the loss):
    test_loss, weight_norm (all weight matrices), dead_norm and dead_max (Frobenius norm and
    largest |w| of the decay-only rows) and lr."""
    spec = trials.mlp_spec(cfg)
    k = cfg.dead_inputs
    train, test = split(cfg)

    def held_out(view: trials.StepView) -> dict:
        params = view.state.params
        out, _ = models.apply(params, test.x, spec, view.hyper)
        dead = params["input"]["w"][cfg.data.input_dim - k :]
        return {
            "test_loss": data.loss(cfg.data, out, test.y),
            "weight_norm": jnp.sqrt(jnp.sum(jnp.square(models.per_layer(params, telemetry.frobenius)))),
            "dead_norm": telemetry.frobenius(dead) if k else jnp.float32(jnp.nan),
            "dead_max": jnp.max(jnp.abs(dead)) if k else jnp.float32(jnp.nan),
            "lr": transforms.learning_rate(cfg.optim, view.hp["optim.lr"], cfg.steps)(view.state.step),
        }

    return trials.supervised_mlp(cfg, metrics=held_out, data_fn=lambda key: train)


# ----------------------------------------------------------------------------- measured


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
    optim = results.run_config(ds)["optim"]
    top, lr_t = _grid(ds, "adam", "dead_max"), _grid(ds, "adam", "lr")
    sim = np.stack(
        [
            scalar_adam_l2(top[:, j, :, 0], lr_t[:, j], wd, optim["b1"], optim["b2"], optim["eps"])
            for j, wd in enumerate(ds["optim.weight_decay"].values.astype(float))
        ],
        axis=1,
    )
    return top, np.where(sim >= 0.5 * top[..., :1], sim, np.nan), lr_t


class Measured(NamedTuple):
    forms: list
    lrs: np.ndarray
    wds: np.ndarray
    test_loss: dict  # form -> (lr, wd) held-out loss, mean of the last TAIL steps, median over seeds (+inf: diverged)
    paths: dict  # form -> (measured, expected) decay-only |w|_t / |w|_0, (lr, wd, seed, step); adam: max |w|
    decay_error: dict  # adamw forms -> max error of the norm ratio against the closed form predicted_ratio
    l2_error: float | None  # adam: max rel. error of max |w| against scalar Adam on g = wd w
    fall_per_lr: tuple | None  # adam: (min, max) over wd > 0 of the fall of max |w| / sum of lr
    still: float | None  # wd = 0: max |change| per step of the decay-only weights
    cfg: dict


def measure(ds) -> Measured:
    forms = [str(n) for n in ds["optim.name"].values]
    lrs, wds = ds["optim.lr"].values.astype(float), ds["optim.weight_decay"].values.astype(float)
    diverged = ds["diverged"].transpose("optim.name", "optim.lr", "optim.weight_decay", "seed").values
    losses = {
        n: np.median(analysis.final(_grid(ds, n, "test_loss"), diverged[i], tail=TAIL), axis=-1)
        for i, n in enumerate(forms)
    }
    m = Measured(forms, lrs, wds, losses, {}, {}, None, None, None, results.run_config(ds))
    if "dead_norm" not in ds or np.all(np.isnan(ds["dead_norm"].values)):
        return m
    for name in ("adamw", "adamw_decoupled"):
        if name in forms:
            norm, expected = _grid(ds, name, "dead_norm"), predicted_ratio(ds, name)
            with np.errstate(invalid="ignore"):
                m.paths[name] = (norm / norm[..., :1], expected)
                err = np.abs(m.paths[name][0] - expected) / np.maximum(expected, 1.0)
            # Over the grid and the steps before any divergence: absolute while the weights shrink,
            # relative where they grow.
            m.decay_error[name] = float(np.nanmax(np.where(np.isfinite(expected), err, np.nan)))
    l2_error = fall = still = None
    if "adam" in forms and (wds > 0).any():
        top, sim, lr_t = l2_paths(ds)
        m.paths["adam"] = (top / top[..., :1], sim / top[..., :1])
        decayed = wds > 0
        l2_error = float(np.nanmax(np.abs(top - sim)[:, decayed] / top[:, decayed, :, :1]))
        # Measured at each point's last step above half the start, where the fall dwarfs float32's resolution.
        spent = np.cumsum(lr_t, axis=-1) - lr_t
        last = np.maximum(np.isfinite(sim).sum(axis=-1, keepdims=True) - 1, 1)
        per_lr = (top[..., :1] - np.take_along_axis(top, last, axis=-1)) / np.take_along_axis(spent, last, axis=-1)
        fall = (float(np.nanmin(per_lr[:, decayed])), float(np.nanmax(per_lr[:, decayed])))
    if 0.0 in wds:
        still = float(np.nanmax(np.abs(ds["dead_max"].sel({"optim.weight_decay": 0.0}).diff("step"))))
    return m._replace(l2_error=l2_error, fall_per_lr=fall, still=still)


def checks(m: Measured) -> list[Check]:
    out = []
    for name, scale in (("adamw", "lr wd eta_t"), ("adamw_decoupled", "wd eta_t")):
        if name in m.decay_error:
            out.append(
                Check.at_most(
                    f"{name}: decay-only |w|_t/|w|_0 vs |prod(1 - {scale})|, max err", m.decay_error[name], DECAY_ATOL
                )
            )
    if m.l2_error is not None and m.fall_per_lr is not None:  # set together
        out.append(
            Check.at_most("adam+L2: decay-only max|w| vs scalar Adam on g = wd w, max rel. err", m.l2_error, L2_RTOL)
        )
        lo, hi = m.fall_per_lr
        out.append(
            Check.holds(
                "adam+L2: fall of max|w| / sum of lr, every wd > 0",
                lo,
                FALL_BAND[0] <= lo and hi <= FALL_BAND[1] + FALL_SLACK,
                f"in [{FALL_BAND[0]:g}, {FALL_BAND[1]:g}] (max {hi:.4g}, {FALL_SLACK:g} slack)",
            )
        )
    if m.still is not None:
        # No data gradient and no decay: the decay-only weights must not move at all.
        out.append(Check.at_most("wd = 0: decay-only weights, max |change| per step", m.still, 0.0))
    return out


# ----------------------------------------------------------------------------- figure


def figures(ds, m: Measured) -> dict:
    """Held-out loss grids, weight norms and the decay-only weights (gradlab/experiments/_weight_decay_figures.py)."""
    from gradlab.experiments import _weight_decay_figures

    return _weight_decay_figures.draw(ds, m)
