"""The loss Hessian's spectrum is a bulk near zero plus a few outliers, at init and after training;
stochastic Lanczos quadrature (SLQ) reads it from Hessian-vector products alone.

SLQ (Ghorbani, Krishnan & Xiao 2019): m Lanczos steps from a Rademacher probe v give a tridiagonal T
whose eigenvalues (nodes) and squared first eigenvector components (weights) are the m-point Gauss
quadrature of the spectral measure of H seen from v: sum_j w_j node_j^k = v^T H^k v / |v|^2 exactly
for k <= 2m - 1 (Golub & Meurant 2010). Averaged over probes and smoothed by a Gaussian this is the
density; its top node converges to lambda_max fast.

The sweep trains the config's MLP (model.norm static: none vs layernorm; model.residual vmapped) and
runs SLQ at step 0 and at the last step (gated: the other steps do not pay for it). Two checks are
computed once at run time (`reference`): on a net of <= 3k parameters SLQ against numpy's eigh of the
full jax.hessian (lambda_max, and the quadrature moments against v^T H^k v for the same probes); and
on linear least squares with Gaussian inputs at d/n = 1/4, whose Hessian X^T X / n has the
Marchenko-Pastur density with edges (1 -+ 1/2)^2 = 0.25 and 2.25, read off the extreme nodes.
BatchNorm is left out: its Hessian couples the examples of a batch and its net lives in
gradlab/batchnorm_net.py; LayerNorm shows what a norm does to the outliers.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from gradlab import analysis, curvature, data, models, results, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "hessian_spectrum"
CLAIM = "the loss Hessian is a bulk near zero plus outliers (SLQ, checked against eigh and Marchenko-Pastur)"
AXES = ["model.norm", "model.residual"]  # one seed: the first of the run
MAX_CHECK_PARAMS = 3000
LAMBDA_TOL = 1e-3  # relative error of SLQ's lambda_max against eigh
MOMENT_TOL = 1e-3  # quadrature moments k <= 2m - 1 against v^T H^k v, relative to sum w |lambda|^k
MP_RATIO = 0.25  # d / n
MP_EDGES = ((1 - MP_RATIO**0.5) ** 2, (1 + MP_RATIO**0.5) ** 2)
MP_TOL = 0.05


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus SLQ's size and the two checks' problems."""

    probes: int = param(4, low=1, doc="Rademacher probe vectors per SLQ")
    lanczos_steps: int = param(40, low=2, doc="Lanczos steps (HVPs) per probe")
    check_width: int = param(16, low=1, doc="width of the check net (model.depth, data.input_dim)")
    check_moment_steps: int = param(8, low=1, doc="Lanczos steps m of the moment check (k <= 2m - 1)")
    mp_dim: int = param(400, low=4, doc="least squares: parameters d (n = 4 d examples)")

    def validate(self) -> None:
        super().validate()
        w, d, i = self.check_width, self.model.depth, self.data.input_dim
        n = i * w + w + d * (w * w + w) + w * self.data.output_dim + self.data.output_dim
        if n > MAX_CHECK_PARAMS:
            raise ConfigError(f"the check net has {n} parameters; at most {MAX_CHECK_PARAMS}", key="check_width")
        if self.check_moment_steps >= self.lanczos_steps:
            raise ConfigError(f"must be < lanczos_steps = {self.lanczos_steps}", key="check_moment_steps")


def cost(cfg) -> str:
    return (
        f"curvature: {cfg.probes} probes x {cfg.lanczos_steps} Lanczos steps = {cfg.probes * cfg.lanczos_steps} HVPs "
        f"per measurement, 2 measurements per lane (step 0 and the last step)"
    )


def trial(cfg) -> Trial:
    """supervised_mlp, with SLQ's tridiagonals recorded at step 0 and at the last step (NaN between)."""
    base = trials.supervised_mlp(cfg)
    spec = trials.mlp_spec(cfg)
    m, probes = cfg.lanczos_steps, cfg.probes
    empty = (jnp.full((probes, m), jnp.nan), jnp.full((probes, m - 1), jnp.nan))

    def step(hp, state):
        hyper = models.MLPHyper.from_hp(hp)

        def spectrum(params, xy, key):
            loss = lambda p: data.loss(cfg.data, models.apply(p, xy.x, spec, hyper)[0], xy.y)  # noqa: E731
            matvec, n = curvature.flat_hvp(loss, params)
            return curvature.slq(matvec, n, key, probes, m)

        due = (state.step == 0) | (state.step == cfg.steps - 1)
        key = jax.random.fold_in(state.key, state.step)
        alphas, betas = curvature.gated(due, spectrum, empty, state.params, state.data, key)
        new, metrics = base.step(hp, state)
        return new, {**metrics, "slq_alpha": alphas, "slq_beta": betas}

    return Trial(base.init, step, {"slq_alpha": ("probe", "node"), "slq_beta": ("probe", "offdiag")})


def reference(cfg) -> dict:
    """The checks' numbers: SLQ and eigh of the check net's full Hessian; SLQ of least squares."""
    spec = models.MLPSpec.from_config(cfg.model, cfg.data.input_dim, cfg.data.output_dim)
    spec = spec.__class__(**{**spec.__dict__, "width": cfg.check_width})
    hyper = models.MLPHyper.from_config(cfg.model)
    xy = data.make(cfg.data)
    flat, unravel = ravel_pytree(models.init(jax.random.PRNGKey(cfg.seed), spec, hyper))

    def loss(v):
        return data.loss(cfg.data, models.apply(unravel(v), xy.x, spec, hyper)[0], xy.y)

    eigs, vectors = np.linalg.eigh(np.asarray(jax.jit(jax.hessian(loss))(flat), np.float64))
    matvec = jax.jit(lambda v: jax.jvp(jax.grad(loss), (flat,), (v,))[1])
    key = jax.random.PRNGKey(cfg.seed + 1)
    a, b = jax.jit(lambda k: curvature.slq(matvec, flat.size, k, cfg.probes, cfg.lanczos_steps))(key)
    a_m, b_m = jax.jit(lambda k: curvature.slq(matvec, flat.size, k, cfg.probes, cfg.check_moment_steps))(key)
    signs = np.asarray(jax.random.rademacher(key, (cfg.probes, flat.size), jnp.float32), np.float64)
    spectral = (signs @ vectors) ** 2 / flat.size  # each probe's weight on each eigenvector

    d = cfg.mp_dim
    x = jax.random.normal(jax.random.PRNGKey(cfg.seed + 2), (int(d / MP_RATIO), d))
    ls = lambda w: 0.5 * jnp.mean(jnp.square(x @ w))  # noqa: E731  (H = X^T X / n)
    ls_matvec = jax.jit(lambda v: jax.jvp(jax.grad(ls), (jnp.zeros(d),), (v,))[1])
    mp_a, mp_b = jax.jit(lambda k: curvature.slq(ls_matvec, d, k, cfg.probes, cfg.lanczos_steps))(
        jax.random.PRNGKey(cfg.seed + 3)
    )
    return {
        "eigh": eigs,
        "probe_weights": spectral,
        "slq_alpha": np.asarray(a),
        "slq_beta": np.asarray(b),
        "moment_alpha": np.asarray(a_m),
        "moment_beta": np.asarray(b_m),
        "mp_alpha": np.asarray(mp_a),
        "mp_beta": np.asarray(mp_b),
    }


# ----------------------------------------------------------------------------- measured


class Spectrum(NamedTuple):
    name: str
    when: str  # "init" or "trained"
    nodes: np.ndarray  # (probes, m)
    weights: np.ndarray

    @property
    def top(self) -> float:
        return float(np.max(self.nodes))

    def bulk(self, fraction: float = 0.05) -> float:
        """The spectral mass within fraction x lambda_max of zero."""
        return float(np.mean(np.sum(self.weights * (np.abs(self.nodes) <= fraction * self.top), axis=-1)))


class Measured(NamedTuple):
    spectra: list[Spectrum]
    check_eigs: np.ndarray
    check_nodes: tuple[np.ndarray, np.ndarray]
    lambda_error: float  # |SLQ lambda_max - eigh's| / eigh's
    moment_error: float  # max over k <= 2m - 1 and probes
    moment_error_beyond: float  # at k = 2m + 1 (not exact: shows the check can fail)
    moment_steps: int
    check_params: int
    mp_nodes: tuple[np.ndarray, np.ndarray]
    mp_edges: tuple[float, float]


def moment_errors(nodes, weights, probe_weights, eigs, ks) -> np.ndarray:
    """max over probes of |quadrature moment - v^T H^k v / |v|^2| / sum_i (v.q_i)^2 |lambda_i|^k, per k."""
    out = []
    for k in ks:
        quad = np.sum(weights * nodes**k, axis=-1)
        exact = probe_weights @ eigs**k
        out.append(np.max(np.abs(quad - exact) / (probe_weights @ np.abs(eigs) ** k)))
    return np.asarray(out)


def measure(ds) -> Measured:
    spectra = []
    for name, sel in analysis.variants(ds):
        point = ds.sel(sel)
        for when, t in (("init", 0), ("trained", ds.sizes["step"] - 1)):
            alpha = point["slq_alpha"].isel(step=t).values
            beta = point["slq_beta"].isel(step=t).values
            spectra.append(Spectrum(name, when, *curvature.gauss_quadrature(alpha, beta)))
    ref = {k: analysis.reference(ds, k) for k in ("eigh", "probe_weights", "slq_alpha", "slq_beta")}
    eigs = ref["eigh"]
    nodes, weights = curvature.gauss_quadrature(ref["slq_alpha"], ref["slq_beta"])
    m = analysis.reference(ds, "moment_alpha").shape[-1]
    mn, mw = curvature.gauss_quadrature(analysis.reference(ds, "moment_alpha"), analysis.reference(ds, "moment_beta"))
    errors = moment_errors(mn, mw, ref["probe_weights"], eigs, range(1, 2 * m + 2))
    mp = curvature.gauss_quadrature(analysis.reference(ds, "mp_alpha"), analysis.reference(ds, "mp_beta"))
    return Measured(
        spectra,
        eigs,
        (nodes, weights),
        abs(float(nodes.max()) - eigs[-1]) / abs(eigs[-1]),
        float(errors[: 2 * m - 1].max()),
        float(errors[2 * m]),
        m,
        len(eigs),
        mp,
        (float(mp[0].min()), float(mp[0].max())),
    )


def checks(m: Measured) -> list[Check]:
    low, high = m.mp_edges
    return [
        Check.below(
            f"check net ({m.check_params} params): SLQ lambda_max rel. error vs eigh", m.lambda_error, LAMBDA_TOL
        ),
        Check.below(
            f"Gauss quadrature moments k <= {2 * m.moment_steps - 1} (m = {m.moment_steps}): max rel. error",
            m.moment_error,
            MOMENT_TOL,
        ),
        Check.near("least squares d/n = 1/4: lower edge", low, MP_EDGES[0], MP_TOL * MP_EDGES[0], "Marchenko-Pastur"),
        Check.near("least squares d/n = 1/4: upper edge", high, MP_EDGES[1], MP_TOL * MP_EDGES[1], "Marchenko-Pastur"),
    ]


def figures(ds, m: Measured) -> dict:
    from gradlab.experiments import _hessian_spectrum_figures

    return _hessian_spectrum_figures.draw(m, int(results.run_config(ds)["steps"]))
