"""B5: batch size, the linear scaling rule with warmup, gradient accumulation and the noise scale.

Linear scaling (Goyal et al. 2017, Sec. 2): when the minibatch grows k-fold, multiply the learning
rate by k, reaching k lr by a gradual warmup from lr over the first epochs (Sec. 2.2); then the loss
against examples seen follows the small batch's until the batch is too large. Here the rate is
optim.lr (1 + (k - 1) min(1, seen / (warmup_epochs x examples))), k = (B / base_batch)**lr_scaling,
B the effective batch (data.batch_size x optim.accumulate_steps): lr_scaling 1 is the linear rule,
1/2 the square-root rule, 0 a fixed rate. Both numbers are traced: one compile per
(batch_size, accumulate_steps), every run taking the same number of steps.

Gradient noise scale (McCandlish et al. 2018, Eq. 2.8): B_simple = tr(Sigma) / |G|^2, Sigma the
per-example gradient covariance, G the full gradient. Each step measures, from the per-example
gradients g_i of its batch, tr(Sigma) ~ sum_i |g_i - g_bar|^2 / (B - 1) and |G|^2 ~ |g_bar|^2 -
tr(Sigma) / B (both unbiased); over a window of steps B_simple is the ratio of their means (their
App. A.1). Below it a bigger batch buys proportionally fewer steps (the linear rule holds), above
it not: the checks compare, at the examples the base batch saw in its run, each batch's loss under
the warmed-up linear rule with the base batch's (within HOLDS for B <= B_simple, beyond it for
B >= 2 B_simple), and the largest batch that stays finite with and without warmup.

Accumulation: optax.MultiSteps averages k gradients of batches of B before one update. The k
batches partition the batch of kB the same update of a kB run draws (data.batch shuffles per
epoch with the same key) and the loss is a mean over examples, so the two take the same updates up
to float rounding; the check compares their losses update by update.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradlab import analysis, data, models, results, transforms, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "batch_size"
CLAIM = "linear lr scaling + warmup keeps loss vs examples seen until the noise scale; k x B accumulated = kB"
AXES = ["data.batch_size", "optim.accumulate_steps", "lr_scaling", "warmup_epochs", "seed"]


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the learning-rate scaling rule and a warmup measured in examples."""

    base_batch: int = param(16, low=1, doc="the effective batch size at which the lr is optim.lr")
    lr_scaling: float = param(1.0, low=0.0, doc="lr x (B / base_batch)**lr_scaling: 1 linear, 0.5 sqrt, 0 none")
    warmup_epochs: float = param(
        0.0, low=0.0, doc="ramp the lr from optim.lr to its scaled value over this many epochs"
    )

    def validate(self) -> None:
        super().validate()
        if self.telemetry != "loss":
            raise ConfigError(
                f"batch_size records per-example gradient statistics, not per-layer ones: telemetry "
                f"must be loss, got {self.telemetry}",
                key="telemetry",
            )


def effective_batch(cfg) -> int:
    size = cfg.data.batch_size if 0 < cfg.data.batch_size < cfg.data.examples else cfg.data.examples
    return size * cfg.optim.accumulate_steps


def learning_rate(cfg, hp, step):
    """The rate of training step `step`: optim.lr scaled by k = (B / base_batch)**lr_scaling, reached
    by Goyal et al.'s gradual warmup, linear from optim.lr to k optim.lr over warmup_epochs."""
    batch = effective_batch(cfg) // cfg.optim.accumulate_steps
    seen = (jnp.asarray(step) + 1).astype(jnp.float32) * batch  # examples in the update this step completes
    ratio, warm_examples = effective_batch(cfg) / cfg.base_batch, hp["warmup_epochs"] * cfg.data.examples
    return transforms.batch_scaled_lr(hp["optim.lr"], ratio, hp["lr_scaling"], warm_examples, seen)


def trial(cfg) -> Trial:
    """supervised_mlp at the step's rate (the optax chain is rebuilt around it each step), its gradient
    the mean of per-example gradients; records loss (of the batch), lr, grad_sq = |g_bar|^2 and
    trace_sigma = sum_i |g_i - g_bar|^2 / (B - 1)."""
    spec = trials.mlp_spec(cfg)

    def per_example_loss_and_grad(params, batch, hyper, probes):
        del probes  # None: telemetry is loss

        def example_loss(params, x, y):
            out, _ = models.apply(params, x[None], spec, hyper)
            return data.loss(cfg.data, out, y[None])

        losses, per_example = jax.vmap(jax.value_and_grad(example_loss), in_axes=(None, 0, 0))(params, batch.x, batch.y)
        grads = jax.tree.map(lambda g: jnp.mean(g, axis=0), per_example)
        spread = sum(
            jnp.sum(jnp.square(g - m[None])) for g, m in zip(jax.tree.leaves(per_example), jax.tree.leaves(grads))
        )
        return (jnp.mean(losses), {"trace_sigma": spread / max(batch.x.shape[0] - 1, 1)}), (grads, None)

    def noise_metrics(view: trials.StepView) -> dict:
        return {
            "lr": view.hp["optim.lr"],
            "grad_sq": optax.tree.norm(view.grads, squared=True),
            "trace_sigma": view.taps["trace_sigma"],
        }

    return trials.supervised_mlp(
        cfg,
        hp_map=lambda hp, step: {**hp, "optim.lr": learning_rate(cfg, hp, step)},
        loss_and_grad=per_example_loss_and_grad,
        metrics=noise_metrics,
    )


# ----------------------------------------------------------------------------- reading results

WINDOW_EXAMPLES = 256  # smoothing of the minibatch loss, in examples
HOLDS = 1.25  # the rule "holds" at a batch size when its loss at the base run's examples is within 25%
ACCUMULATION_RTOL = 1e-5  # k mean-of-means against one mean: float32 rounding, ~1e-7 an update
ACCUMULATION_UPDATES = 10


def select(ds, batch, k, **traced):
    return ds.sel({"data.batch_size": batch, "optim.accumulate_steps": k, **traced})


def runs(ds) -> list[tuple[int, int]]:
    """(batch_size, accumulate_steps) of every group, by effective batch then accumulation."""
    pairs = [(int(b), int(k)) for b in ds["data.batch_size"].values for k in ds["optim.accumulate_steps"].values]
    return sorted(pairs, key=lambda p: (p[0] * p[1], p[1]))


per_update = analysis.block_mean  # (loss, k): the loss of each optimizer update, the mean over its k minibatches


def smoothed(loss: np.ndarray, batch: int) -> np.ndarray:
    """A trailing mean of the minibatch loss over WINDOW_EXAMPLES examples (..., steps)."""
    return analysis.trailing_mean(loss, max(1, WINDOW_EXAMPLES // batch))


def noise_scale(ds, batch: int, k: int, window: slice) -> float:
    """B_simple = mean tr(Sigma) / mean(|g_bar|^2 - tr(Sigma)/B) over the steps in `window`,
    pooled over seeds (McCandlish et al. 2018, App. A.1), from the first lane of the traced axes."""
    p = select(ds, batch, k).isel({"lr_scaling": 0, "warmup_epochs": 0})
    return analysis.simple_noise_scale(p["trace_sigma"].values[..., window], p["grad_sq"].values[..., window], batch)


def loss_at(ds, batch: int, k: int, examples: int, **traced) -> float:
    """Smoothed loss after `examples` examples (median over seeds; inf if that seed diverged first)."""
    loss = select(ds, batch, k, **traced)["loss"].values
    t = examples // batch - 1
    if t >= loss.shape[-1]:
        return float("nan")
    at = smoothed(loss, batch)[..., t]
    return float(np.median(np.where(np.isfinite(at), at, np.inf)))


def scaling_table(ds) -> list[tuple[int, float, float, float]]:
    """(effective batch, loss ratio to the base batch at the base run's examples) for the linear
    rule with warmup, without warmup, and a fixed lr; one row per effective batch (k = 1 preferred)."""
    base = results.run_config(ds)["base_batch"]
    examples = base * ds.sizes["step"]  # what the base batch saw in its run
    ref = loss_at(ds, base, 1, examples, lr_scaling=0.0, warmup_epochs=0.0)
    warm = float(max(ds["warmup_epochs"].values))
    rows, seen = [], set()
    for b, k in runs(ds):
        if b * k in seen or b * k == base:
            continue
        seen.add(b * k)
        lanes = ((1.0, warm), (1.0, 0.0), (0.0, 0.0))
        rows.append((b * k, *(loss_at(ds, b, k, examples, lr_scaling=s, warmup_epochs=w) / ref for s, w in lanes)))
    return rows


def accumulation_error(ds) -> tuple[float, int]:
    """max |loss of k x B per update - loss of kB| / loss of kB over every matching pair, over the
    first ACCUMULATION_UPDATES updates of the lanes where neither run diverged; and the pair count.

    Float32 rounding differs between the two (a mean of k means against one mean, ~1e-7), and
    training amplifies any difference over many updates (chaotically so near the edge of
    stability), so the updates are compared while that amplification is small."""
    worst, pairs = 0.0, 0
    for b, k in runs(ds):
        if k == 1 or (b * k, 1) not in runs(ds):
            continue
        acc = per_update(select(ds, b, k)["loss"].values, k)[..., :ACCUMULATION_UPDATES]
        big = select(ds, b * k, 1)["loss"].values[..., : acc.shape[-1]]
        healthy = ~(select(ds, b, k)["diverged"].values | select(ds, b * k, 1)["diverged"].values)
        worst = max(worst, float(np.max(np.abs(acc - big)[healthy] / np.abs(big)[healthy], initial=0.0)))
        pairs += 1
    return worst, pairs


class Measured(NamedTuple):
    accumulation_error: float  # max rel. diff of k x B against kB over the first ACCUMULATION_UPDATES updates
    accumulation_pairs: int  # (k x B, kB) pairs compared
    base_batch: int
    noise_scale: float | None  # B_simple over the last quarter of the base-batch run (None: not run)
    table: list | None  # scaling_table (None without the fixed-lr and warmed-up linear lanes)
    holds: tuple | None = None  # (B, loss ratio): the worst B <= B_simple under the warmed-up linear rule
    breaks: tuple | None = None  # (B, loss ratio): the best B >= 2 B_simple
    warmup_gain: tuple | None = None  # (B, loss without / with warmup) at the largest B still finite


def measure(ds) -> Measured:
    cfg = results.run_config(ds)
    base, steps = cfg["base_batch"], ds.sizes["step"]
    err, pairs = accumulation_error(ds)
    if base not in [b * k for b, k in runs(ds)]:
        return Measured(err, pairs, base, None, None)
    b_simple = noise_scale(ds, base, 1, slice(3 * steps // 4, None))
    lanes = set(ds["lr_scaling"].values.tolist()) >= {0.0, 1.0} and (ds["warmup_epochs"].values > 0).any()
    if not lanes:
        return Measured(err, pairs, base, b_simple, None)
    table = scaling_table(ds)
    holds = max([(b, r) for b, r, *_ in table if b <= b_simple], key=lambda x: x[1], default=None)
    breaks = min([(b, r) for b, r, *_ in table if b >= 2 * b_simple], key=lambda x: x[1], default=None)
    # the largest B at which the warmed-up linear rule stays finite: (B, loss ratio with, without warmup)
    largest = max(((b, rw, r0) for b, rw, r0, _ in table if np.isfinite(rw)), default=None)
    warmup_gain = (largest[0], largest[2] / largest[1]) if largest else None
    return Measured(err, pairs, base, b_simple, table, holds, breaks, warmup_gain)


def checks(m: Measured) -> list[Check]:
    out = []
    if m.accumulation_pairs:
        name = f"MultiSteps k x B vs batch kB: first {ACCUMULATION_UPDATES} updates' loss, max rel. diff"
        out.append(Check.at_most(name, m.accumulation_error, ACCUMULATION_RTOL, "float32 rounding"))
    if m.holds:
        name = (
            f"linear rule + warmup, B <= B_simple = {m.noise_scale:.0f}: worst loss / base-batch loss (B={m.holds[0]})"
        )
        out.append(Check.at_most(name, m.holds[1], HOLDS))
    if m.breaks:
        name = f"linear rule + warmup, B >= 2 B_simple: best loss / base-batch loss (B={m.breaks[0]})"
        out.append(Check.above(name, m.breaks[1], HOLDS))
    # Warmup: the largest batch where the warmed-up linear rule still holds finite, with against without.
    if m.warmup_gain:
        name = f"linear rule at B={m.warmup_gain[0]}: loss without / with warmup"
        out.append(Check.above(name, m.warmup_gain[1], 1.0))
    return out


def figures(ds, m: Measured) -> dict:
    """The figure (gradlab/experiments/_batch_size_figures.py)."""
    from gradlab.experiments import _batch_size_figures

    return _batch_size_figures.draw(ds, m)
