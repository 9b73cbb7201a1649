"""C3: float32, bfloat16 and float16 training; loss scaling; fp32 master weights.

The number formats and loss scaling are gradlab.precision's. The model (gradlab.models.apply)
computes in model.dtype from float32 parameters (master weights), so the backward pass runs in the
compute dtype and its float16 cotangents underflow below 2^-25. Each point trains one deep tanh
MLP, full batch, on a small loss (loss_weight x the task loss is what is differentiated: 2^-10 in
the config, so late in training most float16 gradients underflow; in float32 a power of 2 changes
nothing but the effective learning rate), with `loss_scale`:
  none     the float16 gradients as they come
  static   loss x static_scale before differentiation, gradients / static_scale after (float32)
  dynamic  precision.loss_scaling: the scale halves on a non-finite step (which is skipped) and
           doubles after growth_interval finite steps (Micikevicius et al. 2018, Sec. 3.2)
Every lane also records, from its gradients (unscaled, float32): the log2 histogram of the weight
and activation gradients, which fraction flushes to zero or lands subnormal in float16; and from
its updates u, what happens to them when added to the float32 master weights and to a shadow copy
of the weights kept in float16 that receives the same updates (precision.shadow_weights): an
update is lost when w + u == w, measured and in closed form (precision.update_lost).

One compile per compute dtype; loss_scale, the scales, growth_interval and the seed are vmapped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradlab import analysis, data, models, precision, results, transforms, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "mixed_precision"
CLAIM = (
    "fp16 gradients underflow without loss scaling; scaled fp16 tracks fp32; "
    "fp16 weights lose small updates that fp32 master weights keep"
)
AXES = ["model.dtype", "loss_scale", "seed"]
TAIL = 0.25  # "late training": the last quarter of the steps
MEASURABLE = 0.01  # a fraction of gradient entries or update mass we call measurable (1%)
CLOSED_FORM_RTOL = 1e-6  # measured and closed-form lost mass sum the same entries: float32 sums agree


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the loss scaling of each point."""

    loss_scale: str = param(
        "dynamic",
        choices=precision.LOSS_SCALES,
        sweep="choice",
        doc="none | static (x static_scale) | dynamic (gradlab.precision.loss_scaling)",
    )
    static_scale: float = param(1024.0, low=1.0, doc="the loss scale of loss_scale=static")
    initial_scale: float = param(2.0**24, low=1.0, doc="the first scale of loss_scale=dynamic")
    growth_interval: int = param(
        100, low=1, sweep="traced", doc="dynamic: double the scale after this many consecutive finite steps"
    )
    loss_weight: float = param(
        1.0, low=0.0, low_open=True, doc="the task loss is multiplied by this before differentiation (a small loss)"
    )

    def validate(self) -> None:
        super().validate()
        if self.telemetry != "loss":  # the gradients the chain sees are scaled: per-layer norms would be too
            raise ConfigError(
                f"mixed_precision records its own gradient statistics: telemetry must be loss, got {self.telemetry}",
                key="telemetry",
            )


# ----------------------------------------------------------------------------- the trial


def trial(cfg) -> Trial:
    """supervised_mlp differentiating loss_weight x loss x the step's loss scale (in the compute
    dtype, with probes for dL/dh) under precision.scaled_chain (the config's optax chain, `loss_scale`
    picking the scaling); records loss (unscaled, float32) and precision.step_stats."""
    spec = trials.mlp_spec(cfg)

    def tx(hp) -> optax.GradientTransformation:
        inner = transforms.build(cfg.optim, hp, cfg.steps)
        return precision.scaled_chain(
            inner, hp["loss_scale"], hp["static_scale"], hp["initial_scale"], hp["growth_interval"]
        )

    def step_metrics(view: trials.StepView) -> dict:
        return precision.step_stats(view.state.opt_state, view.state.params, view.grads, view.probe_grads, view.updates)

    def at_scale(scale: precision.LossScaleState, loss_weight) -> Trial:
        def loss_and_grad(params, batch, hyper, probes):
            del probes  # None with telemetry=loss: this experiment always reads dL/dh

            def loss_fn(params, probes):
                out, _ = models.apply(params, batch.x, spec, hyper, probes)
                loss = data.loss(cfg.data, out, batch.y)
                return precision.scale_loss(loss_weight * loss, scale), (loss, {})

            probes = models.zero_probes(spec, batch.x.shape[0], jnp.dtype(spec.dtype))
            (_, aux), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, probes)
            return aux, grads

        return trials.supervised_mlp(cfg, optimizer=tx, loss_and_grad=loss_and_grad, metrics=step_metrics)

    def step(hp, state):
        return at_scale(precision.chain_states(state.opt_state)[0].loss_scale, hp["loss_weight"]).step(hp, state)

    dims = {"grad_hist": ("log2_bin",), "act_grad_hist": ("log2_bin",)}
    dims |= {"half_gap_hist_fp16": ("ratio_bin",), "half_gap_hist_fp32": ("ratio_bin",)}
    return Trial(trials.supervised_mlp(cfg, optimizer=tx).init, step, dims)  # init differentiates nothing


def reference(cfg) -> dict:
    """float16's range as jnp.finfo gives it: (smallest subnormal, smallest normal, max, eps)."""
    del cfg
    return {"float16_range": np.asarray(precision.representable_range(jnp.float16))}


# ----------------------------------------------------------------------------- reading results


def lane(ds, dtype: str, mode: str):
    return ds.sel({"model.dtype": dtype, "loss_scale": mode})


def late_steps(ds) -> slice:
    """The last TAIL of the steps."""
    steps = ds.sizes["step"]
    return slice(steps - max(1, int(TAIL * steps)), steps)


def final_log_loss(ds, dtype: str, mode: str) -> np.ndarray:
    """log of the loss averaged over the last 5% of steps (NaN skipped), per seed."""
    loss = lane(ds, dtype, mode)["loss"]
    k = max(1, ds.sizes["step"] // 20)
    return np.log(loss.isel(step=slice(-k, None)).mean("step").transpose("seed").values.astype(float))


class DynamicRun(NamedTuple):
    """The fp16 run under dynamic scaling, over all seeds: its scale against the rule, and (last
    quarter) the update mass sum|u| that rounding loses."""

    scale_mismatch: int  # steps where the recorded scale differs from the rule replayed on the overflows
    halvings: int
    doublings: int
    nonfinite_steps: int
    skipped_moved: float  # the largest update mass on a non-finite step
    lost_fp16: float  # the share lost by weights kept in fp16
    closed_form_error: float  # its relative difference from the closed form
    lost_fp32: float  # the share lost by the fp32 master weights
    lost_fp32_bound: float  # 2^-24 sum|w| / sum|u|


class LossGaps(NamedTuple):
    """|log final loss - fp32's| of the fp16 runs, against fp32's own seed-to-seed range."""

    seed_range: float
    scaled: tuple  # (mode, max over seeds) for static, dynamic
    unscaled: float | None  # min over seeds, fp16 unscaled


class Measured(NamedTuple):
    float16_range: precision.FloatRange  # jnp.finfo's, stored at run time
    growth_interval: int
    dtypes: list
    modes: list
    dynamic: DynamicRun | None = None  # None where fp16 dynamic was not run
    zero_unscaled: float | None = None  # fp16 unscaled: zero weight-gradient entries, last quarter
    flush_fp32: float | None = None  # fp32 run: share of entries <= 2^-25, last quarter
    gaps: LossGaps | None = None  # where both fp32 and fp16 ran


def dynamic_run(ds, growth_interval: int) -> DynamicRun:
    run = lane(ds, "float16", "dynamic")
    scale = run["scale"].transpose("seed", "step").values.astype(float)
    bad = run["nonfinite"].transpose("seed", "step").values > 0
    mass = run["update_mass"].transpose("seed", "step").values.astype(float)
    mismatch, halvings, doublings = precision.audit_dynamic_scale(scale, bad, growth_interval)
    tail = run.isel(step=late_steps(ds))
    total = float(tail["update_mass"].sum())
    lost16, closed16 = float(tail["lost_mass_fp16"].sum()), float(tail["lost_mass_fp16_closed"].sum())
    # fp32 master weights: an entry is lost only if |u| <= gap/2 <= 2^-24 |w|, so per step the
    # lost mass is at most 2^-24 sum|w|.
    bound = float(np.finfo(np.float32).eps) / 2 * float(tail["param_l1"].sum())
    return DynamicRun(
        scale_mismatch=mismatch,
        halvings=halvings,
        doublings=doublings,
        nonfinite_steps=int(bad.sum()),
        skipped_moved=float(np.max(np.where(bad, mass, 0.0))),
        lost_fp16=lost16 / total,
        closed_form_error=abs(lost16 - closed16) / max(lost16, 1e-30),
        lost_fp32=float(tail["lost_mass_fp32"].sum()) / total,
        lost_fp32_bound=bound / total,
    )


def loss_gaps(ds, modes: list) -> LossGaps:
    ref = final_log_loss(ds, "float32", "none")
    # The precision changes the result less than the initial seed does: the fp32 runs' own
    # seed-to-seed range of log final loss (a per-seed difference below it is indistinguishable
    # from choosing another init).
    return LossGaps(
        float(np.ptp(ref)) if len(ref) > 1 else float("nan"),
        tuple(
            (mode, float(np.max(np.abs(final_log_loss(ds, "float16", mode) - ref))))
            for mode in ("static", "dynamic")
            if mode in modes
        ),
        float(np.min(np.abs(final_log_loss(ds, "float16", "none") - ref))) if "none" in modes else None,
    )


def measure(ds) -> Measured:
    cfg = results.run_config(ds)
    dtypes, modes = [str(d) for d in ds["model.dtype"].values], [str(m) for m in ds["loss_scale"].values]
    fp16 = precision.FloatRange(*(float(x) for x in analysis.reference(ds, "float16_range")))
    ran = lambda dtype, mode: dtype in dtypes and mode in modes
    late_mean = lambda dtype, var: float(lane(ds, dtype, "none")[var].isel(step=late_steps(ds)).mean())
    return Measured(
        fp16,
        int(cfg["growth_interval"]),
        dtypes,
        modes,
        dynamic_run(ds, cfg["growth_interval"]) if ran("float16", "dynamic") else None,
        late_mean("float16", "grad_zero") if ran("float16", "none") else None,
        late_mean("float32", "grad_flush") if ran("float32", "none") else None,
        loss_gaps(ds, modes) if "float32" in dtypes and ran("float16", "none") else None,
    )


def checks(m: Measured) -> list[Check]:
    fmt, fp16, d, gaps = precision.format_range(5, 10), m.float16_range, m.dynamic, m.gaps
    out = [
        Check.holds(
            "float16 smallest subnormal, jnp.finfo",
            fp16.smallest_subnormal,
            fp16.smallest_subnormal == fmt.smallest_subnormal == 2.0**-24,
            f"== 2^(1-15-10) = {fmt.smallest_subnormal:.6g} (5 exponent, 10 mantissa bits)",
        ),
        Check.holds(
            "float16 smallest normal, jnp.finfo",
            fp16.smallest_normal,
            fp16.smallest_normal == fmt.smallest_normal,
            f"== 2^(1-15) = {fmt.smallest_normal:.6g}",
        ),
        Check.holds(
            "float16 max, jnp.finfo", fp16.max, fp16.max == fmt.max == 65504.0, f"== (2 - 2^-10) 2^15 = {fmt.max:.0f}"
        ),
    ]
    if d is not None:
        name = "dynamic scale: steps where the recorded scale differs from the rule replayed on the recorded overflows"
        out.append(Check.at_most(name, d.scale_mismatch, 0))
        name = "dynamic scale: halvings (each on a non-finite step, which moved no weight)"
        halved = d.halvings >= 1 and d.halvings == d.nonfinite_steps and d.skipped_moved == 0.0
        why = f">= 1, one per non-finite step (update mass on those steps: {d.skipped_moved:g})"
        out.append(Check.holds(name, d.halvings, halved, why))
        out.append(Check.at_least(f"dynamic scale: doublings after {m.growth_interval} finite steps", d.doublings, 1))
    else:  # a sweep narrowed by the user (e.g. loss_scale=dynamic alone): say what is not checked
        out.append(Check.skip("dynamic scale and fp16-weight checks", "model.dtype float16 with loss_scale dynamic"))
    name = "fp16 unscaled: weight-gradient entries that are zero, last quarter"
    if m.zero_unscaled is not None:
        out.append(Check.at_least(name, m.zero_unscaled, MEASURABLE))
    else:
        out.append(Check.skip(name, "model.dtype float16 with loss_scale none"))
    if gaps is None:
        out.append(Check.skip("fp16 vs fp32 final loss gaps", "model.dtype float32 and float16 with loss_scale none"))
    else:
        why = "fp32's seed-to-seed range"
        for mode, gap in gaps.scaled:
            name = f"fp16 {mode} scaling: |log final loss - fp32's|, max over seeds"
            out.append(Check.at_most(name, gap, gaps.seed_range, why))
        if gaps.unscaled is not None:
            name = "fp16 unscaled: |log final loss - fp32's|, min over seeds"
            out.append(Check.above(name, gaps.unscaled, gaps.seed_range, why))
    if d is not None:
        out.append(Check.at_least("fp16 weights: update mass lost to rounding, last quarter", d.lost_fp16, MEASURABLE))
        name = "fp16 weights: lost mass vs closed form |u| < gap/2 (nextafter), rel. err"
        out.append(Check.at_most(name, d.closed_form_error, CLOSED_FORM_RTOL))
        name = "fp32 master weights: update mass lost, last quarter"
        out.append(Check.at_most(name, d.lost_fp32, d.lost_fp32_bound, "2^-24 sum|w| / sum|u|"))
    return out


def figures(ds, m: Measured) -> dict:
    """The figure (gradlab/experiments/_mixed_precision_figures.py)."""
    from gradlab.experiments import _mixed_precision_figures

    return _mixed_precision_figures.draw(ds, m)
