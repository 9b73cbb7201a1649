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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradlab import config, data, inits, models, plotting, results, telemetry, transforms, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
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


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the traced scheme and optimizer axes (they replace model.init, optim.name)."""

    scheme: str = param("he_normal", choices=tuple(SCHEMES), sweep="choice")
    optimizer: str = param("momentum", choices=OPTIMIZERS, sweep="choice",
                           doc="SGD with momentum at optim.lr, or Adam at adam_lr")
    adam_lr: float = param(1e-3, low=0.0, low_open=True)


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


class State(NamedTuple):
    params: dict
    opt_state: tuple  # (momentum's, adam's): both advance, the traced `optimizer` picks the update
    data: data.Data
    step: jax.Array
    key: jax.Array


def trial(cfg) -> Trial:
    """Train the MLP; record loss and, per layer, the Glorot & Bengio statistics before the update
    and the weight norm and unit spread after it."""
    spec, total = trials.mlp_spec(cfg), cfg.steps
    table = [(inits.scheme_index(base), std, gain) for base, std, gain in SCHEMES.values()]
    index, std, gain = (jnp.asarray(c) for c in zip(*table))

    def with_scheme(hp):
        i = hp["scheme"]
        return {**hp, "model.init": index[i], "model.init_std": std[i], "model.init_gain": gain[i]}

    def optimizers(hp):
        momentum = transforms.build(dataclasses.replace(cfg.optim, name="momentum"), hp, total)
        adam = transforms.build(dataclasses.replace(cfg.optim, name="adam"), {**hp, "optim.lr": hp["adam_lr"]}, total)
        return momentum, adam

    def init(hp, key):
        hp = with_scheme(hp)
        k_params, k_batches = jax.random.split(key)
        params = models.init(k_params, spec, models.MLPHyper.from_hp(hp))
        opt_state = tuple(tx.init(params) for tx in optimizers(hp))
        return State(params, opt_state, data.make(cfg.data), jnp.int32(0), k_batches)

    def step(hp, state):
        hp = with_scheme(hp)
        hyper = models.MLPHyper.from_hp(hp)
        batch = data.batch(state.data, cfg.data, state.step, state.key)
        probes = models.zero_probes(spec, batch.x.shape[0], jnp.dtype(spec.dtype))

        def loss_fn(params, probes):
            out, taps = models.apply(params, batch.x, spec, hyper, probes)
            return data.loss(cfg.data, out, batch.y), taps

        (loss, taps), (grads, probe_grads) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            state.params, probes)
        new = [tx.update(grads, s, state.params) for tx, s in zip(optimizers(hp), state.opt_state)]
        use_adam = hp["optimizer"] == OPTIMIZERS.index("adam")
        updates = jax.tree.map(lambda m, a: jnp.where(use_adam, a, m), new[0][0], new[1][0])
        params = optax.apply_updates(state.params, updates)
        layer = {
            "act_rms": taps["act_rms"], "act_std": taps["act_std"], "delta_rms": models.probe_rms(probe_grads),
            "grad_norm": models.per_layer(grads, telemetry.frobenius),
            "weight_norm_after": models.per_layer(params, telemetry.frobenius),
            "unit_spread_after": models.per_layer(params, _unit_spread),
        }
        mask = models.layer_mask(spec, hyper)
        metrics = {"loss": loss, **{k: jnp.where(mask, v, jnp.nan) for k, v in layer.items()}}
        return State(params, (new[0][1], new[1][1]), state.data, state.step + 1, state.key), metrics

    return Trial(init, step)


# ----------------------------------------------------------------------------- theory


def phi_numpy(activation: str, leaky_slope: float = 0.01):
    table = {"tanh": np.tanh, "relu": lambda x: np.maximum(x, 0.0), "linear": lambda x: x,
             "leaky_relu": lambda x: np.where(x >= 0, x, leaky_slope * x),
             "sigmoid": lambda x: 1.0 / (1.0 + np.exp(-x))}
    if activation not in table:
        raise ValueError(f"no mean-field map for activation {activation!r}; known: {', '.join(table)}")
    return table[activation]


def mean_field_moments(activation: str, sw2: float, m0: float, layers: int, degree: int = 101) -> np.ndarray:
    """m_0..m_layers with m_l = E_z[phi(sqrt(sw2 m_{l-1}) z)^2] by Gauss-Hermite quadrature (zero bias)."""
    z, w = np.polynomial.hermite_e.hermegauss(degree)
    w = w / w.sum()
    phi = phi_numpy(activation)
    m = [m0]
    for _ in range(layers):
        m.append(float(np.sum(w * phi(np.sqrt(sw2 * m[-1]) * z) ** 2)))
    return np.asarray(m)


def slope(y) -> float:
    """Least-squares slope of y against its index."""
    y = np.asarray(y, float)
    return float(np.polyfit(np.arange(len(y)), y, 1)[0])


def slope_tolerance(layers: int, width: int, seeds: int) -> float:
    """4 sigma of the fitted slope of ln m over `layers` layers, plus one layer's log bias.

    ln m_l is a random walk with step variance KAPPA / width (independent across seeds); the
    least-squares weights w give Var(slope) = (KAPPA / width) w^T min(i, j) w / seeds.
    """
    x = np.arange(1, layers + 1, dtype=float)
    w = (x - x.mean()) / np.sum((x - x.mean()) ** 2)
    var = KAPPA / width * (w @ np.minimum.outer(x, x) @ w) / seeds
    return 4.0 * np.sqrt(var) + KAPPA / (2.0 * width)


def flat_tolerance(layers: int, width: int, seeds: int) -> float:
    """3 sigma of ln(m_L / m_1) averaged over seeds: the max over the walk exceeds it rarely (reflection)."""
    return 3.0 * np.sqrt(KAPPA * (layers - 1) / (width * seeds))


# ----------------------------------------------------------------------------- reading results

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


def moments(ds, activation: str, scheme: str) -> np.ndarray:
    """E[h_l^2] at initialization, (seeds, layers) over the layer axis (0 = input projection)."""
    point = ds.sel({"model.activation": activation, "scheme": scheme}).isel(optimizer=0, step=0)
    return point["act_rms"].transpose("seed", "layer").values.astype(float) ** 2


def profile_slopes(ds, activation: str, scheme: str, width: int) -> tuple[float, float]:
    """(measured, mean-field) slope of ln E[h_l^2] over the hidden layers, seed-mean profile."""
    m = moments(ds, activation, scheme).mean(axis=0)
    theory = mean_field_moments(activation, sigma_w2(scheme, width), m[0], len(m) - 2)
    return slope(np.log(m[1:-1])), slope(np.log(theory[1:]))


def constant_loss(data_cfg: dict) -> float:
    """The loss of the best constant prediction on the task: Var(y), or the label entropy."""
    task = data.make(config.DataConfig(**data_cfg))
    y = np.asarray(task.y, float)
    if data_cfg["task"] == "classification":
        p = np.bincount(y.astype(int), minlength=data_cfg["output_dim"]) / len(y)
        return float(-np.sum(p[p > 0] * np.log(p[p > 0])))
    return float(np.mean(np.var(y, axis=0)))


def final_loss_ratio(ds, optimizer: str, scheme: str, chance: float) -> float:
    """Median over seeds of the ReLU net's final loss / the best constant's (inf if it diverged)."""
    loss = ds["loss"].sel({"model.activation": "relu", "optimizer": optimizer, "scheme": scheme}).isel(step=-1)
    return float(np.median(np.where(np.isfinite(loss.values), loss.values, np.inf))) / chance


def checks(ds) -> list[Check]:
    ds = results.with_axes(ds, AXES)
    cfg = results.config_of(ds)["config"]
    width, layers, seeds = cfg["model"]["width"], ds.sizes["layer"] - 2, ds.sizes["seed"]
    acts, schemes, opts = (list(ds[a].values) for a in ("model.activation", "scheme", "optimizer"))
    out = []
    if "zero" in schemes:
        spread = float(np.nanmax(ds["unit_spread_after"].sel(scheme="zero").isel(step=-1).values))
        out.append(Check(f"zero init: max unit spread after {ds.sizes['step']} updates", spread,
                         f"<= {SYMMETRY_TOL:g} (random init: ~1)", spread <= SYMMETRY_TOL))
        if "sigmoid" in acts:  # sigmoid(0) = 1/2: the symmetric net still learns, units stay equal
            w = ds["weight_norm_after"].sel({"scheme": "zero", "model.activation": "sigmoid"}).isel(step=-1)
            moved = float(np.nanmin(np.nanmax(w.values[..., 1:-1], axis=-1)))
            out.append(Check("zero init + sigmoid: largest hidden |W| after training", moved,
                             "> 0 (weights moved, units still equal)", moved > 0))
    tol = slope_tolerance(layers, width, seeds)
    for activation, scheme, label in PROFILE_CHECKS:
        if activation in acts and scheme in schemes:
            measured, theory = profile_slopes(ds, activation, scheme, width)
            out.append(Check(f"{label}: slope of ln E[h^2] per layer", measured,
                             f"{theory:+.3f} +- {tol:.3f} (mean field)", abs(measured - theory) <= tol))
    if "relu" in acts and "he_normal" in schemes:
        m = moments(ds, "relu", "he_normal").mean(axis=0)[1:-1]
        spread, flat = float(np.max(np.abs(np.log(m / m[0])))), flat_tolerance(layers, width, seeds)
        out.append(Check(f"He + ReLU: max_l |ln m_l/m_1| over {layers} layers", spread,
                         f"<= 3 sqrt(5(L-1)/(n seeds)) = {flat:.3f}", spread <= flat))
    if "relu" in acts and ds.sizes["step"] >= TRAIN_STEPS:
        chance = constant_loss(cfg["data"])
        for optimizer, scheme, stalls in TRAIN_CHECKS:
            if optimizer in opts and scheme in schemes:
                ratio = final_loss_ratio(ds, optimizer, scheme, chance)
                expected, passed = (f">= {STALLED} (stalls)", ratio >= STALLED) if stalls else \
                    (f"<= {TRAINED} (trains)", ratio <= TRAINED)
                out.append(Check(f"{optimizer}, {scheme} ReLU: final loss / constant's", ratio, expected, passed))
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


def plt_line(color):
    from matplotlib.lines import Line2D

    return Line2D([], [], color=color)


def _profiles_figure(ds, found: dict):
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
        lines = [f"{SHORT[s]}: {found[(a, s)][0]:+.3f}  (mean field {found[(a, s)][1]:+.3f})"
                 for a, s, _ in PROFILE_CHECKS if a == activation and (a, s) in found]
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
    handles = {str(s): plt_line(COLOR[str(s)]) for s in ds["scheme"].values}
    fig.legend(handles.values(), handles.keys(), loc="outside right center", frameon=False)
    width = results.config_of(ds)["config"]["model"]["width"]
    fig.suptitle(f"At initialization (Glorot & Bengio 2010): {ds.sizes['layer'] - 2} layers x {width}, "
                 f"{ds.sizes['seed']} seeds",
                 fontsize=10)
    return fig


def _training_figure(ds):
    cfg = results.config_of(ds)["config"]
    chance = constant_loss(cfg["data"])
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
        ax.axhline(chance, color="0.3", linestyle="--", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylim(max(ax.get_ylim()[0], 1e-6), 10 * chance)
        lr = cfg["optim"]["lr"] if optimizer == "momentum" else cfg["adam_lr"]
        ax.set_title(f"{'SGD + momentum' if optimizer == 'momentum' else 'Adam'}, lr {lr:g}")
        ax.set_xlabel("step")
        text = [f"{SHORT[s]}: final / constant = {final_loss_ratio(ds, optimizer, s, chance):.2g}"
                for s in ("xavier_normal", "he_normal") if s in ds["scheme"].values]
        plotting.note(ax, "\n".join(["dashed: best constant prediction"] + text), loc="lower left")
    axes[0, 0].set_ylabel(f"training loss, {ds.sizes['layer'] - 2}-layer ReLU net")
    if zero:  # zero init's symmetry: the spread across units of each layer's incoming weights
        ax = axes[0, -1]
        activation = "sigmoid" if "sigmoid" in ds["model.activation"].values else "relu"
        for scheme in ds["scheme"].values:
            spread = ds["unit_spread_after"].sel({"model.activation": activation, "scheme": scheme})
            spread = spread.isel(optimizer=0, step=-1).transpose("seed", "layer").values[:, :-1]
            plotting.band(ax, ds["layer"].values[:-1], _finite(spread), str(scheme), color=COLOR[str(scheme)],
                          log=False)
        ax.set_ylim(-0.05, 1.75)
        ax.set_title(f"{activation}: after {ds.sizes['step']} steps")
        ax.set_xlabel("layer l (0 = input projection)")
        ax.set_ylabel("unit spread |W - mean column| / |W|")
        symmetric = [c for c in checks(ds) if c.name.startswith("zero init")]
        if symmetric:
            plotting.note(ax, "\n".join(f"{c.name.split(': ')[1]}: {c.measured:.2g}" for c in symmetric),
                          loc="upper right")
    plotting.legend_outside(fig, axes[0, 0])
    fig.suptitle("Training from each init (He et al. 2015, Fig. 3)" + ("; zero init stays symmetric" if zero else ""),
                 fontsize=10)
    return fig


def figures(ds) -> dict:
    ds = results.with_axes(ds, AXES)
    width = results.config_of(ds)["config"]["model"]["width"]
    found = {(a, s): profile_slopes(ds, a, s, width) for a, s, _ in PROFILE_CHECKS
             if a in ds["model.activation"].values and s in ds["scheme"].values}
    with warnings.catch_warnings():  # diverged runs are all-NaN after their first bad step
        warnings.filterwarnings("ignore", "All-NaN slice", RuntimeWarning)
        figs = {"": _profiles_figure(ds, found)}
        if "relu" in ds["model.activation"].values and ds.sizes["step"] > 1:
            figs["training"] = _training_figure(ds)
    return figs
