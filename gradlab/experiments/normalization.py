"""C2: normalization. Pre-LN against Post-LN (Xiong et al. 2020), and BatchNorm with tiny batches.

Blocks (models.py), r = model.residual, with the norm before the readout when model.final_norm:
  pre:  h <- r h + act(W norm(h) + b)        post: h <- norm(r h + act(W h + b))
Norms: none, layernorm, rmsnorm (models.py) and batchnorm (batchnorm_net.py: flax.linen.BatchNorm in
the same two places, trained with mutable batch_stats and evaluated with its running averages).

Gradient at init (Xiong et al. 2020, Theorem 1). Pre-LN adds every branch to the stream: a branch
reads a normalised input, so its output has a depth-free per-feature variance v (tanh: E tanh(z)^2
= 0.394, z ~ N(0, 1)) and the stream's spread grows like sigma(h_L)^2 = v (L + 1) (the input
projection adds one more such term when its pre-activations have the blocks' unit variance). The
final norm divides by sigma(h_L), so the gradient reaching the last block, and with it
|dL/dW_L|, falls like (L + 1)^(-1/2): a log-log slope of -1/2 d ln(L + 1)/d ln L over the probed
depths (-0.447 for 2..64), the paper's L^(-1/2). Post-LN normalises r h + branch, whose spread does
not depend on L: the last block's gradient stays put (slope 0).
Measured with this MLP (tanh, width 32, 16 inits): the raw slope is -0.35 (LN; BN -0.40), not -0.447: dL/dout
= out - y changes with depth through the correlation of the examples' final features, a term the
theorem bounds but does not remove, and its seed-to-seed spread is large (sd of ln|g| ~ 0.3). The
ratio to the readout's gradient |dL/dW_L| / |dL/dW_out| divides that factor out: -0.434 (LN).
The checks assert the catalog's band [-0.6, -0.3] on the raw slope, the (L + 1)^(-1/2) law on the
ratio, within 4 standard errors of the per-init slopes, and a Post-LN slope >= -4 standard errors.

Warmup: under Adam at a rate where Pre-LN trains with or without warmup, Post-LN without warmup
ends worse than with it (Xiong et al. 2020, Sec. 3; Liu et al. 2020).

BatchNorm: with batches of 2..8 the batch statistics are noisy and the net learns to depend on them;
evaluated with the running averages it does worse than its training loss says. Tiny batches are
masks over the rows of one minibatch, vmapped inside the batchnorm groups (batchnorm_net.trial); the
first block's statistics are held to their closed forms (batchnorm_net.statistics_errors).

Sweep: model.norm and model.norm_position are static (one compile each); warmup and seed are
traced; the depths probed at init (probe_depths, a traced mask) and the BatchNorm batch sizes
(bn_batches) are vmapped inside each group's program; model.depth is the training depth.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from gradlab import analysis, batchnorm_net, config, data, results, trials
from gradlab.config import ExperimentConfig, param
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "normalization"
CLAIM = (
    "Pre-LN's last-block gradient at init falls like L^-1/2, Post-LN's does not; Post-LN needs warmup; "
    "BatchNorm's running statistics fail tiny batches"
)
NORMS = config.NORMS + ("batchnorm",)
SHORT = {"layernorm": "LN", "rmsnorm": "RMS", "batchnorm": "BN"}  # variant labels: pre-LN, post-RMS, ...
TITLES = {"LN": "LN", "RMS": "RMSNorm", "BN": "BN"}  # as the checks name them: Pre-LN, Post-RMSNorm, ...
AXES = ["model.norm", "model.norm_position", "model.depth", "warmup", "seed"]
PRE_BAND = (-0.6, -0.3)  # catalog: Xiong et al. 2020 Theorem 1's L^-1/2, with room for finite depth
SIGMAS = 4.0  # tolerance of a fitted slope: this many standard errors of the per-init slopes
WORSE = 2.0  # Post-LN without warmup ends at least this many times the loss with it (seed spread ~1.3x)
FINE = 0.1  # Pre-LN "is fine": its final loss is at most this fraction of the best constant prediction's
TAIL = 20  # final losses: mean over the last TAIL steps


@dataclass(frozen=True)
class ModelConfig(config.ModelConfig):
    """models.ModelConfig with `batchnorm` among the norms; residual with a final norm by default."""

    norm: str = param("layernorm", choices=NORMS, doc="batchnorm: flax.linen.BatchNorm with running statistics")
    residual: bool = param(True, sweep="traced", doc="h + f(h) instead of f(h)")
    final_norm: bool = param(True, doc="normalise the last hidden state before the readout (Pre-LN transformers)")


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus warmup on/off, the depths probed at init and BatchNorm's batch sizes."""

    model: ModelConfig = field(default_factory=ModelConfig)
    warmup: bool = param(
        True,
        sweep="traced",
        doc="scale updates by min(1, step / optim.warmup_steps) on top of optim.schedule; false: none",
    )
    probe_depths: tuple[int, ...] = param((2, 4, 8, 16, 32, 64), doc="depths whose gradients are probed at init")
    probe_seeds: int = param(8, low=1, doc="independent inits per probed depth (and per seed)")
    bn_batches: tuple[int, ...] = param(
        (2, 4, 8), doc="batchnorm: extra nets trained on the first B rows of each minibatch"
    )
    bn_momentum: float = param(0.9, low=0.0, high=1.0, sweep="static", doc="running = m running + (1 - m) batch")

    def validate(self) -> None:
        super().validate()
        if not self.probe_depths or min(self.probe_depths) < 1:
            raise ConfigError(f"needs depths >= 1, got {list(self.probe_depths)}", key="probe_depths")
        rows = batchnorm_net.batch_sizes((), self.data.batch_size, self.data.examples)[-1]
        bad = [b for b in self.bn_batches if not 1 <= b <= rows]
        if bad:
            raise ConfigError(
                f"each must be in 1..{rows} (the minibatch, data.batch_size), got {bad[0]}", key="bn_batches"
            )


reference = trials.task_reference  # ref.constant_loss: the best constant prediction's loss
trial = batchnorm_net.trial  # one net per batch size with running statistics; its docstring lists the metrics


# ----------------------------------------------------------------------------- measured (numpy)


def variants(ds) -> dict:
    """label -> selection, per (norm, position) group; `none` once, its position being moot."""
    out = {}
    for norm in ds["model.norm"].values:
        for position in ds["model.norm_position"].values:
            label = "none" if norm == "none" else f"{position}-{SHORT[str(norm)]}"
            out.setdefault(label, {"model.norm": norm, "model.norm_position": position})
    return out


def probe_table(ds, name: str, sel: dict) -> np.ndarray:
    """A probe metric at init, (init, probe depth): every seed's probe inits stacked."""
    x = ds[name].sel(sel).isel({"step": 0, "warmup": 0, "model.depth": 0})
    x = x.transpose("seed", "probe_seed", "probe_depth").values.astype(float)
    return x.reshape(-1, x.shape[-1])


def theory_slope(depths) -> float:
    """Pre-norm: the last block's gradient ~ (L + 1)^(-1/2); its least-squares slope against ln L."""
    depths = np.asarray(depths, float)
    return analysis.slope(np.log(depths), -0.5 * np.log(depths + 1.0))


def slope_over_inits(depths, g) -> tuple[float, float]:
    """(mean, standard error; inf for one init) over the inits (rows of g) of the slope of ln g against ln L."""
    s = analysis.slopes(np.log(depths), np.log(g))
    return float(np.mean(s)), float(np.std(s, ddof=1) / np.sqrt(len(s))) if len(s) > 1 else float("inf")


def final_loss(ds, sel, warmup: bool, name: str = "loss") -> np.ndarray:
    """Mean of the last TAIL steps per seed (first training depth), (seed, ...); +inf if diverged."""
    x = ds[name].sel({**sel, "warmup": warmup}).isel({"model.depth": 0}).transpose("seed", ..., "step").values
    diverged = ds["diverged"].sel({**sel, "warmup": warmup}).isel({"model.depth": 0}).values
    return analysis.final(x, diverged.reshape(diverged.shape + (1,) * (x.ndim - 2)), tail=TAIL)


class Measured(NamedTuple):
    variants: dict  # label (pre-LN, post-BN, ...) -> selection
    depths: np.ndarray  # the probed depths
    theory: float  # theory_slope(depths)
    slopes: dict  # label -> (mean, s.e.) over inits of d ln|dL/dW_last| / d ln L at init, when fitted
    ratio_slopes: dict  # pre-norm label -> the same for |dL/dW_last| / |dL/dW_out|
    finals: dict  # (label, warmup) -> median over seeds of the final training loss
    warmup_gain: float | None  # Post-LN final loss without / with warmup
    pre_vs_constant: float | None  # Pre-LN's final loss without warmup / the best constant's
    constant_loss: float  # NaN for classification
    bn_sizes: tuple
    bn_finals: dict  # BN label -> (train, eval) final loss per batch size, median over seeds, with warmup
    bn_errors: dict  # BN label -> batchnorm_net.statistics_errors of its first block, over seeds
    cfg: dict


def measure(ds) -> Measured:
    cfg = results.run_config(ds)
    found, depths = variants(ds), np.asarray(cfg["probe_depths"])
    slopes, ratios = {}, {}
    if len(depths) >= 2 and cfg["model"]["final_norm"] and cfg["model"]["residual"]:
        for label in (f"{position}-{tag}" for tag in TITLES for position in ("pre", "post")):
            if label in found:
                g = probe_table(ds, "init_last_grad", found[label])
                slopes[label] = slope_over_inits(depths, g)
                if label.startswith("pre"):
                    ratios[label] = slope_over_inits(depths, g / probe_table(ds, "init_readout_grad", found[label]))
    warm = sorted({bool(w) for w in ds["warmup"].values})
    finals = {(label, w): float(np.median(final_loss(ds, sel, w))) for label, sel in found.items() for w in warm}
    regression = data.task_kind(cfg["data"]["task"]) == "regression"
    chance = float(analysis.reference(ds, "constant_loss")) if regression else float("nan")
    gain = pre = None
    if warm == [False, True] and {"pre-LN", "post-LN"} <= set(found) and ds.sizes["step"] > TAIL:
        gain = finals[("post-LN", False)] / finals[("post-LN", True)]
        pre = finals[("pre-LN", False)] / chance if np.isfinite(chance) else None
    sizes = batchnorm_net.batch_sizes(cfg["bn_batches"], cfg["data"]["batch_size"], cfg["data"]["examples"])
    bn = [label for label in ("pre-BN", "post-BN") if label in found and "bn_in_mean" in ds]
    bn_finals = {
        label: tuple(
            np.median(final_loss(ds, found[label], warm[-1], f"bn_{name}"), axis=0) for name in ("loss", "eval_loss")
        )
        for label in bn
    }
    moments = lambda sel: {  # each (step, ..., bn_batch, feature)
        k: np.moveaxis(ds[f"bn_{k}"].sel(sel).transpose(..., "step", "bn_batch", "feature").values, -3, 0)
        for k in batchnorm_net.MOMENTS
    }
    errors = {label: batchnorm_net.statistics_errors(moments(found[label]), sizes, cfg["bn_momentum"]) for label in bn}
    return Measured(
        found, depths, theory_slope(depths), slopes, ratios, finals, gain, pre, chance, sizes, bn_finals, errors, cfg
    )


def check_title(label: str) -> str:
    """pre-RMS -> Pre-RMSNorm: a variant as the checks name it."""
    position, tag = label.split("-")
    return f"{position.capitalize()}-{TITLES[tag]}"


def checks(m: Measured) -> list[Check]:
    out = []
    for label, (mean, se) in m.slopes.items():
        name = f"{check_title(label)}: d ln|dL/dW_last| / d ln L at init"
        if label.startswith("post"):
            out.append(Check.at_least(name, mean, -SIGMAS * se, f"-{SIGMAS:g} s.e. (does not shrink)"))
            continue
        out.append(Check.between(name, mean, *PRE_BAND, "Xiong et al. 2020: L^-1/2"))
        mean, se = m.ratio_slopes[label]
        out.append(
            Check.near(
                f"{check_title(label)}: d ln(|dL/dW_last| / |dL/dW_out|) / d ln L at init",
                mean,
                m.theory,
                SIGMAS * se,
                f"(L+1)^-1/2 slope (+- {SIGMAS:g} s.e.)",
            )
        )
    optim = m.cfg["optim"]
    if m.warmup_gain is not None:  # warmup needed
        name = f"Post-LN, {optim['name']} lr {optim['lr']:g}: final loss without / with warmup"
        out.append(Check.at_least(name, m.warmup_gain, WORSE))
    if m.pre_vs_constant is not None:  # trains without warmup
        name = f"Pre-LN, lr {optim['lr']:g}, no warmup: final loss / best constant's"
        out.append(Check.at_most(name, m.pre_vs_constant, FINE))
    for label, (closed, err, ema, rel) in m.bn_errors.items():
        name = f"{label}: training-mode output batch mean 0, var v/(v+eps) at init; max |err| {err:.1e} / float32 bound"
        out.append(Check.at_most(name, closed, 1.0))
        name = f"{label}: running stats vs numpy EMA of the batch moments; max rel err {rel:.1e}, |err| / float32 bound"
        out.append(Check.at_most(name, ema, 1.0))
    return out


def figures(ds, m: Measured) -> dict:
    """The main figure and, with a batchnorm group, BatchNorm's (gradlab/experiments/_normalization_figures.py)."""
    from gradlab.experiments import _normalization_figures

    return _normalization_figures.draw(ds, m)
