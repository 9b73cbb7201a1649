"""A2: initialization schemes decide whether a deep net's signal survives and whether it trains.

A hidden layer h_l = phi(W_l h_{l-1}) with Var W = sigma_w^2 / n maps the second moment
m_l = E[h_l^2] to m_l = E_z[phi(sqrt(sigma_w^2 m_{l-1}) z)^2], z ~ N(0, 1) (mean field; Poole
et al. 2016). For ReLU that is m_l = (sigma_w^2 / 2) m_{l-1}: He init (sigma_w^2 = 2) keeps m
constant and Xavier (sigma_w^2 = 1 for square layers) halves it per layer (He et al. 2015,
eq. 10). For tanh, Glorot & Bengio's "standard" U[-1/sqrt(n), 1/sqrt(n)] (sigma_w^2 = 1/3,
their eq. 1) shrinks the signal per layer, their "normalized" init (xavier_uniform, eq. 16)
keeps it. Too small a variance (N(0, 0.01^2)) vanishes, too large (N(0, 1)) explodes. Zero init
gives every unit of a layer the same incoming weights and the same gradient, so the units stay
identical whatever the optimizer does (every weight matrix stays rank 1); under tanh and ReLU,
phi(0) = 0 and no weight but the output bias ever moves.

The checks compare the measured per-layer slope of ln m_l with the mean-field recursion above
(Gauss-Hermite quadrature), within a tolerance from the width: a width-n layer multiplies m
by a random factor of relative variance at most 5/n (ReLU's; the ln m_l are a random walk).
The training panels are He et al. 2015, Fig. 3: a 30-layer ReLU net under SGD with momentum
stalls at the loss of the best constant prediction with Xavier init and trains with He init;
Adam rescales every gradient and trains both.
The scheme and the optimizer are vmapped axes: one compile per activation.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from gradlab import analysis, inits, meanfield, models, results, telemetry, transforms, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "init_schemes"
CLAIM = "zero init never breaks symmetry; He keeps a ReLU net's signal, Xavier halves it per layer and stalls"
# scheme name: (inits scheme, std of 'normal', gain)
SCHEMES = {
    "zero": ("zero", 0.0, 1.0),
    "normal_0.01": ("normal", 0.01, 1.0),
    "normal_1": ("normal", 1.0, 1.0),
    "standard": ("lecun_uniform", 0.0, 1.0 / np.sqrt(3.0)),  # U[-1/sqrt(n), 1/sqrt(n)]
    "lecun_normal": ("lecun_normal", 0.0, 1.0),
    "xavier_normal": ("xavier_normal", 0.0, 1.0),
    "xavier_uniform": ("xavier_uniform", 0.0, 1.0),
    "he_normal": ("he_normal", 0.0, 1.0),
    "orthogonal": ("orthogonal", 0.0, 1.0),
}
OPTIMIZERS = ("momentum", "adam")
KAPPA = 5.0  # relative variance x n of one layer's factor on m: ReLU's E[relu(z)^4]/E[relu(z)^2]^2 - 1
SYMMETRY_TOL = 1e-5  # a random init's unit spread is sqrt(1 - 1/n), about 1
STALLED, TRAINED = 0.9, 0.25  # final loss / loss of the best constant prediction
AXES = ["model.activation", "optimizer", "scheme", "seed"]
PROFILE_CHECKS = (  # (activation, scheme, label): the per-layer slope of ln m against mean field
    ("relu", "he_normal", "He + ReLU"),
    ("relu", "xavier_normal", "Xavier + ReLU"),
    ("tanh", "standard", "standard U[+-1/sqrt(n)] + tanh"),
    ("tanh", "xavier_uniform", "normalized (Xavier) + tanh"),
)
TRAIN_CHECKS = (  # (optimizer, scheme, stalls?)
    ("momentum", "xavier_normal", True),
    ("momentum", "he_normal", False),
    ("adam", "xavier_normal", False),
)
TRAIN_STEPS = 100  # the training checks need at least this many steps


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the traced scheme and optimizer axes (they replace model.init, optim.name)."""

    scheme: str = param(
        "he_normal",
        choices=tuple(SCHEMES),
        sweep="choice",
        doc="init scheme of the net (a named scheme: distribution, fan mode, gain)",
    )
    optimizer: str = param(
        "momentum", choices=OPTIMIZERS, sweep="choice", doc="SGD with momentum at optim.lr, or Adam at adam_lr"
    )
    adam_lr: float = param(1e-3, low=0.0, low_open=True, doc="learning rate of the Adam runs")

    def validate(self) -> None:
        super().validate()
        if self.telemetry != "layers":
            raise ConfigError(
                f"init_schemes reads per-layer statistics; allowed: layers, got {self.telemetry!r}", key="telemetry"
            )


def _unit_spread(w):
    """|W - its mean column| / |W|: 0 when every unit (column) has the same incoming weights."""
    w = w.astype(jnp.float32)
    norm = telemetry.frobenius(w)
    return telemetry.safe_ratio(telemetry.frobenius(w - jnp.mean(w, axis=1, keepdims=True)), norm)


def trial(cfg) -> Trial:
    """supervised_mlp with the scheme's init numbers and the optimizer picked by index; adds, per
    layer, the weight norm and unit spread after the update."""
    spec = trials.mlp_spec(cfg)
    table = [(inits.scheme_index(base), std, gain) for base, std, gain in SCHEMES.values()]
    index, std, gain = (jnp.asarray(c) for c in zip(*table))

    def with_scheme(hp, step):
        del step
        i = hp["scheme"]
        return {**hp, "model.init": index[i], "model.init_std": std[i], "model.init_gain": gain[i]}

    def optimizer(hp):
        momentum = transforms.build(dataclasses.replace(cfg.optim, name="momentum"), hp, cfg.steps)
        adam = transforms.build(
            dataclasses.replace(cfg.optim, name="adam"), {**hp, "optim.lr": hp["adam_lr"]}, cfg.steps
        )
        return trials.chosen_by_index(hp["optimizer"], (momentum, adam))

    def after_update(view):
        mask = models.layer_mask(spec, view.hyper)
        return {
            "weight_norm_after": jnp.where(mask, models.per_layer(view.new_params, telemetry.frobenius), jnp.nan),
            "unit_spread_after": jnp.where(mask, models.per_layer(view.new_params, _unit_spread), jnp.nan),
        }

    return trials.supervised_mlp(cfg, hp_map=with_scheme, optimizer=optimizer, metrics=after_update)


reference = trials.task_reference


# ----------------------------------------------------------------------------- measure and check


def moments(ds, activation: str, scheme: str) -> np.ndarray:
    """E[h_l^2] at initialization, (seeds, layers) over the layer axis (0 = input projection)."""
    point = ds.sel({"model.activation": activation, "scheme": scheme}).isel(optimizer=0, step=0)
    return point["act_rms"].transpose("seed", "layer").values.astype(float) ** 2


def profile_slopes(ds, activation: str, scheme: str, width: int) -> tuple[float, float]:
    """(measured, mean-field) slope of ln E[h_l^2] over the hidden layers, seed-mean profile.

    Mean field: m_l = E[phi(sqrt(sigma_w^2 m_{l-1}) z)^2] = q_l / sigma_w^2, with q_l the length map's
    profile from q_0 = sigma_w^2 m_0 at zero bias; ln q_l and ln m_l differ by a constant.
    """
    m = moments(ds, activation, scheme).mean(axis=0)
    base, std, gain = SCHEMES[scheme]
    sw2 = inits.sigma_w2(base, width, std, gain)
    theory = meanfield.q_profile(sw2 * m[0], sw2, 0.0, len(m) - 2, activation)
    return (
        analysis.slope(np.arange(len(m) - 2), np.log(m[1:-1])),
        analysis.slope(np.arange(len(m) - 2), np.log(theory[1:])),
    )


class Measured(NamedTuple):
    width: int
    layers: int  # hidden layers
    seeds: int
    steps: int
    zero_spread: float | None  # max unit spread of zero init after the last update; None if not run
    zero_sigmoid_moved: float | None  # zero init + sigmoid: smallest over points of the largest hidden |W|
    profile: dict  # (activation, scheme) -> (measured, mean-field) slope of ln E[h_l^2] per layer
    slope_tolerance: float  # 4 sigma of the slope's seed mean, ln m_l a random walk of step variance KAPPA / width
    he_flat: float | None  # He + ReLU: max_l |ln m_l / m_1|
    flat_tolerance: float  # 3 sigma of the walk's end: its max over the layers exceeds it rarely (reflection)
    final_ratio: dict  # (optimizer, scheme) -> ReLU net's median final loss / the constant's (inf: diverged)
    constant_loss: float


def measure(ds) -> Measured:
    width = results.run_config(ds)["model"]["width"]
    layers, seeds, steps = ds.sizes["layer"] - 2, ds.sizes["seed"], ds.sizes["step"]
    acts, schemes, opts = (list(ds[a].values) for a in ("model.activation", "scheme", "optimizer"))
    zero_spread = zero_moved = he_flat = None
    if "zero" in schemes:
        spread = ds["unit_spread_after"].sel(scheme="zero").isel(step=-1, layer=slice(None, -1))  # hidden units only
        zero_spread = float(np.nanmax(spread.values))
        if "sigmoid" in acts:  # sigmoid(0) = 1/2: the symmetric net still learns, units stay equal
            w = ds["weight_norm_after"].sel({"scheme": "zero", "model.activation": "sigmoid"}).isel(step=-1)
            zero_moved = float(np.nanmin(np.nanmax(w.values[..., 1:-1], axis=-1)))
    profile = {(a, s): profile_slopes(ds, a, s, width) for a, s, _ in PROFILE_CHECKS if a in acts and s in schemes}
    if "relu" in acts and "he_normal" in schemes:
        m = moments(ds, "relu", "he_normal").mean(axis=0)[1:-1]
        he_flat = float(np.max(np.abs(np.log(m / m[0]))))
    constant = float(analysis.reference(ds, "constant_loss"))
    final = {}
    if "relu" in acts:
        for optimizer in opts:
            for scheme in schemes:
                loss = ds["loss"].sel({"model.activation": "relu", "optimizer": optimizer, "scheme": scheme})
                final[(optimizer, scheme)] = float(np.median(analysis.inf_if_bad(loss.isel(step=-1).values))) / constant
    return Measured(
        width,
        layers,
        seeds,
        steps,
        zero_spread,
        zero_moved,
        profile,
        meanfield.finite_width_slope_tolerance(layers, width, seeds, KAPPA, sigmas=4.0),
        he_flat,
        meanfield.finite_width_end_tolerance(layers, width, seeds, KAPPA, sigmas=3.0),
        final,
        constant,
    )


def checks(m: Measured) -> list[Check]:
    out = []
    if m.zero_spread is not None:
        out.append(Check.at_most(f"zero init: max unit spread after {m.steps} updates", m.zero_spread, SYMMETRY_TOL))
    if m.zero_sigmoid_moved is not None:
        out.append(Check.above("zero init + sigmoid: largest hidden |W| after training", m.zero_sigmoid_moved, 0.0))
    for activation, scheme, label in PROFILE_CHECKS:
        if (activation, scheme) in m.profile:
            measured, theory = m.profile[(activation, scheme)]
            out.append(
                Check.near(f"{label}: slope of ln E[h^2] per layer", measured, theory, m.slope_tolerance, "mean field")
            )
    if m.he_flat is not None:
        name = f"He + ReLU: max_l |ln m_l/m_1| over {m.layers} layers"
        out.append(Check.at_most(name, m.he_flat, m.flat_tolerance, "3 sqrt(5(L-1)/(n seeds))"))
    if m.steps >= TRAIN_STEPS:
        for optimizer, scheme, stalls in TRAIN_CHECKS:
            if (optimizer, scheme) in m.final_ratio:
                name, ratio = f"{optimizer}, {scheme} ReLU: final loss / constant's", m.final_ratio[(optimizer, scheme)]
                out.append(
                    Check.at_least(name, ratio, STALLED, "stalled")
                    if stalls
                    else Check.at_most(name, ratio, TRAINED, "trained")
                )
    return out


def figures(ds, m: Measured) -> dict:
    """The per-layer profiles at init and, with ReLU, the training curves
    (gradlab/experiments/_init_schemes_figures.py)."""
    from gradlab.experiments import _init_schemes_figures

    return _init_schemes_figures.draw(ds, m)
