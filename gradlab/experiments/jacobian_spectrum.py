"""A5: dynamical isometry: singular values of the input-output Jacobian (Saxe et al. 2014;
Pennington et al. 2017).

J = dh_L / dh_0, from the input projection's output h_0 to the last hidden layer's output h_L,
is the product of L factors W_l D_l with D_l = diag(phi'(z_l)). For wide nets W_l and D_l are
asymptotically free, and the normalised variance r = Var(lambda) / E[lambda]^2 of the spectrum
of JJ^T adds over free factors (tau((ab)^2) = tau(a^2) tau(b)^2 + tau(a)^2 tau(b^2) - tau(a)^2 tau(b)^2),
so (Pennington et al. 2017, eqs. 12-17, written as normalised variances)
    r(JJ^T) = sum_l [ r(W^T W) + r(D_l^2) ],   r(W^T W) = 1 (Gaussian, Marchenko-Pastur), 0 (orthogonal),
    r(D_l^2) = E[phi'^4] / E[phi'^2]^2 - 1  at the layer's pre-activation length q_l.
A linear net with orthogonal weights is an exact isometry: every singular value is 1. At
criticality (chi_1 = 1) Gaussian weights still spread the spectrum linearly in depth
(r >= L), orthogonal ones do not for tanh (r(D^2) = O(q_l^2) and q_l ~ 1/(2l) at sigma_b = 0),
while ReLU's D^2 in {0, 1} gives r = L even with orthogonal weights.

One compile per activation; init scheme (lecun_normal vs orthogonal), gain, depth (a mask)
and seed are vmapped. The Jacobian is computed in the Trial with jax.jacfwd of models.apply
with respect to a probe added to h_0 (the readout replaced by the identity, so the output is
h_L); the singular values are taken on the host with numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import data, meanfield, models, results
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError, ExperimentError
from gradlab.experiments import Check

NAME = "jacobian_spectrum"
CLAIM = (
    "orthogonal weights make a linear net an exact isometry and keep tanh's Jacobian spectrum narrow "
    "at criticality; Gaussian weights spread it linearly in depth"
)
AXES = ["model.activation", "model.init", "model.init_gain", "model.depth", "seed"]
# sigma_w with chi_1 = sigma_w^2 E[phi'^2] = 1: phi' = 1 (linear, tanh at q -> 0), P(z > 0) = 1/2 (ReLU).
CRITICAL_GAIN = {"linear": 1.0, "tanh": 1.0, "relu": float(np.sqrt(2.0))}
# r(W^T W) of a square N x N weight as N -> inf: 0 for orthogonal, 1 (Marchenko-Pastur) for iid entries.
R_ORTHOGONAL, R_IID = 0.0, 1.0
F32_EPS = float(np.finfo(np.float32).eps)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the gain convention."""

    critical_gain: bool = param(
        True, doc="scale model.init_gain by the activation's critical gain (1 for linear and tanh, sqrt 2 for ReLU)"
    )

    def validate(self) -> None:
        super().validate()
        if self.critical_gain and self.model.activation not in CRITICAL_GAIN:
            raise ConfigError(
                f"critical_gain=true knows {', '.join(CRITICAL_GAIN)}, got {self.model.activation!r} "
                f"(set critical_gain=false to give the gain directly)",
                key="model.activation",
            )


class State(NamedTuple):
    params: dict
    x: jax.Array  # (examples, input_dim)


def spec_of(cfg) -> models.MLPSpec:
    """The config's MLP with a width x width readout (set to the identity, so out = h_L)."""
    return models.MLPSpec.from_config(cfg.model, cfg.data.input_dim, cfg.model.width)


def trial(cfg) -> Trial:
    """A probe at init: the Jacobian dh_L/dh_0 of every example, and preact_rms per layer."""
    spec = spec_of(cfg)
    factor = CRITICAL_GAIN[cfg.model.activation] if cfg.critical_gain else 1.0
    width = spec.width

    def hyper_of(hp):
        return models.MLPHyper.from_hp({**hp, "model.init_gain": hp["model.init_gain"] * factor})

    def init(hp, key):
        params = models.init(key, spec, hyper_of(hp))
        params = {**params, "output": {"w": jnp.eye(width), "b": jnp.zeros(width)}}
        return State(params, data.make(cfg.data).x)

    def step(hp, state):
        hyper = hyper_of(hp)

        def last_hidden(shift, x):
            probes = {**models.zero_probes(spec, 1), "input": shift[None]}
            out, taps = models.apply(state.params, x[None], spec, hyper, probes)
            return out[0], taps["preact_rms"]

        def one(x):
            return jax.jacfwd(last_hidden, has_aux=True)(jnp.zeros(width), x)

        jac, preact_rms = jax.vmap(one)(state.x)
        mask = models.layer_mask(spec, hyper)
        return state, {"jacobian": jac, "preact_rms": jnp.where(mask[None], preact_rms, jnp.nan)}

    return Trial(init, step, {"jacobian": ("example", "row", "col"), "preact_rms": ("example", "layer")})


# ----------------------------------------------------------------------------- measure (numpy)


def isometry_tolerance(depth: int, width: int) -> float:
    """Float32 bound on |s - 1| for a product of `depth` orthogonal factors: each factor's
    Gram-Schmidt orthogonality and each matmul of the forward-mode pass is accurate to
    gamma_N ~ N eps (Higham 2002, Thm. 3.5 and Sec. 19.8), and such errors add along the product."""
    return depth * width * F32_EPS


def _values(ds, var, tail):
    return ds[var].isel(step=0).transpose(*AXES, *tail).values.astype(np.float64)


def theory_variance(ds, q0, critical_gain: bool, sigma_b2: float) -> np.ndarray:
    """r(JJ^T) from free probability at each (activation, init, gain, depth, seed, example), from the
    pre-activation length q_0 at the input projection (q0: those dims)."""
    r_theory = np.zeros(q0.shape)
    for idx in np.ndindex(q0.shape[:4]):
        a, i, g, d = idx
        act = str(ds["model.activation"].values[a])
        depth = int(ds["model.depth"].values[d])
        factor = CRITICAL_GAIN.get(act, 1.0) if critical_gain else 1.0
        sigma_w2 = (float(ds["model.init_gain"].values[g]) * factor) ** 2
        q = meanfield.q_profile(q0[idx], sigma_w2, sigma_b2, depth, act)[1:]  # z_1 .. z_depth
        m1, m2 = meanfield.dphi2_moment(q, 1, act), meanfield.dphi2_moment(q, 2, act)
        r_weights = R_ORTHOGONAL if str(ds["model.init"].values[i]) == "orthogonal" else R_IID
        r_theory[idx] = depth * r_weights + np.sum(m2 / m1**2 - 1.0, axis=0)
    return r_theory


class Measured(NamedTuple):
    """Arrays over (activation, init, gain, depth[, seed, example[, singular value]]) and the checks' numbers."""

    activations: list
    schemes: list
    depths: np.ndarray
    width: int
    gain: int  # index of the gain drawn and checked: init_gain closest to 1 (criticality)
    singular: np.ndarray  # singular values of each Jacobian
    mean: np.ndarray  # r = Var(s^2)/E[s^2]^2 averaged over seeds and examples
    se: np.ndarray  # its standard error over seeds
    theory: np.ndarray  # free probability's r
    tol: np.ndarray  # 4 SE + r_theory L / N, the O(L/N) finite-width correction to the free moments
    variance_ratio: float  # max |r - r_theory| / tol
    isometry_error: float | None  # orthogonal linear: max |s - 1|; None if not run
    isometry_tolerance: float
    orthogonal: dict  # activation -> (r orthogonal, r Gaussian, r_theory - tol of orthogonal) at gain, deepest


def measure(ds) -> Measured:
    extra = [d for d in ds["jacobian"].dims if d not in (*AXES, "step", "example", "row", "col")]
    if extra:
        raise ExperimentError(
            f"{NAME}: figures and checks read the axes {', '.join(AXES)}; also swept: {', '.join(extra)}"
        )
    cfg = results.run_config(ds)
    acts, schemes = [str(a) for a in ds["model.activation"].values], [str(s) for s in ds["model.init"].values]
    depths, width = np.asarray(ds["model.depth"].values), cfg["model"]["width"]
    singular = np.linalg.svd(_values(ds, "jacobian", ("example", "row", "col")), compute_uv=False)
    lam = singular**2
    with np.errstate(divide="ignore", invalid="ignore"):
        r = lam.var(axis=-1) / lam.mean(axis=-1) ** 2
    q0 = _values(ds, "preact_rms", ("example", "layer"))[..., 0] ** 2
    r_theory = theory_variance(ds, q0, cfg["critical_gain"], cfg["model"]["bias_std"] ** 2)
    per_seed = np.nanmean(r, axis=-1)
    mean, seeds = np.nanmean(per_seed, axis=-1), per_seed.shape[-1]
    se = np.nanstd(per_seed, axis=-1, ddof=1) / np.sqrt(seeds) if seeds > 1 else np.zeros(mean.shape)
    theory = np.nanmean(r_theory, axis=(-1, -2))
    tol = 4 * se + theory * depths.astype(float) / width + 1e-6
    g = int(np.argmin(np.abs(np.asarray(ds["model.init_gain"].values, float) - 1.0)))
    isometry = None
    if "linear" in acts and "orthogonal" in schemes:
        isometry = float(np.max(np.abs(singular[acts.index("linear"), schemes.index("orthogonal")] - 1.0)))
    orthogonal = {}
    if {"lecun_normal", "orthogonal"} <= set(schemes):
        gauss, orth = schemes.index("lecun_normal"), schemes.index("orthogonal")
        for a, act in enumerate(acts):
            orthogonal[act] = (
                float(mean[a, orth, g, -1]),
                float(mean[a, gauss, g, -1]),
                float(theory[a, orth, g, -1] - tol[a, orth, g, -1]),
            )
    return Measured(
        acts,
        schemes,
        depths,
        width,
        g,
        singular,
        mean,
        se,
        theory,
        tol,
        float(np.nanmax(np.abs(mean - theory) / tol)),
        isometry,
        isometry_tolerance(int(depths.max()), width),
        orthogonal,
    )


def checks(m: Measured) -> list[Check]:
    out = []
    if m.isometry_error is not None:
        out.append(
            Check.at_most(
                f"orthogonal linear: max |s - 1| (depths {', '.join(map(str, m.depths))})",
                m.isometry_error,
                m.isometry_tolerance,
                "L N eps32",
            )
        )
    out.append(
        Check.at_most(
            "spectral variance r = Var(s^2)/E[s^2]^2 vs free probability: max |r - r_th| / tol", m.variance_ratio, 1.0
        )
    )  # tol = 4 SE + r_th L/N
    for act in ("tanh", "linear", "relu"):
        if act not in m.orthogonal:
            continue
        r_orth, r_gauss, floor = m.orthogonal[act]
        name = f"{act} at chi_1 = 1, depth {m.depths[-1]}: r orthogonal (r Gaussian = {r_gauss:.3g})"
        if act == "relu":  # D^2 in {0, 1}: r(D^2) = 1 per layer, so no isometry even for orthogonal W
            out.append(Check.at_least(name, r_orth, floor, "r_th - tol (r_th = L: no isometry)"))
        else:
            out.append(Check.at_most(name, r_orth, r_gauss / 4, "r Gaussian / 4"))
    return out


def figures(ds, m: Measured) -> dict:
    """Singular-value histograms and r against depth (gradlab/experiments/_jacobian_spectrum_figures.py)."""
    from gradlab.experiments import _jacobian_spectrum_figures

    return _jacobian_spectrum_figures.draw(ds, m)
