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
masks over the rows of one minibatch, vmapped inside the batchnorm groups; the first block's
statistics are held to their closed forms (batchnorm_net.statistics_errors).

Sweep: model.norm and model.norm_position are static (one compile each); warmup and seed are
traced; the depths probed at init (probe_depths, a traced mask) and the BatchNorm batch sizes
(bn_batches) are vmapped inside each group's program; model.depth is the training depth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradlab import analysis, batchnorm_net, config, data, models, results, telemetry, transforms, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
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
BN_MOMENTS = ("in_mean", "in_var", "out_mean", "out_var", "running_mean", "running_var")  # recorded as bn_<name>


@dataclass(frozen=True)
class ModelConfig(config.ModelConfig):
    """models.ModelConfig with `batchnorm` among the norms; residual with a final norm by default."""

    norm: str = param("layernorm", choices=NORMS, doc="batchnorm: flax.linen.BatchNorm with running statistics")
    residual: bool = param(True, sweep="traced", doc="h + f(h) instead of f(h)")
    final_norm: bool = param(True, doc="normalise the last hidden state before the readout (Pre-LN transformers)")


def bn_sizes(batches, batch_size: int, examples: int) -> tuple[int, ...]:
    """The batch sizes a batchnorm group trains, ascending; the last is the whole minibatch."""
    return tuple(sorted(set(batches) | {batch_size if 0 < batch_size < examples else examples}))


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
        rows = bn_sizes((), self.data.batch_size, self.data.examples)[-1]
        bad = [b for b in self.bn_batches if not 1 <= b <= rows]
        if bad:
            raise ConfigError(
                f"each must be in 1..{rows} (the minibatch, data.batch_size), got {bad[0]}", key="bn_batches"
            )


reference = trials.task_reference  # ref.constant_loss: the best constant prediction's loss


# ----------------------------------------------------------------------------- the Trial


def net(cfg, depth: int) -> batchnorm_net.Net:
    """The config's net at a static maximum depth."""
    return batchnorm_net.net(dataclasses.replace(trials.mlp_spec(cfg), depth=depth), cfg.bn_momentum)


def probe(cfg, hp, key, batch: data.Data):
    """Per-layer weight-gradient norms at init, (probe depth, probe seed, layer); exactly 0 for the
    blocks beyond a depth (the mask passes h through them), so the state stays finite."""
    model = net(cfg, max(cfg.probe_depths))
    mask = jnp.ones(batch.x.shape[0], bool)

    def one(depth, k):
        hyper = models.MLPHyper.from_hp({**hp, "model.depth": depth})
        params, stats = model.init(k, hyper)

        def loss_fn(p):
            out, _, _ = model.apply(p, stats, batch.x, mask, hyper, True)
            return batchnorm_net.masked_loss(cfg.data, out, batch.y, mask)

        return models.per_layer(jax.grad(loss_fn)(params), telemetry.frobenius)  # 0 beyond the depth

    keys = jax.random.split(key, cfg.probe_seeds)
    return jax.vmap(lambda d: jax.vmap(lambda k: one(d, k))(keys))(jnp.asarray(cfg.probe_depths))


class State(NamedTuple):
    params: optax.Params  # (nets, ...) each leaf: one net per batch size
    stats: dict
    opt_state: optax.OptState
    data: data.Data
    step: jax.Array
    key: jax.Array
    init_grads: jax.Array  # (probe depth, probe seed, layer), from init


def trial(cfg) -> Trial:
    """Train the net (for batchnorm: one per batch size of bn_sizes, vmapped over row masks) and record,
    before each update: loss (training mode, on the rows it trains on), eval_loss (inference mode, on
    the whole minibatch), lr; init_grad_norm (probe depth, layer; geometric mean over probe seeds),
    init_last_grad and init_readout_grad (probe depth, probe seed) at init. Batchnorm adds bn_loss and
    bn_eval_loss per batch size and the first block's bn_<BN_MOMENTS> (bn_batch, feature).

    Not trials.supervised_mlp: a batchnorm net carries running statistics beside its parameters, and
    one net per batch size trains side by side."""
    total = cfg.steps
    model = net(cfg, cfg.model.depth)
    is_bn = cfg.model.norm == "batchnorm"
    sizes = bn_sizes(cfg.bn_batches if is_bn else (), cfg.data.batch_size, cfg.data.examples)
    rows = sizes[-1]
    masks = jnp.arange(rows)[None, :] < jnp.asarray(sizes)[:, None]  # (nets, rows)
    cold = dataclasses.replace(cfg.optim, warmup_steps=0)
    ramp = max(1, cfg.optim.warmup_steps)

    def init(hp, key):
        k_params, k_batches, k_probe = jax.random.split(key, 3)
        params, stats = model.init(k_params, models.MLPHyper.from_hp(hp))
        params, stats = jax.tree.map(lambda a: jnp.broadcast_to(a, (len(sizes),) + a.shape), (params, stats))
        opt_state = jax.vmap(transforms.build(cold, hp, total).init)(params)
        train = data.make(cfg.data)
        grads = probe(cfg, hp, k_probe, data.batch(train, cfg.data, jnp.int32(0), k_batches))
        return State(params, stats, opt_state, train, jnp.int32(0), k_batches, grads)

    def step(hp, state):
        hyper = models.MLPHyper.from_hp(hp)
        batch = data.batch(state.data, cfg.data, state.step, state.key)
        everything = jnp.ones(rows, bool)
        tx = transforms.build(cold, hp, total)
        # Linear warmup on top of optim.schedule: every optax optimizer here applies its rate last,
        # so scaling the update scales the rate.
        factor = jnp.where(hp["warmup"], jnp.minimum(1.0, state.step / ramp), 1.0)

        def one(params, stats, opt_state, mask):
            def loss_fn(p):
                out, new_stats, moments = model.apply(p, stats, batch.x, mask, hyper, True)
                return batchnorm_net.masked_loss(cfg.data, out, batch.y, mask), (new_stats, moments)

            (loss, (new_stats, moments)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            out, _, _ = model.apply(params, stats, batch.x, everything, hyper, False)
            eval_loss = batchnorm_net.masked_loss(cfg.data, out, batch.y, everything)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, jax.tree.map(lambda u: factor * u, updates))
            metrics = {"loss": loss, "eval_loss": eval_loss, "grad_global_norm": telemetry.global_norm(grads)}
            if is_bn:
                first = new_stats["hidden"]
                metrics.update(
                    {f"bn_{k}": v for k, v in zip(BN_MOMENTS, moments)},
                    bn_running_mean=first["mean"][0],
                    bn_running_var=first["var"][0],
                )
            return params, new_stats, opt_state, metrics

        params, stats, opt_state, per_net = jax.vmap(one)(state.params, state.stats, state.opt_state, masks)
        grads = jnp.where(state.init_grads > 0, state.init_grads, jnp.nan)
        metrics = {
            **{k: per_net[k][-1] for k in ("loss", "eval_loss", "grad_global_norm")},
            "lr": factor * transforms.learning_rate(cold, hp["optim.lr"], total)(state.step),
            "init_grad_norm": jnp.exp(jnp.mean(jnp.log(grads), axis=1)),
            "init_last_grad": grads[jnp.arange(len(cfg.probe_depths)), :, jnp.asarray(cfg.probe_depths)],
            "init_readout_grad": grads[..., -1],
        }
        if is_bn:
            metrics.update(
                bn_loss=per_net["loss"],
                bn_eval_loss=per_net["eval_loss"],
                **{k: v for k, v in per_net.items() if k.startswith("bn_")},
            )
        return State(params, stats, opt_state, state.data, state.step + 1, state.key, state.init_grads), metrics

    dims = {
        "init_grad_norm": ("probe_depth", "layer"),
        "init_last_grad": ("probe_depth", "probe_seed"),
        "init_readout_grad": ("probe_depth", "probe_seed"),
        "bn_loss": ("bn_batch",),
        "bn_eval_loss": ("bn_batch",),
        **{f"bn_{k}": ("bn_batch", "feature") for k in BN_MOMENTS},
    }
    return Trial(init, step, dims)


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
    sizes = bn_sizes(cfg["bn_batches"], cfg["data"]["batch_size"], cfg["data"]["examples"])
    bn = [label for label in ("pre-BN", "post-BN") if label in found and "bn_in_mean" in ds]
    bn_finals = {
        label: tuple(
            np.median(final_loss(ds, found[label], warm[-1], f"bn_{name}"), axis=0) for name in ("loss", "eval_loss")
        )
        for label in bn
    }
    moments = lambda sel: {  # each (step, ..., bn_batch, feature)
        k: np.moveaxis(ds[f"bn_{k}"].sel(sel).transpose(..., "step", "bn_batch", "feature").values, -3, 0)
        for k in BN_MOMENTS
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
