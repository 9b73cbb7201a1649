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

from gradlab import data, meanfield, models, plotting, results
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ExperimentError
from gradlab.experiments import Check

NAME = "jacobian_spectrum"
CLAIM = ("orthogonal weights make a linear net an exact isometry and keep tanh's Jacobian spectrum narrow "
         "at criticality; Gaussian weights spread it linearly in depth")
AXES = ["model.activation", "model.init", "model.init_gain", "model.depth", "seed"]
# sigma_w with chi_1 = sigma_w^2 E[phi'^2] = 1: phi' = 1 (linear, tanh at q -> 0), P(z > 0) = 1/2 (ReLU).
CRITICAL_GAIN = {"linear": 1.0, "tanh": 1.0, "relu": float(np.sqrt(2.0))}
# r(W^T W) of a square N x N weight as N -> inf: 0 for orthogonal, 1 (Marchenko-Pastur) for iid entries.
R_ORTHOGONAL, R_IID = 0.0, 1.0
F32_EPS = float(np.finfo(np.float32).eps)
R_FLOOR = 1e-2  # the r panels' lower limit (an orthogonal linear net's r ~ 1e-12 is stated instead)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the gain convention."""

    critical_gain: bool = param(True, doc="scale model.init_gain by the activation's critical gain "
                                          "(1 for linear and tanh, sqrt 2 for ReLU)")


class State(NamedTuple):
    params: dict
    x: jax.Array  # (examples, input_dim)


def spec_of(cfg) -> models.MLPSpec:
    """The config's MLP with a width x width readout (set to the identity, so out = h_L)."""
    return models.MLPSpec.from_config(cfg.model, cfg.data.input_dim, cfg.model.width)


def gain_factor(cfg) -> float:
    if not cfg.critical_gain:
        return 1.0
    if cfg.model.activation not in CRITICAL_GAIN:
        known = ", ".join(CRITICAL_GAIN)
        raise ExperimentError(f"{NAME}: critical_gain=true knows {known}; got model.activation="
                              f"{cfg.model.activation!r} (set critical_gain=false to give the gain directly)")
    return CRITICAL_GAIN[cfg.model.activation]


def trial(cfg) -> Trial:
    spec = spec_of(cfg)
    factor = gain_factor(cfg)
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


# ----------------------------------------------------------------------------- analysis (host, numpy)


class Spectra(NamedTuple):
    """Per Jacobian, dims (activation, init, gain, depth, seed, example): singular values (..., N),
    the normalised spectral variance r of JJ^T, its free-probability prediction and the depth."""

    ds: object
    singular: np.ndarray
    r: np.ndarray
    r_theory: np.ndarray
    width: int


def _values(ds, var, tail):
    return ds[var].isel(step=0).transpose(*AXES, *tail).values.astype(np.float64)


def spectra(ds) -> Spectra:
    ds = results.with_axes(ds, AXES)
    extra = [d for d in ds["jacobian"].dims if d not in (*AXES, "step", "example", "row", "col")]
    if extra:
        raise ExperimentError(f"{NAME}: figures and checks read the axes {', '.join(AXES)}; also swept: {', '.join(extra)}")
    cfg = results.config_of(ds)["config"]
    jac = _values(ds, "jacobian", ("example", "row", "col"))
    singular = np.linalg.svd(jac, compute_uv=False)
    lam = singular**2
    with np.errstate(divide="ignore", invalid="ignore"):
        r = lam.var(axis=-1) / lam.mean(axis=-1) ** 2
    q0 = _values(ds, "preact_rms", ("example", "layer"))[..., 0] ** 2
    r_theory = np.zeros(r.shape)
    sigma_b2 = cfg["model"]["bias_std"] ** 2
    for idx in np.ndindex(r.shape[:4]):
        a, i, g, d = idx
        act = str(ds["model.activation"].values[a])
        scheme = str(ds["model.init"].values[i])
        depth = int(ds["model.depth"].values[d])
        factor = CRITICAL_GAIN.get(act, 1.0) if cfg["critical_gain"] else 1.0
        sigma_w2 = (float(ds["model.init_gain"].values[g]) * factor) ** 2
        q = meanfield.q_profile(q0[idx], sigma_w2, sigma_b2, depth, act)[1:]  # z_1 .. z_depth
        m1, m2 = meanfield.dphi2_moment(q, 1, act), meanfield.dphi2_moment(q, 2, act)
        r_weights = R_ORTHOGONAL if scheme == "orthogonal" else R_IID
        r_theory[idx] = depth * r_weights + np.sum(m2 / m1**2 - 1.0, axis=0)
    return Spectra(ds, singular, r, r_theory, cfg["model"]["width"])


def isometry_tolerance(depth: int, width: int) -> float:
    """Float32 bound on |s - 1| for a product of `depth` orthogonal factors: each factor's
    Gram-Schmidt orthogonality and each matmul of the forward-mode pass is accurate to
    gamma_N ~ N eps (Higham 2002, Thm. 3.5 and Sec. 19.8), and such errors add along the product."""
    return depth * width * F32_EPS


def _index(sp: Spectra, **sel):
    """Positional index of sel = {axis name: value} into a Spectra array (None if not swept)."""
    out = []
    for name in AXES[:4]:
        values = list(sp.ds[name].values)
        if name in sel:
            match = [i for i, v in enumerate(values) if v == sel[name] or (isinstance(v, float) and np.isclose(v, sel[name]))]
            if not match:
                return None
            out.append(match[0])
        else:
            out.append(slice(None))
    return tuple(out)


def reference_gain(sp: Spectra) -> int:
    """The gain drawn and checked: init_gain closest to 1 (criticality under critical_gain)."""
    return int(np.argmin(np.abs(np.asarray(sp.ds["model.init_gain"].values, float) - 1.0)))


def variance_table(sp: Spectra):
    """r averaged over seeds and examples, its standard error over seeds, theory, and tolerance:
    arrays over (activation, init, gain, depth). Tolerance = 4 SE + r_theory L / N, the O(L/N)
    finite-width correction to the free moments (e.g. r(W^T W) = 1 + 1/N for one Gaussian factor)."""
    per_seed = np.nanmean(sp.r, axis=-1)
    mean = np.nanmean(per_seed, axis=-1)
    seeds = per_seed.shape[-1]
    se = np.nanstd(per_seed, axis=-1, ddof=1) / np.sqrt(seeds) if seeds > 1 else np.zeros(mean.shape)
    theory = np.nanmean(sp.r_theory, axis=(-1, -2))
    depth = np.asarray(sp.ds["model.depth"].values, float)
    tol = 4 * se + theory * depth / sp.width + 1e-6
    return mean, se, theory, tol


def checks(ds) -> list[Check]:
    return _checks(spectra(ds))


def _checks(sp: Spectra) -> list[Check]:
    out = []
    depths = np.asarray(sp.ds["model.depth"].values)
    idx = _index(sp, **{"model.activation": "linear", "model.init": "orthogonal"})
    if idx is not None:
        worst = float(np.max(np.abs(sp.singular[idx] - 1.0)))
        tol = isometry_tolerance(int(depths.max()), sp.width)
        out.append(Check(f"orthogonal linear: max |s - 1| (depths {', '.join(map(str, depths))})", worst,
                         f"<= L N eps32 = {tol:.2g}", worst <= tol))
    mean, se, theory, tol = variance_table(sp)
    ratio = float(np.nanmax(np.abs(mean - theory) / tol))
    out.append(Check("spectral variance r = Var(s^2)/E[s^2]^2 vs free probability: max |r - r_th| / tol",
                     ratio, "<= 1 (tol = 4 SE + r_th L/N)", ratio <= 1.0))
    g = reference_gain(sp)
    for act in ("tanh", "linear", "relu"):
        gauss, orth = (_index(sp, **{"model.activation": act, "model.init": s}) for s in ("lecun_normal", "orthogonal"))
        if gauss is None or orth is None:
            continue
        r_gauss, r_orth = mean[gauss][g, -1], mean[orth][g, -1]
        name = f"{act} at chi_1 = 1, depth {depths[-1]}: r orthogonal (r Gaussian = {r_gauss:.3g})"
        if act == "relu":  # D^2 in {0, 1}: r(D^2) = 1 per layer, so no isometry even for orthogonal W
            floor = theory[orth][g, -1] - tol[orth][g, -1]
            out.append(Check(name, float(r_orth), f">= r_th - tol = {floor:.3g} (r_th = L: no isometry)",
                             bool(r_orth >= floor)))
        else:
            out.append(Check(name, float(r_orth), f"<= r Gaussian / 4 = {r_gauss / 4:.3g}", bool(r_orth <= r_gauss / 4)))
    return out


LOG_S_RANGE = (-5.0, 1.5)  # histogram range of log10 s; values beyond are drawn in the end bins


def figures(ds) -> dict:
    sp = spectra(ds)
    mean, se, theory, _ = variance_table(sp)
    found = {c.name: c for c in _checks(sp)}
    acts = [str(a) for a in sp.ds["model.activation"].values]
    schemes = [str(s) for s in sp.ds["model.init"].values]
    depths = np.asarray(sp.ds["model.depth"].values)
    g = reference_gain(sp)
    label = {"lecun_normal": "Gaussian", "orthogonal": "orthogonal"}
    fig, axes = plotting.figure(len(acts), len(schemes) + 1, width=3.3, height=2.5)
    bins = np.linspace(*LOG_S_RANGE, 66)
    colors = {d: plotting.COLORS[k % len(plotting.COLORS)] for k, d in enumerate(depths)}
    for row, act in enumerate(acts):
        for col, scheme in enumerate(schemes):
            ax = axes[row, col]
            a, i = acts.index(act), schemes.index(scheme)
            for d, depth in enumerate(depths):
                logs = np.log10(np.clip(sp.singular[a, i, g, d].ravel(), 10 ** bins[0], 10 ** bins[-1]))
                ax.hist(logs, bins=bins, density=True, histtype="step", color=colors[depth], label=f"L = {depth}")
            ax.axvline(0.0, color="black", lw=0.6, ls=":")
            ax.set_title(f"{act}, {label.get(scheme, scheme)}")
            ax.set_yscale("log")
            ax.set_ylim(1e-2, None)
            if col == 0:
                ax.set_ylabel("density")
            if row == len(acts) - 1:
                ax.set_xlabel(r"$\log_{10} s$ of $\partial h_L/\partial h_0$ (ends: clipped)")
            r_text = ", ".join(f"{mean[a, i, g, d]:.2g}" for d in range(len(depths)))
            plotting.note(ax, f"r(L = {', '.join(map(str, depths))})\n= {r_text}", loc="upper left")
        ax = axes[row, -1]
        for i, scheme in enumerate(schemes):
            a = acts.index(act)
            color = plotting.COLORS[i]
            shown = np.where(mean[a, i, g] >= R_FLOOR, mean[a, i, g], np.nan)
            ax.errorbar(depths, shown, yerr=se[a, i, g], fmt="o", ms=4, color=color, label=f"{label.get(scheme, scheme)} measured")
            ax.plot(depths, np.where(theory[a, i, g] >= R_FLOOR, theory[a, i, g], np.nan), color=color, lw=1.2, label=f"{label.get(scheme, scheme)} free prob.")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_ylim(R_FLOOR, None)
        ax.set_title(f"{act}: spectral variance r")
        ax.set_ylabel(r"$r = \mathrm{Var}(s^2)/\mathrm{E}[s^2]^2$")
        if row == len(acts) - 1:
            ax.set_xlabel("depth L")
        if act == "linear":
            name = next((n for n in found if n.startswith("orthogonal linear")), None)
            if name:
                r_orth = np.nanmax(mean[acts.index(act), schemes.index("orthogonal"), g]) if "orthogonal" in schemes else 0.0
                plotting.note(ax, f"orthogonal (theory 0): r <= {r_orth:.1e},\nmax|s-1| = {found[name].measured:.1e}",
                              loc="lower right")
    plotting.legend_outside(fig, axes[0, 0])
    handles, labels = axes[0, -1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right lower", frameon=False, fontsize=7)
    name = next((n for n in found if n.startswith("spectral variance")), None)
    extra = f"; max |r - r_th|/tol = {found[name].measured:.2f}" if name else ""
    fig.suptitle(f"Jacobian spectra at criticality, width {sp.width} (Saxe et al. 2014; Pennington et al. 2017){extra}",
                 fontsize=10)
    return {"": fig}
