"""C6: activation checkpointing (jax.checkpoint) trades recomputation for activation memory.

Reverse mode keeps, for every hidden block of the MLP's lax.scan, the residuals its backward
pass needs. For a tanh block h -> y = tanh(h W + b) JAX's linearisation keeps the block input h
(for dL/dW = h^T delta) and what tanh's JVP rule keeps: y and 1 - y on jax 0.10 (three (batch,
width) float32 arrays per layer in all), 1 - y^2 alone on jax 0.12 (two). The checks compare with
the count jax itself reports. So the compiled program's temporary memory grows with depth at about
    slope_plain = 3 (jax 0.10) or 2 (jax 0.12) x batch x width x 4 bytes per layer,
With model.remat each block is wrapped in jax.checkpoint: only its input (the scan carry h)
is kept, and the block is re-run in the backward pass, so
    slope_remat = 1 x batch x width x 4 bytes per layer   (ratio 1/3, or 1/2, for tanh),
at the price of one more forward pass: with a backward pass ~2 forwards, ~(1 + 2 + 1)/(1 + 2)
= 4/3 of the time.

Depth fixes the program's shapes, so the memory is measured per depth in `depths`, outside the
engine's sweep: `trial(cfg)` compiles the gradient of the loss (forward + backward) at every depth,
reads `compiled.memory_analysis()`, counts the residuals `jax.vjp` keeps (the shapes-level
reference of the slope) and times a few calls after a warm-up (gradlab.memory). Those numbers
ride along as constant metrics of a short training run of the config's own model (model.remat is
a static axis: one group each), whose losses and gradient norms must agree with and without remat.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import analysis, data, memory, models, results, telemetry, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "remat"
CLAIM = (
    "jax.checkpoint per block cuts the activation memory's slope in depth to 1 (batch x width) array per layer"
    " (from 3 on jax 0.10, 2 on jax 0.12) for ~4/3 the time"
)
AXES = ["model.remat", "seed"]
F32_BYTES = 4
SLOPE_RTOL = 0.05  # the measured slope may differ from the residual count by XLA's per-layer bookkeeping:
#                    a few scalars and predicates per layer, well under 5% of one (batch, width) array at
#                    batch x width >= 64 x 64 (>= 16 KiB); buffer reuse could only lower it, never by 5%.
ELEMENTWISE_OPS = 8  # per element of a block: bias add, select, tanh' (1 - y^2: 2), ... -> the extra flops of a
#                      re-run block are 2 B W^2 (its matmul) + at most 8 B W: relative slack 8 / (2 W).
GRAD_RTOL = 1e-5  # remat re-runs the same float32 ops: at most a few ulps (~1e-7) per layer, x depth <= 64.
PROFILED = (
    "temp_bytes",
    "argument_bytes",
    "output_bytes",
    "residual_bytes",
    "step_seconds",
    "flops",
    "transcendentals",
    "depth_measured",
)


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the depths whose compiled memory and time are measured."""

    depths: tuple[int, ...] = param((4, 8, 16, 32, 64), doc="depths measured (each a compile; at least two)")
    timing_repeats: int = param(5, low=1, doc="timed calls per depth after one warm-up call (median)")

    def validate(self) -> None:
        super().validate()
        depths = list(self.depths)
        if len(depths) < 2 or min(depths) < 1 or len(set(depths)) != len(depths):
            raise ConfigError(f"needs at least two distinct depths >= 1 (a slope), got {depths}", key="depths")


def batch_size(cfg) -> int:
    return cfg.data.batch_size if 0 < cfg.data.batch_size < cfg.data.examples else cfg.data.examples


def gradient_program(spec: models.MLPSpec, cfg):
    """(loss function, its example arguments) for one MLP: what one step differentiates."""
    hyper = models.MLPHyper.from_config(cfg.model)._replace(depth=spec.depth)
    params = models.init(jax.random.PRNGKey(0), spec, hyper)
    batch = data.make(cfg.data)
    n = batch_size(cfg)

    def loss(params, x, y):
        out, _ = models.apply(params, x, spec, hyper)
        return data.loss(cfg.data, out, y)

    return loss, (params, batch.x[:n], batch.y[:n])


def profile(cfg, depth: int, repeats: int) -> dict:
    """Compiled memory (bytes), vjp activation residuals (bytes) and median seconds of one
    forward + backward pass of the config's MLP at `depth` (gradlab.memory)."""
    spec = dataclasses.replace(trials.mlp_spec(cfg), depth=depth)
    loss, args = gradient_program(spec, cfg)
    row = memory.compiled_profile(jax.value_and_grad(loss), args, repeats)
    residuals = memory.activation_residual_bytes(loss, args, batch_size(cfg), spec.width)
    return {**row, "residual_bytes": float(residuals), "depth_measured": float(depth)}


def trial(cfg) -> Trial:
    """A short training run of the config's MLP (losses and gradient norms, to compare remat on and
    off), carrying per-depth measurements of the gradient program as constant metrics."""
    rows = [profile(cfg, d, cfg.timing_repeats) for d in sorted(cfg.depths)]
    table = {k: jnp.asarray([r[k] for r in rows], jnp.float32) for k in PROFILED}
    base = trials.supervised_mlp(
        cfg, metrics=lambda view: {"grad_global_norm": telemetry.global_norm(view.grads), **table}
    )
    return Trial(base.init, base.step, {k: ("depth_point",) for k in PROFILED})


# ----------------------------------------------------------------------------- measured (host)


class Measured(NamedTuple):
    profiles: dict  # remat (False, True) -> {PROFILED name: values over the measured depths}
    slopes: dict  # remat -> (temp-memory slope, vjp-residual slope), bytes per layer
    unit: int  # bytes of one (batch, width) float32 array: the unit of activation memory
    batch: int
    width: int
    activation: str
    extra_flops: float | None  # remat - plain per scan body (XLA counts a while body once), median over depths
    extra_transcendentals: float | None
    train_rel_diff: float | None  # max rel. diff of loss and grad norm over the training run, remat vs plain
    steps: int
    timing_repeats: int


def measure(ds) -> Measured:
    cfg = results.run_config(ds)
    d = cfg["data"]
    n = d["batch_size"] if 0 < d["batch_size"] < d["examples"] else d["examples"]
    width = cfg["model"]["width"]
    first = ds.isel(seed=0, step=0)  # the profiles are constant metrics
    tab = {
        r: {k: first.sel({"model.remat": r})[k].values.astype(float) for k in PROFILED}
        for r in (False, True)
        if r in list(ds["model.remat"].values)
    }
    slopes = {
        r: (
            analysis.slope(t["depth_measured"], t["temp_bytes"]),
            analysis.slope(t["depth_measured"], t["residual_bytes"]),
        )
        for r, t in tab.items()
    }
    extra = {k: None for k in ("flops", "transcendentals")}
    diff = None
    if len(tab) == 2:
        # HloCostAnalysis counts a while loop's body once, so remat - plain is one block's forward re-run.
        extra = {k: float(np.median(tab[True][k] - tab[False][k])) for k in extra}
        loss = ds["loss"].transpose("model.remat", ...).values.astype(float)
        norm = ds["grad_global_norm"].transpose("model.remat", ...).values.astype(float)
        diff = float(
            max(
                np.max(np.abs(loss[1] - loss[0]) / np.abs(loss[0])), np.max(np.abs(norm[1] - norm[0]) / np.abs(norm[0]))
            )
        )
    return Measured(
        tab,
        slopes,
        n * width * F32_BYTES,
        n,
        width,
        cfg["model"]["activation"],
        extra["flops"],
        extra["transcendentals"],
        diff,
        cfg["steps"],
        cfg["timing_repeats"],
    )


def checks(m: Measured) -> list[Check]:
    out = []
    for remat, (temp, resid) in m.slopes.items():
        count = resid / m.unit
        out.append(
            Check.near(
                f"{'with' if remat else 'without'} remat: temp-memory slope / (batch x width x 4 B) "
                f"[residual count: {count:.3g}]",
                temp / m.unit,
                count,
                SLOPE_RTOL * count,
                "vjp residuals per layer",
            )
        )
    if (  # the extra_* and train_rel_diff are set wherever both remat values ran
        len(m.slopes) == 2
        and m.extra_flops is not None
        and m.extra_transcendentals is not None
        and m.train_rel_diff is not None
    ):
        block_matmul = 2 * m.batch * m.width**2
        out.append(
            Check.between(
                "remat: extra flops per scan body / one block's matmul (2 B W^2)",
                m.extra_flops / block_matmul,
                1.0,
                1.0 + ELEMENTWISE_OPS / (2 * m.width),
                "one forward re-run",
            )
        )
        if m.activation == "tanh":
            out.append(
                Check.near(
                    "remat: extra tanh evaluations per scan body / (B W)",
                    m.extra_transcendentals / (m.batch * m.width),
                    1.0,
                    0.0,
                    "one forward re-run",
                )
            )
        expected = m.slopes[True][1] / m.slopes[False][1]
        out.append(
            Check.near(
                "slope ratio remat / plain",
                m.slopes[True][0] / m.slopes[False][0],
                expected,
                2 * SLOPE_RTOL * expected,
                "residual ratio",
            )
        )
        out.append(
            Check.at_most(
                "training run: max rel. diff of loss and grad norm, remat vs plain", m.train_rel_diff, GRAD_RTOL
            )
        )
    return out


# ----------------------------------------------------------------------------- figure


def figures(ds, m: Measured) -> dict:
    """Memory and time against depth, and the remat / plain trade (gradlab/experiments/_remat_figures.py)."""
    from gradlab.experiments import _remat_figures

    return _remat_figures.draw(ds, m)
