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

import warnings
from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradlab import (
    analysis,
    data,
    models,
    plotting,
    precision,
    results,
    transforms,
    trials,
)
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "mixed_precision"
CLAIM = ("fp16 gradients underflow without loss scaling; scaled fp16 tracks fp32; "
         "fp16 weights lose small updates that fp32 master weights keep")
MODES = ("none", "static", "dynamic")
AXES = ["model.dtype", "loss_scale", "seed"]
TAIL = 0.25  # "late training": the last quarter of the steps
MEASURABLE = 0.01  # a fraction of gradient entries or update mass we call measurable (1%)
CLOSED_FORM_RTOL = 1e-6  # measured and closed-form lost mass sum the same entries: float32 sums agree


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the loss scaling of each point."""

    loss_scale: str = param("dynamic", choices=MODES, sweep="choice",
                            doc="none | static (x static_scale) | dynamic (gradlab.precision.loss_scaling)")
    static_scale: float = param(1024.0, low=1.0, doc="the loss scale of loss_scale=static")
    initial_scale: float = param(2.0**24, low=1.0, doc="the first scale of loss_scale=dynamic")
    growth_interval: int = param(100, low=1, sweep="traced",
                                 doc="dynamic: double the scale after this many consecutive finite steps")
    loss_weight: float = param(1.0, low=0.0, low_open=True,
                               doc="the task loss is multiplied by this before differentiation (a small loss)")

    def validate(self) -> None:
        if self.telemetry != "loss":  # the gradients the chain sees are scaled: per-layer norms would be too
            raise ConfigError(f"mixed_precision records its own gradient statistics: telemetry must be loss, "
                              f"got {self.telemetry}", key="telemetry")


# ----------------------------------------------------------------------------- the trial


def optimizer(cfg, hp) -> optax.GradientTransformation:
    """The config's optax chain under loss scaling (`loss_scale`, traced, picks its numbers), then a
    float16 shadow of the weights given the same updates."""
    mode = hp["loss_scale"]
    dynamic = mode == MODES.index("dynamic")
    first = jnp.where(mode == MODES.index("none"), 1.0,
                      jnp.where(mode == MODES.index("static"), hp["static_scale"], hp["initial_scale"]))
    scaled = precision.loss_scaling(
        transforms.build(cfg.optim, hp, cfg.steps), initial_scale=first, growth_interval=hp["growth_interval"],
        growth_factor=jnp.where(dynamic, 2.0, 1.0), backoff_factor=jnp.where(dynamic, 0.5, 1.0),
        skip_nonfinite=dynamic,
    )
    return optax.chain(scaled, precision.shadow_weights(jnp.float16))


def step_metrics(view: trials.StepView) -> dict:
    """scale (the loss scale used), nonfinite (1 if the gradients were not finite), gradient_stats of
    the unscaled gradients and update_stats against the master and the float16 shadow weights."""
    loss_scaling, weights16 = view.state.opt_state
    grads, finite = precision.unscale(view.grads, loss_scaling.loss_scale)
    act_grads, _ = precision.unscale(view.probe_grads, loss_scaling.loss_scale)
    return {"scale": loss_scaling.loss_scale.scale, "nonfinite": (~finite).astype(jnp.float32),
            **precision.gradient_stats(grads, act_grads),
            **precision.update_stats(view.state.params, weights16, view.updates)}


def trial(cfg) -> Trial:
    """supervised_mlp differentiating loss_weight x loss x the step's loss scale (in the compute
    dtype, with probes for dL/dh); records loss (unscaled, float32) and step_metrics."""
    spec = trials.mlp_spec(cfg)

    def at_scale(scale: precision.LossScaleState | None, loss_weight) -> Trial:
        def loss_and_grad(params, batch, hyper, probes):
            del probes  # None with telemetry=loss: this experiment always reads dL/dh

            def loss_fn(params, probes):
                out, _ = models.apply(params, batch.x, spec, hyper, probes)
                loss = data.loss(cfg.data, out, batch.y)
                return precision.scale_loss(loss_weight * loss, scale), (loss, {})

            probes = models.zero_probes(spec, batch.x.shape[0], jnp.dtype(spec.dtype))
            (_, aux), grads = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(params, probes)
            return aux, grads

        return trials.supervised_mlp(cfg, optimizer=lambda hp: optimizer(cfg, hp), loss_and_grad=loss_and_grad,
                                     metrics=step_metrics)

    def step(hp, state):
        return at_scale(state.opt_state[0].loss_scale, hp["loss_weight"]).step(hp, state)

    dims = {"grad_hist": ("log2_bin",), "act_grad_hist": ("log2_bin",),
            "half_gap_hist_fp16": ("ratio_bin",), "half_gap_hist_fp32": ("ratio_bin",)}
    return Trial(at_scale(None, None).init, step, dims)  # init differentiates nothing


def reference(cfg) -> dict:
    """float16's range as jnp.finfo gives it: (smallest subnormal, smallest normal, max, eps)."""
    del cfg
    return {"float16_range": np.asarray(precision.representable_range(jnp.float16))}


# ----------------------------------------------------------------------------- reading results


def _lane(ds, dtype: str, mode: str):
    return ds.sel({"model.dtype": dtype, "loss_scale": mode})


def _tail(ds) -> slice:
    steps = ds.sizes["step"]
    return slice(steps - max(1, int(TAIL * steps)), steps)


def final_log_loss(ds, dtype: str, mode: str) -> np.ndarray:
    """log of the loss averaged over the last 5% of steps (NaN skipped), per seed."""
    lane = _lane(ds, dtype, mode)["loss"]
    k = max(1, ds.sizes["step"] // 20)
    return np.log(lane.isel(step=slice(-k, None)).mean("step").transpose("seed").values.astype(float))


def scale_events(scale: np.ndarray) -> tuple[int, int]:
    """(halvings, doublings) of a recorded scale trajectory."""
    ratio = scale[1:] / scale[:-1]
    return int(np.sum(ratio == 0.5)), int(np.sum(ratio == 2.0))


class Measured(NamedTuple):
    float16_range: precision.FloatRange  # jnp.finfo's, stored at run time
    growth_interval: int
    dtypes: list
    modes: list
    # fp16 dynamic: the recorded scale against the rule, over all seeds (None where not run)
    scale_mismatch: int | None = None  # steps where it differs from the rule replayed on the overflows
    halvings: int | None = None
    nonfinite_steps: int | None = None
    skipped_moved: float | None = None  # the largest update mass on a non-finite step
    doublings: int | None = None
    zero_unscaled: float | None = None  # fp16 unscaled: zero weight-gradient entries, last quarter
    flush_fp32: float | None = None  # fp32 run: share of entries <= 2^-25, last quarter
    seed_range: float | None = None  # fp32: seed-to-seed range of the log final loss
    scaled_gap: tuple = ()  # (mode, max over seeds |log final loss - fp32's|) for static, dynamic
    unscaled_gap: float | None = None  # min over seeds, fp16 unscaled
    lost_fp16: float | None = None  # fp16 dynamic, last quarter: update mass lost by fp16 weights
    closed_form_error: float | None = None  # its relative difference from the closed form
    lost_fp32: float | None = None  # ... by the fp32 master weights
    lost_fp32_bound: float | None = None  # 2^-24 sum|w| / sum|u|


def measure(ds) -> Measured:
    cfg = results.run_config(ds)
    dtypes, modes = [str(d) for d in ds["model.dtype"].values], [str(m) for m in ds["loss_scale"].values]
    m = {}
    late = _tail(ds)
    if "float16" in dtypes and "dynamic" in modes:
        lane = _lane(ds, "float16", "dynamic")
        scale = lane["scale"].transpose("seed", "step").values.astype(float)
        bad = lane["nonfinite"].transpose("seed", "step").values > 0
        mass = lane["update_mass"].transpose("seed", "step").values.astype(float)
        replayed = np.stack([precision.replay_dynamic_scale(s[0], b, cfg["growth_interval"])
                             for s, b in zip(scale, bad)])
        halvings, doublings = (sum(e) for e in zip(*(scale_events(s) for s in scale)))
        m.update(scale_mismatch=int(np.sum(replayed != scale)), halvings=halvings, doublings=doublings,
                 nonfinite_steps=int(bad.sum()), skipped_moved=float(np.max(np.where(bad, mass, 0.0))))
        tail = lane.isel(step=late)
        mass = float(tail["update_mass"].sum())
        lost16, closed16 = float(tail["lost_mass_fp16"].sum()), float(tail["lost_mass_fp16_closed"].sum())
        # fp32 master weights: an entry is lost only if |u| <= gap/2 <= 2^-24 |w|, so per step the
        # lost mass is at most 2^-24 sum|w|.
        bound = float(np.finfo(np.float32).eps) / 2 * float(tail["param_l1"].sum())
        m.update(lost_fp16=lost16 / mass, closed_form_error=abs(lost16 - closed16) / max(lost16, 1e-30),
                 lost_fp32=float(tail["lost_mass_fp32"].sum()) / mass, lost_fp32_bound=bound / mass)
    if "float16" in dtypes and "none" in modes:
        m["zero_unscaled"] = float(_lane(ds, "float16", "none")["grad_zero"].isel(step=late).mean())
    if "float32" in dtypes and "none" in modes:
        m["flush_fp32"] = float(_lane(ds, "float32", "none")["grad_flush"].isel(step=late).mean())
    if "float32" in dtypes and "float16" in dtypes:
        ref = final_log_loss(ds, "float32", "none")
        # The precision changes the result less than the initial seed does: the fp32 runs' own
        # seed-to-seed range of log final loss (a per-seed difference below it is indistinguishable
        # from choosing another init).
        m["seed_range"] = float(np.ptp(ref)) if len(ref) > 1 else float("nan")
        m["scaled_gap"] = tuple((mode, float(np.max(np.abs(final_log_loss(ds, "float16", mode) - ref))))
                                for mode in ("static", "dynamic") if mode in modes)
        if "none" in modes:
            m["unscaled_gap"] = float(np.min(np.abs(final_log_loss(ds, "float16", "none") - ref)))
    fp16 = precision.FloatRange(*(float(x) for x in analysis.reference(ds, "float16_range")))
    return Measured(fp16, int(cfg["growth_interval"]), dtypes, modes, **m)


def checks(m: Measured) -> list[Check]:
    fmt, fp16 = precision.format_range(5, 10), m.float16_range
    out = [
        Check.holds("float16 smallest subnormal, jnp.finfo", fp16.smallest_subnormal,
                    fp16.smallest_subnormal == fmt.smallest_subnormal == 2.0**-24,
                    f"== 2^(1-15-10) = {fmt.smallest_subnormal:.6g} (5 exponent, 10 mantissa bits)"),
        Check.holds("float16 smallest normal, jnp.finfo", fp16.smallest_normal,
                    fp16.smallest_normal == fmt.smallest_normal, f"== 2^(1-15) = {fmt.smallest_normal:.6g}"),
        Check.holds("float16 max, jnp.finfo", fp16.max, fp16.max == fmt.max == 65504.0,
                    f"== (2 - 2^-10) 2^15 = {fmt.max:.0f}"),
    ]
    if m.halvings is not None:
        out.append(Check.at_most("dynamic scale: steps where the recorded scale differs from the rule replayed on "
                                 "the recorded overflows", m.scale_mismatch, 0))
        out.append(Check.holds("dynamic scale: halvings (each on a non-finite step, which moved no weight)",
                               m.halvings, m.halvings >= 1 and m.halvings == m.nonfinite_steps
                               and m.skipped_moved == 0.0,
                               f">= 1, one per non-finite step (update mass on those steps: {m.skipped_moved:g})"))
        out.append(Check.at_least(f"dynamic scale: doublings after {m.growth_interval} finite steps",
                                  m.doublings, 1))
    if m.zero_unscaled is not None:
        out.append(Check.at_least("fp16 unscaled: weight-gradient entries that are zero, last quarter",
                                  m.zero_unscaled, MEASURABLE))
    for mode, gap in m.scaled_gap:
        out.append(Check.at_most(f"fp16 {mode} scaling: |log final loss - fp32's|, max over seeds", gap,
                                 m.seed_range, "fp32's seed-to-seed range"))
    if m.unscaled_gap is not None:
        out.append(Check.above("fp16 unscaled: |log final loss - fp32's|, min over seeds", m.unscaled_gap,
                               m.seed_range, "fp32's seed-to-seed range"))
    if m.lost_fp16 is not None:
        out.append(Check.at_least("fp16 weights: update mass lost to rounding, last quarter", m.lost_fp16,
                                  MEASURABLE))
        out.append(Check.at_most("fp16 weights: lost mass vs closed form |u| < gap/2 (nextafter), rel. err",
                                 m.closed_form_error, CLOSED_FORM_RTOL))
        out.append(Check.at_most("fp32 master weights: update mass lost, last quarter", m.lost_fp32,
                                 m.lost_fp32_bound, "2^-24 sum|w| / sum|u|"))
    return out


# ----------------------------------------------------------------------------- figure

LANES = [("float32", "none", "fp32"), ("bfloat16", "none", "bf16"), ("float16", "none", "fp16, no scaling"),
         ("float16", "static", "fp16, static scale"), ("float16", "dynamic", "fp16, dynamic scale")]


def _pow2(x: float) -> str:
    return f"2^{np.log2(x):.0f}" if x > 0 and float(np.log2(x)).is_integer() else f"{x:g}"


def _stairs(ax, bins: np.ndarray, share, shift=0.0, **kw):
    """A histogram over left-edge `bins` of unit width, in percent."""
    ax.stairs(100 * share, np.append(bins, bins[-1] + 1).astype(float) + shift, **kw)


def _range_panel(ax, ds, m: Measured, late, static_scale: float):
    """Histogram of log2|g| of the fp32 run over late training, against float16's range."""
    lane = _lane(ds, "float32", "none").isel(step=late)
    lo_sub, lo_norm, hi = np.log2(m.float16_range[:3])
    ax.axvspan(precision.GRAD_BINS[0], lo_sub - 1, color="#d1495b", alpha=0.12, lw=0)
    ax.axvspan(lo_sub - 1, lo_norm, color="#edae49", alpha=0.18, lw=0)
    ax.axvspan(hi, precision.GRAD_BINS[-1] + 1, color="0.5", alpha=0.15, lw=0)
    share = {name: lane[name].mean(("step", "seed")).values.astype(float) for name in ("grad_hist", "act_grad_hist")}
    _stairs(ax, precision.GRAD_BINS, share["grad_hist"], color=plotting.COLORS[0], fill=True, alpha=0.55, lw=1.3, label="weight grads")
    _stairs(ax, precision.GRAD_BINS, share["act_grad_hist"], color=plotting.COLORS[5], lw=1.3, label="activation grads dL/dh")
    _stairs(ax, precision.GRAD_BINS, share["grad_hist"], np.log2(static_scale), color=plotting.COLORS[0], ls="--", lw=1.0,
            label=f"weight grads x {_pow2(static_scale)} (static scale)")
    ax.set_ylim(0, 1.75 * ax.get_ylim()[1])
    for x in (lo_sub, lo_norm, hi):
        ax.axvline(x, color="k", lw=0.8, ls=":")
    marks = ax.secondary_xaxis("top")
    marks.set_xticks([lo_sub, lo_norm, hi], ["subnormal\n2^-24", "normal\n2^-14", "max\n65504"], fontsize=6.5)
    marks.tick_params(length=2, pad=1)
    ax.set_xlim(-48, 18)
    w_sub, a_flush = float(lane["grad_subnormal"].mean()), float(lane["act_grad_flush"].mean())
    plotting.note(ax, f"in fp16 (|g| <= 2^-25 -> 0):\nweights: {100 * m.flush_fp32:.1f}% flush to 0,\n"
                      f"{100 * w_sub:.1f}% subnormal\nactivations: {100 * a_flush:.1f}% flush to 0", loc="upper right")
    ax.set(xlabel="log2 |gradient|  (fp32 run, last quarter of training)", ylabel="% of entries",
           title="fp32 run's gradients vs float16's range")
    ax.legend(loc="upper left", fontsize=6.5, frameon=False)


def _series(lane, var: str) -> np.ndarray:
    return lane[var].transpose("seed", "step").values


def figures(ds, m: Measured) -> dict:
    cfg = results.run_config(ds)
    lanes = [lane for lane in LANES if lane[0] in m.dtypes and lane[1] in m.modes]
    late, steps = _tail(ds), ds["step"].values
    dynamic = "float16" in m.dtypes and "dynamic" in m.modes
    fig, axes = plotting.figure(2, 3, width=4.3, height=3.2)
    if m.flush_fp32 is not None:
        _range_panel(axes[0, 0], ds, m, late, cfg["static_scale"])

    ax = axes[0, 1]
    for i, (dtype, mode, label) in enumerate(lanes):
        plotting.band(ax, steps, _series(_lane(ds, dtype, mode), "loss"), label, color=plotting.COLORS[i], log=True)
    ax.set(yscale="log", xlabel="step", ylabel="training loss (median, min-max over seeds)",
           title=f"training loss (x {_pow2(cfg['loss_weight'])} in the gradient)")
    ax.legend(loc="lower left", fontsize=6.5, frameon=False)
    text = [f"fp16 {mode} scaling: {gap:.2g} (<= {m.seed_range:.3g})" for mode, gap in m.scaled_gap]
    if m.unscaled_gap is not None:
        text.append(f"fp16 unscaled: {m.unscaled_gap:.2g} (> {m.seed_range:.3g})")
    if text:
        plotting.note(ax, "|Δ log final loss| vs fp32\n" + "\n".join(text), loc="upper right")

    ax = axes[0, 2]
    if "float16" in m.dtypes:
        for i, (dtype, mode, label) in enumerate(lanes):
            if dtype == "float16":
                zero = _series(_lane(ds, dtype, mode), "grad_zero")
                ax.plot(steps, 100 * np.median(zero, axis=0), color=plotting.COLORS[i], label=f"{label}: zero")
        if "float32" in m.dtypes:
            flush = _series(_lane(ds, "float32", "none"), "grad_flush")
            ax.plot(steps, 100 * np.median(flush, axis=0), color=plotting.COLORS[0], ls="--",
                    label="fp32 run: |g| <= 2^-25 (would flush)")
        ax.set(xlabel="step", ylabel="% of weight-gradient entries", title="gradients lost to float16 underflow")
        ax.legend(loc="center right", fontsize=6.5, frameon=False)

    if dynamic:
        ax = axes[1, 0]
        lane = _lane(ds, "float16", "dynamic").isel(seed=0)
        scale, bad = lane["scale"].values.astype(float), lane["nonfinite"].values > 0
        ax.step(steps, np.log2(scale), where="post", color=plotting.COLORS[4], label="loss scale (log2)")
        ax.plot(steps[bad], np.log2(scale[bad]), "x", color=plotting.COLORS[1], ms=6, mew=1.5,
                label="non-finite gradients: step skipped")
        ax.set(xlabel="step", ylabel="log2 loss scale", title=f"dynamic loss scaling (fp16, seed {int(lane['seed'])})")
        ax.legend(loc="lower right", fontsize=6.5, frameon=False)
        plotting.note(ax, f"all seeds: {m.halvings} halvings (= skipped steps),\n"
                          f"{m.doublings} doublings after {m.growth_interval} finite steps;\n"
                          f"steps off the replayed rule: {m.scale_mismatch}", loc="upper right")

        ax = axes[1, 1]
        lane = _lane(ds, "float16", "dynamic")
        mass = lane["update_mass"].where(lane["update_mass"] > 0)  # skipped steps moved nothing
        for name, color, label in (("fp16", plotting.COLORS[1], "weights kept in fp16"),
                                   ("fp32", plotting.COLORS[0], "fp32 master weights")):
            with warnings.catch_warnings():  # steps every seed skipped have no update to lose
                warnings.simplefilter("ignore", RuntimeWarning)
                frac, closed = (np.nanmedian((lane[f"lost_mass_{name}{kind}"] / mass).transpose("seed", "step").values,
                                             axis=0) for kind in ("", "_closed"))
            ax.plot(steps, 100 * frac, color=color, label=f"{label}: w + u == w")
            every = max(1, len(steps) // 25)
            ax.plot(steps[::every], 100 * closed[::every], "o", color=color, ms=3, mfc="none",
                    label=f"{label}: closed form |u| < gap/2")
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set(xlabel="step", ylabel="% of update mass Σ|u| lost", title="updates lost to rounding (fp16 dynamic run)")
        ax.legend(loc="center left", bbox_to_anchor=(0.25, 0.45), fontsize=6.5, frameon=False)
        plotting.note(ax, f"last quarter: fp16 weights lose {100 * m.lost_fp16:.1f}%,\n"
                          f"master weights {100 * m.lost_fp32:.2g}% ({m.lost_fp32_bound:.2g} bound)", loc="upper left")

        ax = axes[1, 2]
        lane = _lane(ds, "float16", "dynamic").isel(step=late)
        ax.axvspan(precision.HALF_GAP_BINS[0], 0, color="#d1495b", alpha=0.12, lw=0)
        for name, color, label in (("fp16", plotting.COLORS[1], "fp16 weights"),
                                   ("fp32", plotting.COLORS[0], "fp32 weights")):
            counts = lane[f"half_gap_hist_{name}"].sum(("step", "seed")).values.astype(float)
            _stairs(ax, precision.HALF_GAP_BINS, counts / max(counts.sum(), 1), color=color, lw=1.3, fill=name == "fp16",
                    alpha=0.5 if name == "fp16" else 1.0, label=label)
        ax.text(precision.HALF_GAP_BINS[0] + 0.5, 0.9, "lost:\n|u| < gap/2", transform=ax.get_xaxis_transform(), fontsize=7,
                color="#d1495b", va="top")
        ax.set(xlabel="log2( |u| / (half the gap to w's neighbour) )", ylabel="% of updates (last quarter)",
               title="update size vs the weight's spacing")
        ax.legend(loc="upper center", fontsize=6.5, frameon=False)
    fig.suptitle(f"Mixed precision: depth-{cfg['model']['depth']} tanh MLP, {cfg['data']['task']}, "
                 f"{cfg['optim']['name']}, {cfg['steps']} full-batch steps, {ds.sizes['seed']} seeds", fontsize=10)
    return {"": fig}
