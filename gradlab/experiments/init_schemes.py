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
import warnings
from dataclasses import dataclass
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from gradlab import analysis, inits, meanfield, models, plotting, results, telemetry, transforms, trials
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
    ("momentum", "xavier_normal", True), ("momentum", "he_normal", False), ("adam", "xavier_normal", False),
)
TRAIN_STEPS = 100  # the training checks need at least this many steps


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the traced scheme and optimizer axes (they replace model.init, optim.name)."""

    scheme: str = param("he_normal", choices=tuple(SCHEMES), sweep="choice",
                         doc="init scheme of the net (a named scheme: distribution, fan mode, gain)")
    optimizer: str = param("momentum", choices=OPTIMIZERS, sweep="choice",
                           doc="SGD with momentum at optim.lr, or Adam at adam_lr")
    adam_lr: float = param(1e-3, low=0.0, low_open=True, doc="learning rate of the Adam runs")

    def validate(self) -> None:
        super().validate()
        if self.telemetry != "layers":
            raise ConfigError(f"init_schemes reads per-layer statistics; allowed: layers, "
                              f"got {self.telemetry!r}", key="telemetry")


def sigma_w2(scheme: str, width: int) -> float:
    """n Var(W) of a square width x width hidden layer under a scheme."""
    base, std, gain = SCHEMES[scheme]
    numerator, fan_mode, _ = inits.SCHEMES[base]
    return gain**2 * (width * std**2 if fan_mode == inits.FAN_NONE else numerator)


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
        adam = transforms.build(dataclasses.replace(cfg.optim, name="adam"), {**hp, "optim.lr": hp["adam_lr"]},
                                cfg.steps)
        return trials.chosen_by_index(hp["optimizer"], (momentum, adam))

    def after_update(view):
        mask = models.layer_mask(spec, view.hyper)
        return {"weight_norm_after": jnp.where(mask, models.per_layer(view.new_params, telemetry.frobenius), jnp.nan),
                "unit_spread_after": jnp.where(mask, models.per_layer(view.new_params, _unit_spread), jnp.nan)}

    return trials.supervised_mlp(cfg, hp_map=with_scheme, optimizer=optimizer, metrics=after_update)


reference = trials.task_reference


# ----------------------------------------------------------------------------- measure and check


def slope_tolerance(layers: int, width: int, seeds: int) -> float:
    """4 sigma of the fitted slope of ln m over `layers` layers, plus one layer's log bias: ln m_l is
    a random walk with step variance KAPPA / width, independent across seeds."""
    return 4.0 * np.sqrt(KAPPA / (width * seeds)) * analysis.random_walk_slope_std(layers) + KAPPA / (2.0 * width)


def flat_tolerance(layers: int, width: int, seeds: int) -> float:
    """3 sigma of ln(m_L / m_1) averaged over seeds: the max over the walk exceeds it rarely (reflection)."""
    return 3.0 * np.sqrt(KAPPA * (layers - 1) / (width * seeds))


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
    sw2 = sigma_w2(scheme, width)
    theory = meanfield.q_profile(sw2 * m[0], sw2, 0.0, len(m) - 2, activation)
    return (analysis.slope(np.arange(len(m) - 2), np.log(m[1:-1])),
            analysis.slope(np.arange(len(m) - 2), np.log(theory[1:])))


class Measured(NamedTuple):
    width: int
    layers: int  # hidden layers
    seeds: int
    steps: int
    zero_spread: float | None  # max unit spread of zero init after the last update; None if not run
    zero_sigmoid_moved: float | None  # zero init + sigmoid: smallest over points of the largest hidden |W|
    profile: dict  # (activation, scheme) -> (measured, mean-field) slope of ln E[h_l^2] per layer
    slope_tolerance: float
    he_flat: float | None  # He + ReLU: max_l |ln m_l / m_1|
    flat_tolerance: float
    final_ratio: dict  # (optimizer, scheme) -> ReLU net's median final loss / the constant's (inf: diverged)
    constant_loss: float


def measure(ds) -> Measured:
    width = results.run_config(ds)["model"]["width"]
    layers, seeds, steps = ds.sizes["layer"] - 2, ds.sizes["seed"], ds.sizes["step"]
    acts, schemes, opts = (list(ds[a].values) for a in ("model.activation", "scheme", "optimizer"))
    zero_spread = zero_moved = he_flat = None
    if "zero" in schemes:
        zero_spread = float(np.nanmax(ds["unit_spread_after"].sel(scheme="zero").isel(step=-1).values))
        if "sigmoid" in acts:  # sigmoid(0) = 1/2: the symmetric net still learns, units stay equal
            w = ds["weight_norm_after"].sel({"scheme": "zero", "model.activation": "sigmoid"}).isel(step=-1)
            zero_moved = float(np.nanmin(np.nanmax(w.values[..., 1:-1], axis=-1)))
    profile = {(a, s): profile_slopes(ds, a, s, width) for a, s, _ in PROFILE_CHECKS if a in acts and s in schemes}
    if "relu" in acts and "he_normal" in schemes:
        m = moments(ds, "relu", "he_normal").mean(axis=0)[1:-1]
        he_flat = float(np.max(np.abs(np.log(m / m[0]))))
    constant = float(ds["ref.constant_loss"].values.flat[0])  # with_axes gave it the unswept axes' dims
    final = {}
    if "relu" in acts:
        for optimizer in opts:
            for scheme in schemes:
                loss = ds["loss"].sel({"model.activation": "relu", "optimizer": optimizer, "scheme": scheme})
                final[(optimizer, scheme)] = float(np.median(analysis.inf_if_bad(loss.isel(step=-1).values))) / constant
    return Measured(width, layers, seeds, steps, zero_spread, zero_moved, profile,
                    slope_tolerance(layers, width, seeds), he_flat, flat_tolerance(layers, width, seeds), final, constant)


def checks(m: Measured) -> list[Check]:
    out = []
    if m.zero_spread is not None:
        out.append(Check.at_most(f"zero init: max unit spread after {m.steps} updates", m.zero_spread, SYMMETRY_TOL))
    if m.zero_sigmoid_moved is not None:
        out.append(Check.above("zero init + sigmoid: largest hidden |W| after training", m.zero_sigmoid_moved, 0.0))
    for activation, scheme, label in PROFILE_CHECKS:
        if (activation, scheme) in m.profile:
            measured, theory = m.profile[(activation, scheme)]
            out.append(Check.near(f"{label}: slope of ln E[h^2] per layer", measured, theory, m.slope_tolerance,
                                  "mean field"))
    if m.he_flat is not None:
        out.append(Check.at_most(f"He + ReLU: max_l |ln m_l/m_1| over {m.layers} layers", m.he_flat, m.flat_tolerance,
                                 "3 sqrt(5(L-1)/(n seeds))"))
    if m.steps >= TRAIN_STEPS:
        for optimizer, scheme, stalls in TRAIN_CHECKS:
            if (optimizer, scheme) in m.final_ratio:
                name, ratio = f"{optimizer}, {scheme} ReLU: final loss / constant's", m.final_ratio[(optimizer, scheme)]
                out.append(Check.at_least(name, ratio, STALLED, "stalled") if stalls
                           else Check.at_most(name, ratio, TRAINED, "trained"))
    return out


# ----------------------------------------------------------------------------- figures

COLOR = dict(zip(SCHEMES, ["0.35", "#8d6a9f", "#a05a2c", "#edae49", "#66a182", "#1b6ca8", "#00798c",
                           "#d1495b", "#2e4057"]))
ROWS = (("act_std", "activation std"), ("delta_rms", r"RMS of $\partial L/\partial h_l$"),
        ("grad_norm", r"$\|\partial L/\partial W_l\|_F$"))
SHORT = {"he_normal": "He", "xavier_normal": "Xavier", "standard": "standard", "xavier_uniform": "normalized"}


def _finite(a):
    a = np.asarray(a, float)
    return np.where(np.isfinite(a), a, np.nan)


def _profiles_figure(ds, m: Measured):
    from matplotlib.lines import Line2D

    acts = list(ds["model.activation"].values)
    fig, axes = plotting.figure(len(ROWS) + 1, len(acts), width=max(3.4, 7.0 / len(acts)), height=2.3, sharex="col",
                                gridspec_kw={"height_ratios": [0.3] + [1] * len(ROWS)})
    hidden = ds["layer"].values[:-1]  # the readout (one output) is left out
    for col, activation in enumerate(acts):
        for row, (var, ylabel) in enumerate(ROWS, start=1):
            ax = axes[row, col]
            for scheme in ds["scheme"].values:
                point = ds[var].sel({"model.activation": activation, "scheme": scheme}).isel(optimizer=0, step=0)
                values = _finite(point.transpose("seed", "layer").values[:, :-1])
                if np.any(values > 0):  # zero init: exactly 0, nothing to draw on a log axis
                    plotting.band(ax, hidden, values, str(scheme), color=COLOR[str(scheme)])
            ax.set_yscale("log")
            lo, hi = ax.get_ylim()
            ax.set_ylim(max(lo, 1e-20), min(hi, 1e20))
            if col == 0:
                ax.set_ylabel(ylabel)
            if row == len(ROWS):
                ax.set_xlabel("layer l (0 = input projection)")
        lines = [f"{SHORT[s]}: {m.profile[(a, s)][0]:+.3f}  (mean field {round(m.profile[(a, s)][1], 3) + 0.0:+.3f})"
                 for a, s, _ in PROFILE_CHECKS if a == activation and (a, s) in m.profile]
        head = axes[0, col]
        head.axis("off")
        head.set_title(activation)
        text = ["slope of ln E[h^2] per layer:"] + lines if lines else []
        if "zero" in ds["scheme"].values:
            text.append("zero: h = 0 everywhere (off the log axes)" if activation != "sigmoid"
                        else "zero: all units = 1/2 (std 0, not drawn)")
        plotting.note(head, "\n".join(text))
        for t in head.texts:
            t.set_in_layout(False)  # the box may be wider than its (empty) axes
    handles = {str(s): Line2D([], [], color=COLOR[str(s)]) for s in ds["scheme"].values}
    fig.legend(handles.values(), handles.keys(), loc="outside right center", frameon=False)
    fig.suptitle(f"At initialization (Glorot & Bengio 2010): {m.layers} layers x {m.width}, {m.seeds} seeds",
                 fontsize=10)
    return fig


def _training_figure(ds, m: Measured):
    cfg = results.run_config(ds)
    opts = [o for o in OPTIMIZERS if o in ds["optimizer"].values]
    zero = "zero" in ds["scheme"].values
    fig, axes = plotting.figure(1, len(opts) + zero, width=3.5, height=3.0)
    steps = ds["step"].values
    for col, optimizer in enumerate(opts):
        ax = axes[0, col]
        for scheme in ds["scheme"].values:
            loss = ds["loss"].sel({"model.activation": "relu", "optimizer": optimizer, "scheme": scheme})
            line = plotting.band(ax, steps, _finite(loss.transpose("seed", "step").values), str(scheme),
                                 color=COLOR[str(scheme)])
            line.set_linewidth(2.2 if scheme in ("xavier_normal", "he_normal") else 0.9)
        ax.axhline(m.constant_loss, color="0.3", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(max(ax.get_ylim()[0], 1e-6), 10 * m.constant_loss)
        lr = cfg["optim"]["lr"] if optimizer == "momentum" else cfg["adam_lr"]
        ax.set_title(f"{'SGD + momentum' if optimizer == 'momentum' else 'Adam'}, lr {lr:g}")
        ax.set_xlabel("step")
        text = [f"{SHORT[s]}: final / constant = {m.final_ratio[(optimizer, s)]:.2g}"
                for s in ("xavier_normal", "he_normal") if s in ds["scheme"].values]
        plotting.note(ax, "\n".join(["dashed: best constant prediction"] + text), loc="lower left")
    axes[0, 0].set_ylabel(f"training loss, {m.layers}-layer ReLU net")
    if zero:  # zero init's symmetry: the spread across units of each layer's incoming weights
        ax = axes[0, -1]
        activation = "sigmoid" if "sigmoid" in ds["model.activation"].values else "relu"
        for scheme in ds["scheme"].values:
            spread = ds["unit_spread_after"].sel({"model.activation": activation, "scheme": scheme})
            spread = spread.isel(optimizer=0, step=-1).transpose("seed", "layer").values[:, :-1]
            plotting.band(ax, ds["layer"].values[:-1], _finite(spread), str(scheme), color=COLOR[str(scheme)],
                          log=False)
        ax.set_ylim(-0.05, 1.75)
        ax.set_title(f"{activation}: after {m.steps} steps")
        ax.set_xlabel("layer l (0 = input projection)")
        ax.set_ylabel("unit spread |W - mean column| / |W|")
        text = [f"max unit spread after {m.steps} updates: {m.zero_spread:.2g}"]
        if m.zero_sigmoid_moved is not None:
            text.append(f"largest hidden |W| after training: {m.zero_sigmoid_moved:.2g}")
        plotting.note(ax, "\n".join(text), loc="upper right")
    plotting.legend_outside(fig, axes[0, 0])
    fig.suptitle("Training from each init (He et al. 2015, Fig. 3)" + ("; zero init stays symmetric" if zero else ""),
                 fontsize=10)
    return fig


def figures(ds, m: Measured) -> dict:
    with warnings.catch_warnings():  # diverged runs are all-NaN after their first bad step
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        figs = {"": _profiles_figure(ds, m)}
        if "relu" in ds["model.activation"].values and m.steps > 1:
            figs["training"] = _training_figure(ds, m)
    return figs
