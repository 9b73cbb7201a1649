"""C3: float32, bfloat16 and float16 training; loss scaling; fp32 master weights.

Float16 has 5 exponent and 10 mantissa bits: bias b = 2^4 - 1 = 15, smallest normal 2^(1-b) =
2^-14, smallest subnormal 2^(1-b-10) = 2^-24, largest (2 - 2^-10) 2^15 = 65504; all read from
jnp.finfo here, never typed in. A gradient entry at most half the smallest subnormal (2^-25)
rounds to zero in float16; one in (2^-25, 2^-14) survives as a subnormal with fewer mantissa
bits. bfloat16 keeps float32's 8 exponent bits, so its range is float32's.

The model (gradlab.models.apply) computes in model.dtype from float32 parameters (master weights),
so the backward pass runs in the compute dtype and its float16 cotangents underflow. Each point
trains one deep tanh MLP, full batch, on a small loss (loss_weight x the task loss is what is
differentiated: 2^-10 in the config, so late in training most float16 gradients underflow; in
float32 a power of 2 changes nothing but the effective learning rate), with `loss_scale`:
  none     the float16 gradients as they come
  static   loss x static_scale before differentiation, gradients / static_scale after (float32)
  dynamic  gradlab.loss_scaling: the scale halves on a non-finite step (which is skipped) and
           doubles after growth_interval finite steps (Micikevicius et al. 2018, Sec. 3.2)
Every lane also records, from its gradients (unscaled, float32): the log2 histogram of the weight
and activation gradients, which fraction flushes to zero or lands subnormal in float16; and from
its updates u, what happens to them when added to the float32 master weights and to a shadow copy
of the weights kept in float16 that receives the same updates: an update is lost when w + u == w,
which (round to nearest, ties to even) is when |u| < half the gap from w to its float16 neighbour
in u's direction, or equal to it and w's last mantissa bit is 0 (`update_lost`).

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

from gradlab import data, loss_scaling, models, plotting, results, transforms, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.experiments import Check

NAME = "mixed_precision"
CLAIM = ("fp16 gradients underflow without loss scaling; scaled fp16 tracks fp32; "
         "fp16 weights lose small updates that fp32 master weights keep")
MODES = ("none", "static", "dynamic")
AXES = ["model.dtype", "loss_scale", "seed"]
HIST_BINS = np.arange(-60, 17)  # left edges of the log2|g| bins (floor(log2|g|)); the end bins take the rest
RATIO_BINS = np.arange(-16, 17)  # left edges of the log2(|u| / half gap) bins


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the loss scaling of each point."""

    loss_scale: str = param("dynamic", choices=MODES, sweep="choice",
                            doc="none | static (x static_scale) | dynamic (gradlab.loss_scaling)")
    static_scale: float = param(1024.0, low=1.0, doc="the loss scale of loss_scale=static")
    initial_scale: float = param(2.0**24, low=1.0, doc="the first scale of loss_scale=dynamic")
    growth_interval: int = param(100, low=1, sweep="traced",
                                 doc="dynamic: double the scale after this many consecutive finite steps")
    loss_weight: float = param(1.0, low=0.0, low_open=True,
                               doc="the task loss is multiplied by this before differentiation (a small loss)")


# ----------------------------------------------------------------------------- number formats


class FloatRange(NamedTuple):
    """What a binary floating-point format represents (positive side)."""

    smallest_subnormal: float
    smallest_normal: float
    max: float
    eps: float  # the gap between 1 and the next number


def representable_range(dtype) -> FloatRange:
    """The range of a dtype, from jnp.finfo."""
    info = jnp.finfo(dtype)
    return FloatRange(float(info.smallest_subnormal), float(info.smallest_normal), float(info.max), float(info.eps))


def format_range(exponent_bits: int, mantissa_bits: int) -> FloatRange:
    """The range an IEEE-754-style format has by construction: bias b = 2^(e-1) - 1, smallest
    normal 2^(1-b), smallest subnormal 2^(1-b-m), largest (2 - 2^-m) 2^b, eps 2^-m."""
    bias = 2 ** (exponent_bits - 1) - 1
    return FloatRange(2.0 ** (1 - bias - mantissa_bits), 2.0 ** (1 - bias), (2.0 - 2.0**-mantissa_bits) * 2.0**bias,
                      2.0**-mantissa_bits)


def flushes_to_zero(g, dtype=jnp.float16) -> jax.Array:
    """Non-zero entries that round to zero in `dtype`: |g| <= half its smallest subnormal (the tie
    goes to the even neighbour, 0)."""
    half = jnp.finfo(dtype).smallest_subnormal.astype(jnp.float32) / 2
    a = jnp.abs(g.astype(jnp.float32))
    return (a > 0) & (a <= half)


def lands_subnormal(g, dtype=jnp.float16) -> jax.Array:
    """Entries that round to a non-zero subnormal of `dtype`: half the smallest subnormal < |g| <
    smallest normal - half the smallest subnormal (the upper tie rounds up to the even normal)."""
    info = jnp.finfo(dtype)
    half = info.smallest_subnormal.astype(jnp.float32) / 2
    a = jnp.abs(g.astype(jnp.float32))
    return (a > half) & (a < info.smallest_normal.astype(jnp.float32) - half)


def _mantissa_even(w) -> jax.Array:
    bits = {2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint64}[w.dtype.itemsize]
    return (jax.lax.bitcast_convert_type(w, bits) & 1) == 0


def rounding_gap(w, u) -> jax.Array:
    """|nextafter(w, w + u) - w| in float32: the spacing of w's format next to w in u's direction."""
    toward = jnp.where(u >= 0, jnp.inf, -jnp.inf).astype(w.dtype)
    return jnp.abs(jnp.nextafter(w, toward).astype(jnp.float32) - w.astype(jnp.float32))


def update_lost(w, u, gap=None) -> jax.Array:
    """Whether w + u == w in w's dtype (u already in it), from the spacing of the format alone:
    round to nearest loses u when |u| is below half the gap to w's neighbour in u's direction,
    and at exactly half when w is the even neighbour."""
    gap = rounding_gap(w, u) if gap is None else gap
    a = jnp.abs(u.astype(jnp.float32))
    return (a < gap / 2) | ((a == gap / 2) & _mantissa_even(w))


def log2_histogram(x, edges: np.ndarray, where) -> jax.Array:
    """Counts of floor(log2|x|) at each left edge over the entries `where` is True; the first and
    last bins take everything beyond them."""
    safe = jnp.where(where, jnp.abs(x.astype(jnp.float32)), 1.0)
    index = jnp.clip(jnp.floor(jnp.log2(safe)).astype(jnp.int32) - int(edges[0]), 0, len(edges) - 1)
    return jnp.zeros(len(edges), jnp.float32).at[index.ravel()].add(where.ravel().astype(jnp.float32))


# ----------------------------------------------------------------------------- the trial


class State(NamedTuple):
    train: trials.TrainState
    weights16: dict  # a copy of the parameters kept in float16, given the same updates


def optimizer(cfg, hp) -> optax.GradientTransformation:
    """The config's optax chain under loss_scaling; `loss_scale` (traced) picks its numbers."""
    mode = hp["loss_scale"]
    dynamic = mode == MODES.index("dynamic")
    first = jnp.where(mode == MODES.index("none"), 1.0,
                      jnp.where(mode == MODES.index("static"), hp["static_scale"], hp["initial_scale"]))
    return loss_scaling.loss_scaling(
        transforms.build(cfg.optim, hp, cfg.steps), initial_scale=first, growth_interval=hp["growth_interval"],
        growth_factor=jnp.where(dynamic, 2.0, 1.0), backoff_factor=jnp.where(dynamic, 0.5, 1.0),
        skip_nonfinite=dynamic,
    )


def _cat(tree) -> jax.Array:
    return jnp.concatenate([x.ravel() for x in jax.tree.leaves(tree)])


def update_stats(w32: dict, w16: dict, updates: dict) -> dict:
    """What adding `updates` loses on float32 and on float16 weights, measured and in closed form."""
    w32, w16, u = _cat(w32), _cat(w16), _cat(updates)
    u16 = u.astype(jnp.float16)
    moved = u != 0
    mass = jnp.abs(u)
    gap32, gap16 = rounding_gap(w32, u), rounding_gap(w16, u16)
    lost32 = moved & (w32 + u == w32)
    lost16 = moved & (w16 + u16 == w16)
    return {
        "update_mass": jnp.sum(mass),
        "lost_mass_fp32": jnp.sum(jnp.where(lost32, mass, 0.0)),
        "lost_mass_fp32_closed": jnp.sum(jnp.where(moved & update_lost(w32, u, gap32), mass, 0.0)),
        "lost_mass_fp16": jnp.sum(jnp.where(lost16, mass, 0.0)),
        "lost_mass_fp16_closed": jnp.sum(jnp.where(moved & update_lost(w16, u16, gap16), mass, 0.0)),
        "param_l1": jnp.sum(jnp.abs(w32)),
        # |u| / (gap / 2), u taken in float32 for both: below 1 an update is lost.
        "half_gap_hist_fp16": log2_histogram(2 * mass / gap16, RATIO_BINS, moved),
        "half_gap_hist_fp32": log2_histogram(2 * mass / gap32, RATIO_BINS, moved),
    }


def gradient_stats(grads: dict, act_grads: dict) -> dict:
    """Zero / flush-to-zero / subnormal fractions (for float16) and log2 histograms of the
    float32 weight gradients and activation gradients dL/dh."""
    out = {}
    for name, tree in (("grad", grads), ("act_grad", act_grads)):
        g = _cat(tree)
        finite = jnp.isfinite(g)
        n = g.size
        out[f"{name}_zero"] = jnp.sum(g == 0) / n
        out[f"{name}_flush"] = jnp.sum(flushes_to_zero(g) & finite) / n
        out[f"{name}_subnormal"] = jnp.sum(lands_subnormal(g) & finite) / n
        out[f"{name}_hist"] = log2_histogram(g, HIST_BINS, finite & (g != 0)) / n
    return out


def trial(cfg) -> Trial:
    """Train with loss scaling; every step records, before its update: loss (unscaled, float32),
    scale (the loss scale used), nonfinite (1 if its gradients were not finite), gradient_stats
    and update_stats."""
    spec = trials.mlp_spec(cfg)
    compute = jnp.dtype(spec.dtype)

    def init(hp, key):
        k_params, k_batches = jax.random.split(key)
        params = models.init(k_params, spec, models.MLPHyper.from_hp(hp))
        train = trials.TrainState(params, optimizer(cfg, hp).init(params), data.make(cfg.data), jnp.int32(0), k_batches)
        return State(train, jax.tree.map(lambda p: p.astype(jnp.float16), params))

    def step(hp, state):
        hyper = models.MLPHyper.from_hp(hp)
        train = state.train
        batch = data.batch(train.data, cfg.data, train.step, train.key)
        scale = train.opt_state.loss_scale

        def loss_fn(params, probes):
            out, _ = models.apply(params, batch.x, spec, hyper, probes)
            loss = data.loss(cfg.data, out, batch.y)
            return loss_scaling.scale_loss(hp["loss_weight"] * loss, scale), loss

        probes = models.zero_probes(spec, batch.x.shape[0], compute)
        (_, loss), (grads_s, probes_s) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(train.params, probes)
        updates, opt_state = optimizer(cfg, hp).update(grads_s, train.opt_state, train.params)
        grads, finite = loss_scaling.unscale(grads_s, scale)
        act_grads, _ = loss_scaling.unscale(probes_s, scale)
        params = optax.apply_updates(train.params, updates)
        weights16 = jax.tree.map(lambda w, u: w + u.astype(jnp.float16), state.weights16, updates)
        metrics = {
            "loss": loss,
            "scale": scale.scale,
            "nonfinite": (~finite).astype(jnp.float32),
            **gradient_stats(grads, act_grads),
            **update_stats(train.params, state.weights16, updates),
        }
        new = State(trials.TrainState(params, opt_state, train.data, train.step + 1, train.key), weights16)
        return new, metrics

    dims = {"grad_hist": ("log2_bin",), "act_grad_hist": ("log2_bin",),
            "half_gap_hist_fp16": ("ratio_bin",), "half_gap_hist_fp32": ("ratio_bin",)}
    return Trial(init, step, dims)



# ----------------------------------------------------------------------------- reading results

TAIL = 0.25  # "late training": the last quarter of the steps
MEASURABLE = 0.01  # a fraction of gradient entries or update mass we call measurable (1%)
CLOSED_FORM_RTOL = 1e-6  # measured and closed-form lost mass sum the same entries: float32 sums agree


def _lane(ds, dtype: str, mode: str):
    return ds.sel({"model.dtype": dtype, "loss_scale": mode})


def _tail(ds) -> slice:
    steps = ds.sizes["step"]
    return slice(steps - max(1, int(TAIL * steps)), steps)


def final_log_loss(ds, dtype: str, mode: str) -> np.ndarray:
    """log of the loss averaged over the last 5% of steps, per seed."""
    lane = _lane(ds, dtype, mode)["loss"]
    k = max(1, ds.sizes["step"] // 20)
    return np.log(lane.isel(step=slice(-k, None)).mean("step").transpose("seed").values.astype(float))


def replay_dynamic_scale(first: float, nonfinite: np.ndarray, growth_interval: int) -> np.ndarray:
    """The scale before each step, replayed in plain Python from which steps were not finite:
    halve on a non-finite step (not below 1), double after growth_interval finite steps in a row."""
    scale, good, out = float(first), 0, []
    for bad in nonfinite:
        out.append(scale)
        if bad:
            scale, good = max(scale / 2, 1.0), 0
        else:
            good += 1
            if good == growth_interval:
                scale, good = scale * 2, 0
    return np.asarray(out)


def scale_events(scale: np.ndarray) -> tuple[int, int]:
    """(halvings, doublings) of a recorded scale trajectory."""
    ratio = scale[1:] / scale[:-1]
    return int(np.sum(ratio == 0.5)), int(np.sum(ratio == 2.0))


def float16_checks() -> list[Check]:
    info, fmt = representable_range(jnp.float16), format_range(5, 10)
    return [
        Check("float16 smallest subnormal, jnp.finfo", info.smallest_subnormal,
              f"== 2^(1-15-10) = {fmt.smallest_subnormal:.6g} (5 exponent, 10 mantissa bits)",
              info.smallest_subnormal == fmt.smallest_subnormal == 2.0**-24),
        Check("float16 smallest normal, jnp.finfo", info.smallest_normal,
              f"== 2^(1-15) = {fmt.smallest_normal:.6g}", info.smallest_normal == fmt.smallest_normal),
        Check("float16 max, jnp.finfo", info.max, f"== (2 - 2^-10) 2^15 = {fmt.max:.0f}",
              info.max == fmt.max == 65504.0),
    ]


def checks(ds) -> list[Check]:
    ds = results.with_axes(ds, AXES)
    cfg = results.config_of(ds)["config"]
    dtypes, modes = [str(d) for d in ds["model.dtype"].values], [str(m) for m in ds["loss_scale"].values]
    out = float16_checks()
    late = _tail(ds)
    if "float16" in dtypes and "dynamic" in modes:
        lane = _lane(ds, "float16", "dynamic")
        scale = lane["scale"].transpose("seed", "step").values.astype(float)
        bad = lane["nonfinite"].transpose("seed", "step").values > 0
        mass = lane["update_mass"].transpose("seed", "step").values.astype(float)
        replayed = np.stack([replay_dynamic_scale(s[0], b, cfg["growth_interval"]) for s, b in zip(scale, bad)])
        mismatch = int(np.sum(replayed != scale))
        halvings, doublings = (sum(e) for e in zip(*(scale_events(s) for s in scale)))
        out.append(Check("dynamic scale: steps where the recorded scale differs from the rule replayed on the "
                         "recorded overflows", mismatch, "== 0", mismatch == 0))
        skipped_moved = float(np.max(np.where(bad, mass, 0.0)))
        out.append(Check("dynamic scale: halvings (each on a non-finite step, which moved no weight)", halvings,
                         f">= 1 (update mass on those steps: {skipped_moved:g})",
                         halvings >= 1 and halvings == int(bad.sum()) and skipped_moved == 0.0))
        out.append(Check(f"dynamic scale: doublings after {cfg['growth_interval']} finite steps", doublings, ">= 1",
                         doublings >= 1))
    if "float16" in dtypes and "none" in modes:
        zero = float(_lane(ds, "float16", "none")["grad_zero"].isel(step=late).mean())
        predicted = (float(_lane(ds, "float32", "none")["grad_flush"].isel(step=late).mean())
                     if "float32" in dtypes else float("nan"))
        out.append(Check("fp16 unscaled: weight-gradient entries that are zero, last quarter", zero,
                         f">= {MEASURABLE:g} (fp32 run: {predicted:.3g} of its entries <= 2^-25)", zero >= MEASURABLE))
    if "float32" in dtypes and "float16" in dtypes:
        ref = final_log_loss(ds, "float32", "none")
        # The precision changes the result less than the initial seed does: the fp32 runs' own
        # seed-to-seed range of log final loss (a per-seed difference below it is indistinguishable
        # from choosing another init).
        tol = float(np.ptp(ref)) if len(ref) > 1 else float("nan")
        for mode in ("static", "dynamic"):
            if mode in modes:
                dev = float(np.max(np.abs(final_log_loss(ds, "float16", mode) - ref)))
                out.append(Check(f"fp16 {mode} scaling: |log final loss - fp32's|, max over seeds", dev,
                                 f"<= {tol:.3g} (fp32's seed-to-seed range)", dev <= tol))
        if "none" in modes:
            dev = float(np.min(np.abs(final_log_loss(ds, "float16", "none") - ref)))
            out.append(Check("fp16 unscaled: |log final loss - fp32's|, min over seeds", dev,
                             f"> {tol:.3g} (fp32's seed-to-seed range)", dev > tol))
    if "float16" in dtypes and "dynamic" in modes:
        lane = _lane(ds, "float16", "dynamic").isel(step=late)
        mass = float(lane["update_mass"].sum())
        lost16, closed16 = float(lane["lost_mass_fp16"].sum()), float(lane["lost_mass_fp16_closed"].sum())
        lost32 = float(lane["lost_mass_fp32"].sum())
        err = abs(lost16 - closed16) / max(lost16, 1e-30)
        out.append(Check("fp16 weights: update mass lost to rounding, last quarter", lost16 / mass,
                         f">= {MEASURABLE:g}", lost16 / mass >= MEASURABLE))
        out.append(Check("fp16 weights: lost mass vs closed form |u| < gap/2 (nextafter), rel. err", err,
                         f"<= {CLOSED_FORM_RTOL:g}", err <= CLOSED_FORM_RTOL))
        # fp32 master weights: an entry is lost only if |u| <= gap/2 <= 2^-24 |w|, so per step the lost
        # mass is at most 2^-24 sum|w|.
        bound = float(jnp.finfo(jnp.float32).eps) / 2 * float(lane["param_l1"].sum())
        out.append(Check("fp32 master weights: update mass lost, last quarter", lost32 / mass,
                         f"<= 2^-24 sum|w| / sum|u| = {bound / mass:.2g}", lost32 <= bound))
    return out


# ----------------------------------------------------------------------------- figure

LANES = [("float32", "none", "fp32"), ("bfloat16", "none", "bf16"), ("float16", "none", "fp16, no scaling"),
         ("float16", "static", "fp16, static scale"), ("float16", "dynamic", "fp16, dynamic scale")]


def _pow2(x: float) -> str:
    return f"2^{np.log2(x):.0f}" if x > 0 and float(np.log2(x)).is_integer() else f"{x:g}"


def _range_panel(ax, ds, late, static_scale: float):
    """Histogram of log2|g| of the fp32 run over late training, against float16's range."""
    fp16 = representable_range(jnp.float16)
    lane = _lane(ds, "float32", "none").isel(step=late)
    left = HIST_BINS.astype(float)
    lo_sub, lo_norm, hi = np.log2(fp16.smallest_subnormal), np.log2(fp16.smallest_normal), np.log2(fp16.max)
    ax.axvspan(left[0], lo_sub - 1, color="#d1495b", alpha=0.12, lw=0)
    ax.axvspan(lo_sub - 1, lo_norm, color="#edae49", alpha=0.18, lw=0)
    ax.axvspan(hi, left[-1] + 1, color="0.5", alpha=0.15, lw=0)
    for name, color, label in (("grad_hist", plotting.COLORS[0], "weight grads"),
                               ("act_grad_hist", plotting.COLORS[5], "activation grads dL/dh")):
        share = lane[name].mean(("step", "seed")).values.astype(float)
        ax.stairs(100 * share, np.append(left, left[-1] + 1), color=color, fill=name == "grad_hist",
                  alpha=0.55 if name == "grad_hist" else 1.0, lw=1.3, label=label)
    shift = np.log2(static_scale)
    share = lane["grad_hist"].mean(("step", "seed")).values.astype(float)
    ax.stairs(100 * share, np.append(left, left[-1] + 1) + shift, color=plotting.COLORS[0], ls="--", lw=1.0,
              label=f"weight grads x {_pow2(static_scale)} (static scale)")
    top = ax.get_ylim()[1]
    ax.set_ylim(0, 1.75 * top)
    for x in (lo_sub, lo_norm, hi):
        ax.axvline(x, color="k", lw=0.8, ls=":")
    marks = ax.secondary_xaxis("top")
    marks.set_xticks([lo_sub, lo_norm, hi], ["subnormal\n2^-24", "normal\n2^-14", "max\n65504"], fontsize=6.5)
    marks.tick_params(length=2, pad=1)
    ax.set_xlim(-48, 18)
    w_flush = float(lane["grad_flush"].mean())
    w_sub = float(lane["grad_subnormal"].mean())
    a_flush = float(lane["act_grad_flush"].mean())
    plotting.note(ax, f"in fp16 (|g| <= 2^-25 -> 0):\nweights: {100 * w_flush:.1f}% flush to 0,\n"
                      f"{100 * w_sub:.1f}% subnormal\nactivations: {100 * a_flush:.1f}% flush to 0", loc="upper right")
    ax.set_xlabel("log2 |gradient|  (fp32 run, last quarter of training)")
    ax.set_ylabel("% of entries")
    ax.set_title("fp32 run's gradients vs float16's range")
    ax.legend(loc="upper left", fontsize=6.5, frameon=False)


def figures(ds) -> dict:
    ds = results.with_axes(ds, AXES)
    cfg = results.config_of(ds)["config"]
    dtypes, modes = {str(d) for d in ds["model.dtype"].values}, {str(m) for m in ds["loss_scale"].values}
    lanes = [lane for lane in LANES if lane[0] in dtypes and lane[1] in modes]
    late = _tail(ds)
    found = {c.name: c for c in checks(ds)}
    fig, axes = plotting.figure(2, 3, width=4.3, height=3.2)

    ax = axes[0, 0]
    if "float32" in dtypes and "none" in modes:
        _range_panel(ax, ds, late, cfg["static_scale"])

    ax = axes[0, 1]
    steps = ds["step"].values
    for i, (dtype, mode, label) in enumerate(lanes):
        loss = _lane(ds, dtype, mode)["loss"].transpose("seed", "step").values
        plotting.band(ax, steps, loss, label, color=plotting.COLORS[i], log=True)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (median, min-max over seeds)")
    ax.set_title(f"training loss (x {_pow2(cfg['loss_weight'])} in the gradient)")
    ax.legend(loc="lower left", fontsize=6.5, frameon=False)
    text = [f"{c.name.split(':')[0]}: {c.measured:.2g} ({c.expected.split(' (')[0]})"
            for name, c in found.items() if "log final loss" in name]
    if text:
        plotting.note(ax, "|Δ log final loss| vs fp32\n" + "\n".join(text), loc="upper right")

    ax = axes[0, 2]
    if "float16" in dtypes:
        for i, (dtype, mode, label) in enumerate(lanes):
            if dtype == "float16":
                zero = _lane(ds, dtype, mode)["grad_zero"].transpose("seed", "step").values
                ax.plot(steps, 100 * np.median(zero, axis=0), color=plotting.COLORS[i], label=f"{label}: zero")
        if "float32" in dtypes:
            flush = _lane(ds, "float32", "none")["grad_flush"].transpose("seed", "step").values
            ax.plot(steps, 100 * np.median(flush, axis=0), color=plotting.COLORS[0], ls="--",
                    label="fp32 run: |g| <= 2^-25 (would flush)")
        ax.set_xlabel("step")
        ax.set_ylabel("% of weight-gradient entries")
        ax.set_title("gradients lost to float16 underflow")
        ax.legend(loc="center right", fontsize=6.5, frameon=False)

    ax = axes[1, 0]
    if "float16" in dtypes and "dynamic" in modes:
        lane = _lane(ds, "float16", "dynamic").isel(seed=0)
        scale = lane["scale"].values.astype(float)
        bad = lane["nonfinite"].values > 0
        ax.step(steps, np.log2(scale), where="post", color=plotting.COLORS[4], label="loss scale (log2)")
        ax.plot(steps[bad], np.log2(scale[bad]), "x", color=plotting.COLORS[1], ms=6, mew=1.5,
                label="non-finite gradients: step skipped")
        ax.set_xlabel("step")
        ax.set_ylabel("log2 loss scale")
        ax.set_title(f"dynamic loss scaling (fp16, seed {int(lane['seed'])})")
        ax.legend(loc="lower right", fontsize=6.5, frameon=False)
        halve = next((c for n, c in found.items() if n.startswith("dynamic scale: halvings")), None)
        double = next((c for n, c in found.items() if n.startswith("dynamic scale: doublings")), None)
        replay = next((c for n, c in found.items() if "replayed" in n), None)
        if halve and double and replay:
            plotting.note(ax, f"all seeds: {halve.measured:.0f} halvings (= skipped steps),\n"
                              f"{double.measured:.0f} doublings after {cfg['growth_interval']} finite steps;\n"
                              f"steps off the replayed rule: {replay.measured:.0f}", loc="upper right")

    ax = axes[1, 1]
    if "float16" in dtypes and "dynamic" in modes:
        lane = _lane(ds, "float16", "dynamic")
        mass = lane["update_mass"].where(lane["update_mass"] > 0)  # skipped steps moved nothing
        for name, color, label in (("fp16", plotting.COLORS[1], "weights kept in fp16"),
                                   ("fp32", plotting.COLORS[0], "fp32 master weights")):
            frac = (lane[f"lost_mass_{name}"] / mass).transpose("seed", "step").values
            closed = (lane[f"lost_mass_{name}_closed"] / mass).transpose("seed", "step").values
            with warnings.catch_warnings():  # steps every seed skipped have no update to lose
                warnings.simplefilter("ignore", RuntimeWarning)
                frac, closed = np.nanmedian(frac, axis=0), np.nanmedian(closed, axis=0)
            ax.plot(steps, 100 * frac, color=color, label=f"{label}: w + u == w")
            every = max(1, len(steps) // 25)
            ax.plot(steps[::every], 100 * closed[::every], "o", color=color, ms=3, mfc="none",
                    label=f"{label}: closed form |u| < gap/2")
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_xlabel("step")
        ax.set_ylabel("% of update mass Σ|u| lost")
        ax.set_title("updates lost to rounding (fp16 dynamic run)")
        ax.legend(loc="center left", bbox_to_anchor=(0.25, 0.45), fontsize=6.5, frameon=False)
        w16 = next((c for n, c in found.items() if n.startswith("fp16 weights: update mass")), None)
        w32 = next((c for n, c in found.items() if n.startswith("fp32 master")), None)
        if w16 and w32:
            plotting.note(ax, f"last quarter: fp16 weights lose {100 * w16.measured:.1f}%,\n"
                              f"master weights {100 * w32.measured:.2g}% ({w32.expected.split('= ')[-1]} bound)",
                          loc="upper left")

    ax = axes[1, 2]
    if "float16" in dtypes and "dynamic" in modes:
        lane = _lane(ds, "float16", "dynamic").isel(step=late)
        left = RATIO_BINS.astype(float)
        ax.axvspan(left[0], 0, color="#d1495b", alpha=0.12, lw=0)
        for name, color, label in (("fp16", plotting.COLORS[1], "fp16 weights"),
                                   ("fp32", plotting.COLORS[0], "fp32 weights")):
            counts = lane[f"half_gap_hist_{name}"].sum(("step", "seed")).values.astype(float)
            ax.stairs(100 * counts / max(counts.sum(), 1), np.append(left, left[-1] + 1), color=color, lw=1.3,
                      fill=name == "fp16", alpha=0.5 if name == "fp16" else 1.0, label=label)
        ax.text(left[0] + 0.5, 0.9, "lost:\n|u| < gap/2", transform=ax.get_xaxis_transform(), fontsize=7,
                color="#d1495b", va="top")
        ax.set_xlabel("log2( |u| / (half the gap to w's neighbour) )")
        ax.set_ylabel("% of updates (last quarter)")
        ax.set_title("update size vs the weight's spacing")
        ax.legend(loc="upper center", fontsize=6.5, frameon=False)
    fig.suptitle(f"Mixed precision: depth-{cfg['model']['depth']} tanh MLP, {cfg['data']['task']}, "
                 f"{cfg['optim']['name']}, {cfg['steps']} full-batch steps, {ds.sizes['seed']} seeds", fontsize=10)
    return {"": fig}
