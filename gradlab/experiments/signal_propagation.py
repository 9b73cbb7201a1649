"""A4: the order-to-chaos phase diagram of a deep tanh net (Poole et al. 2016; Schoenholz et al. 2017).

With W ~ N(0, sigma_w^2 / N) and b ~ N(0, sigma_b^2), the back-propagated signal of a wide
net obeys E|dL/dh_{l-1}|^2 = chi_1 E|dL/dh_l|^2 once the pre-activation length has settled at
its fixed point q*, where chi_1 = sigma_w^2 E[tanh'(sqrt(q*) z)^2] (Schoenholz et al. 2017,
eq. 15). So ln delta_l^2 (delta = RMS of dL/dh_l) falls linearly toward the input with slope
ln chi_1 per layer: gradients vanish in the ordered phase (chi_1 < 1), explode in the chaotic
one (chi_1 > 1), and the critical line chi_1 = 1 passes through (sigma_w^2, sigma_b^2) = (1, 0).
Two inputs' correlation c_l approaches its fixed point c* like exp(-l / xi_c), with
xi_c^-1 = -ln(sigma_w^2 E[tanh'(u1) tanh'(u2)]) at c* (eq. 9); xi_c diverges on the critical line.

The whole (sigma_w^2, sigma_b^2, seed) grid is one compiled program: sigma_w = model.init_gain
(lecun_normal: Var W = init_gain^2 / fan_in) and sigma_b = model.bias_std are traced. One
probe at init (steps: 1) records delta_rms per layer (the quantity supervised_mlp records at
step 0) and the mean correlation of the pre-activations of pairs of the batch's inputs.
The slope is fitted over hidden layers skip_layers + 1 .. depth, after q has settled at q*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import analysis, data, meanfield, models, results, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "signal_propagation"
CLAIM = "ln|dL/dh_l|^2 falls toward the input with slope ln chi_1 (mean field); chi_1 = 1 is the order-to-chaos edge"
AXES = ["model.init_gain", "model.bias_std", "seed"]
# The catalog's check: |slope - ln chi_1| <= 0.015 at width 512, depth 60 (50 layers fitted), 4 seeds.
REFERENCE = {"width": 512, "fit_layers": 50, "seeds": 4, "tolerance": 0.015}
DEV_MAX = 0.3  # fit ln|c_l - c*| only where |c_l - c*| <= this, near c*, where the approach is exponential
MIN_FIT_LAYERS = 3


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the slope fit's window."""

    skip_layers: int = param(10, low=0, doc="hidden layers left out of the slope fit while q settles at q*")

    def validate(self) -> None:
        super().validate()
        self.require("model.norm", ("none",), "mean-field theory is for nets without normalization")
        if self.model.depth - self.skip_layers < MIN_FIT_LAYERS:
            raise ConfigError(
                f"at most model.depth - {MIN_FIT_LAYERS} = "
                f"{self.model.depth - MIN_FIT_LAYERS} (the slope needs {MIN_FIT_LAYERS} layers), "
                f"got {self.skip_layers}",
                key="skip_layers",
            )


class Probe(NamedTuple):
    key: jax.Array  # the point's parameters are drawn from it inside the step
    data: data.Data


def trial(cfg) -> Trial:
    """A probe at init: per layer delta_rms (RMS of dL/dh_l, as supervised_mlp records it before
    its first update), preact_rms, and one_minus_c (the input pairs' decorrelation).

    The parameters are drawn inside the step and not kept: a sweep of hundreds of width-512,
    depth-60 nets then holds one set of weights per point at a time, not the params, gradients
    and updates of a training state.
    """
    spec = trials.mlp_spec(cfg)

    def init(hp, key):
        del hp
        return Probe(key, data.make(cfg.data))

    def step(hp, state):
        hyper = models.MLPHyper.from_hp(hp)
        params = models.init(jax.random.split(state.key)[0], spec, hyper)  # supervised_mlp's k_params
        batch = data.batch(state.data, cfg.data, jnp.int32(0), jax.random.split(state.key)[1])

        def loss_fn(probes):
            out, taps = models.apply(params, batch.x, spec, hyper, probes)
            return data.loss(cfg.data, out, batch.y), taps

        probes = models.zero_probes(spec, batch.x.shape[0], jnp.dtype(spec.dtype))
        (loss, taps), probe_grads = jax.value_and_grad(loss_fn, has_aux=True)(probes)
        mask = models.layer_mask(spec, hyper)
        pre, _ = models.layer_values(params, batch.x, spec, hyper, dtype="float32")  # float32 whatever model.dtype
        one_minus_c = models.decorrelation(pre)
        metrics = {
            "loss": loss,
            "delta_rms": jnp.where(mask, models.probe_rms(probe_grads), jnp.nan),
            "preact_rms": jnp.where(mask, taps["preact_rms"], jnp.nan),
            "one_minus_c": jnp.where(mask, jnp.concatenate([one_minus_c, jnp.full((1,), jnp.nan)]), jnp.nan),
        }
        return state, metrics

    return Trial(init, step)


# ----------------------------------------------------------------------------- measure (numpy)


def tolerance(width: int, fit_layers: int, seeds: int) -> float:
    """The slope check's tolerance: the catalog's 0.015 at width 512, 50 fitted layers (depth 60,
    10 skipped) and 4 seeds, scaled like the slope's noise, rw(n) sqrt(Var step / seeds) with
    Var step ~ 2 / width. At the reference it is 3.1 sigma of that noise model near q* = 0."""
    ref = REFERENCE
    scale = analysis.random_walk_slope_std(fit_layers) / analysis.random_walk_slope_std(ref["fit_layers"])
    return ref["tolerance"] * scale * np.sqrt(ref["width"] * ref["seeds"] / (width * seeds))


def at_init(ds, var: str) -> np.ndarray:
    """A metric at init on the grid: (sigma_w, sigma_b, seed, layer)."""
    order = ("model.init_gain", "model.bias_std", "seed", "layer")
    return ds[var].isel(step=0).transpose(*order).values.astype(float)


def correlation_depth_scales(ds, SW, SB, q):
    """xi_c from theory and as fitted to the measured approach of c_l to c*
    (meanfield.fitted_correlation_depth_scale); NaN where sigma_b^2 = 0 (q* = 0 in the ordered
    phase: the correlation map is the identity there)."""
    c_star = meanfield.c_star(SW, SB, q=q)
    xi_theory = meanfield.xi_c(SW, SB, q=q, c=c_star)
    one_minus_c = at_init(ds, "one_minus_c")[..., :-1]  # layers 0..depth: the pre-activations
    xi_measured = meanfield.fitted_correlation_depth_scale(one_minus_c, c_star, DEV_MAX, where=SB > 0)
    return np.where(SB > 0, xi_theory, np.nan), xi_measured


class Measured(NamedTuple):
    """Arrays over (sigma_w^2, sigma_b^2[, seed]): measured growth rates and the mean-field theory,
    and the checks' numbers."""

    sw2: np.ndarray
    sb2: np.ndarray
    ln_chi: np.ndarray  # mean-field ln chi_1 at q*
    rate: np.ndarray  # fitted growth of ln delta_l^2 per layer toward the input, per seed
    mean_rate: np.ndarray  # its mean over seeds
    settled: np.ndarray  # q at q* throughout the fit window
    xi_measured: np.ndarray  # correlation depth scale (NaN where it cannot be measured)
    tolerance: float
    width: int
    depth: int
    skip: int
    seeds: int
    fit_layers: int
    critical_sw2: float  # mean-field sigma_w^2 of chi_1 = 1 at sigma_b^2 = 0
    worst_settled: float | None  # max |slope - ln chi_1| over the settled points; None if none
    worst_all: float  # max |slope - finite-depth mean field| over every point
    clear: int  # points with |ln chi_1| > tolerance (off the edge)
    phase_agreement: float | None  # fraction of those where sign(slope) = sign(ln chi_1)
    ordered: int  # ordered-phase points whose xi_c is short enough to measure
    ordered_gap: float | None  # max |1/xi_c measured - 1/xi_c| over them


def measure(ds) -> Measured:
    """Fitted growth rates and correlation depth scales, with the mean-field theory, on the grid."""
    cfg = results.run_config(ds)
    width, depth, skip = cfg["model"]["width"], cfg["model"]["depth"], cfg["skip_layers"]
    sw2 = np.asarray(ds["model.init_gain"].values, float) ** 2
    sb2 = np.asarray(ds["model.bias_std"].values, float) ** 2
    SW, SB = np.meshgrid(sw2, sb2, indexing="ij")
    layers = np.arange(1 + skip, depth + 1)  # hidden layers in the fit
    seeds = ds.sizes["seed"]
    delta = at_init(ds, "delta_rms")[..., layers]
    with np.errstate(divide="ignore", invalid="ignore"):
        rate = -np.log(delta**2) @ analysis.ols_weights(len(layers))  # (gain, bias, seed): growth toward the input
    mean_rate = np.nanmean(rate, axis=-1)
    q = meanfield.q_star(SW, SB)
    ln_chi = np.log(meanfield.chi_1(SW, q))
    # Mean field at finite depth, from the input's q_0 = sigma_w^2 |x|^2 / d + sigma_b^2 with E|x|^2 = d.
    # delta_{l-1}^2 = chi_1(q_l) delta_l^2, so ln delta_l^2 - ln delta_L^2 = sum_{m > l} ln chi_1(q_m).
    ln_chi_l = np.log(meanfield.chi_1(SW, meanfield.q_profile(SW + SB, SW, SB, depth)[layers]))
    profile = np.cumsum(ln_chi_l[::-1], axis=0)[::-1] - ln_chi_l
    finite_depth = -np.moveaxis(profile, 0, -1) @ analysis.ols_weights(len(layers))
    tol = tolerance(width, len(layers), seeds)
    settled = np.abs(finite_depth - ln_chi) <= tol / 3  # q is at q* throughout the window
    xi_theory, xi_measured = correlation_depth_scales(ds, SW, SB, q)
    err = np.abs(mean_rate - ln_chi)
    clear = np.abs(ln_chi) > tol
    # Ordered phase (c* = 1), off the edge, and xi_c short enough for the approach to finish
    # inside the net (exp(-depth / xi_c) <= e^-4); there 1/xi_c = -ln chi_1 as for the gradient.
    ordered = np.isfinite(xi_measured) & (ln_chi < -tol) & (SB > 0) & (xi_theory <= depth / 4)
    return Measured(
        sw2,
        sb2,
        ln_chi,
        rate,
        mean_rate,
        settled,
        xi_measured,
        tol,
        width,
        depth,
        skip,
        seeds,
        len(layers),
        float(meanfield.critical_sigma_w2(0.0)),
        float(np.max(err[settled])) if settled.any() else None,
        float(np.max(np.abs(mean_rate - finite_depth))),
        int(clear.sum()),
        float(np.mean(np.sign(mean_rate[clear]) == np.sign(ln_chi[clear]))) if clear.any() else None,
        int(ordered.sum()),
        float(np.max(np.abs(1.0 / xi_measured[ordered] - 1.0 / xi_theory[ordered]))) if ordered.any() else None,
    )


def checks(m: Measured) -> list[Check]:
    n = m.settled.size
    out = [
        Check.near(
            "mean-field chi_1 = 1 at sigma_b^2 = 0: sigma_w^2", m.critical_sw2, 1.0, 1e-3, "tanh'(0)^2 = 1, q* = 0:"
        )
    ]
    if m.worst_settled is not None:
        out.append(
            Check.at_most(
                f"max |slope - ln chi_1| ({int(m.settled.sum())}/{n} points with q at q*)",
                m.worst_settled,
                m.tolerance,
                "0.015 scaled from width 512, 50 layers, 4 seeds",
            )
        )
    out.append(Check.at_most(f"max |slope - mean field along q_l| (all {n} points)", m.worst_all, m.tolerance))
    if m.phase_agreement is not None:  # a fraction: every point agrees
        name = f"phase (sign of slope) = sign of ln chi_1 ({m.clear} points off the edge)"
        out.append(Check.at_least(name, m.phase_agreement, 1.0))
    if m.ordered_gap is not None:
        name = f"ordered phase: max |1/xi_c measured - 1/xi_c| ({m.ordered} points, xi_c <= depth/4)"
        out.append(Check.at_most(name, m.ordered_gap, m.tolerance))
    return out


def figures(ds, m: Measured) -> dict:
    """The phase diagram, example profiles, measured against mean field, and the correlation depth
    scale (gradlab/experiments/_signal_propagation_figures.py)."""
    from gradlab.experiments import _signal_propagation_figures

    return _signal_propagation_figures.draw(ds, m)
