"""C2: normalization. Pre-LN against Post-LN (Xiong et al. 2020), and BatchNorm with tiny batches.

Blocks (models.py), r = model.residual, with the norm before the readout when model.final_norm:
  pre:  h <- r h + act(W norm(h) + b)        post: h <- norm(r h + act(W h + b))
Norms: none, layernorm, rmsnorm (models.py) and batchnorm: flax.linen.BatchNorm in the same two
places, trained with mutable batch_stats and evaluated with its running averages.

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

BatchNorm: in training mode each feature is normalised with its batch's mean and (biased) variance
v, so at init (scale 1, bias 0) the output has batch mean 0 and variance v / (v + eps) exactly;
the running statistics follow s_k = m s_{k-1} + (1 - m) stat_k (flax's momentum m). With batches
of 2..8 the batch statistics are noisy and the net learns to depend on them; evaluated with the
running averages it does worse than its training loss says. Tiny batches are masks over the rows
of one minibatch (flax's BatchNorm `mask`), vmapped inside the batchnorm groups.

Sweep: model.norm and model.norm_position are static (one compile each); warmup and seed are
traced; the depths probed at init (probe_depths, a traced mask) and the BatchNorm batch sizes
(bn_batches) are vmapped inside each group's program; model.depth is the training depth.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradlab import config, data, models, plotting, results, telemetry, transforms
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "normalization"
CLAIM = ("Pre-LN's last-block gradient at init falls like L^-1/2, Post-LN's does not; Post-LN needs warmup; "
         "BatchNorm's running statistics fail tiny batches")
NORMS = config.NORMS + ("batchnorm",)
AXES = ["model.norm", "model.norm_position", "model.depth", "warmup", "seed"]
BN_EPS = 1e-5  # flax.linen.BatchNorm's default epsilon
PRE_BAND = (-0.6, -0.3)  # catalog: Xiong et al. 2020 Theorem 1's L^-1/2, with room for finite depth
SIGMAS = 4.0  # tolerance of a fitted slope: this many standard errors of the per-init slopes
WORSE = 2.0  # Post-LN without warmup ends at least this many times the loss with it (seed spread ~1.3x)
FINE = 0.1  # Pre-LN "is fine": its final loss is at most this fraction of the best constant prediction's
TAIL = 20  # final losses: mean over the last TAIL steps
# |BN output batch mean| and |var - v/(v+eps)|: flax reduces in float32 with E[x^2] - E[x]^2, so each
# carries ~ a few ulps (1.2e-7) of E[x^2] / v, which is < 10 for these block inputs: 1e-5 bounds it.
BN_ATOL = 1e-5
# Running averages: the float32 recursion against the float64 one; each step adds ~1 ulp of the
# statistic and earlier errors decay by m, so the error stays ~ 1e-7 / (1 - m) of the statistic's size.
EMA_RTOL = 1e-5


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
    warmup: bool = param(True, sweep="traced",
                         doc="scale updates by min(1, step / optim.warmup_steps) on top of optim.schedule; false: none")
    probe_depths: tuple[int, ...] = param((2, 4, 8, 16, 32, 64), doc="depths whose gradients are probed at init")
    probe_seeds: int = param(8, low=1, doc="independent inits per probed depth (and per seed)")
    bn_batches: tuple[int, ...] = param((2, 4, 8), doc="batchnorm: extra nets trained on the first B rows of each minibatch")
    bn_momentum: float = param(0.9, low=0.0, high=1.0, sweep="static", doc="running = m running + (1 - m) batch")


def minibatch(cfg) -> int:
    size = cfg.data.batch_size
    return size if 0 < size < cfg.data.examples else cfg.data.examples


def bn_sizes(cfg) -> tuple[int, ...]:
    """The batch sizes a batchnorm group trains, ascending; the last is the whole minibatch."""
    return tuple(sorted(set(cfg.bn_batches) | {minibatch(cfg)}))


def validate(cfg) -> None:
    if not cfg.probe_depths or min(cfg.probe_depths) < 1:
        raise ConfigError(f"probe_depths: needs depths >= 1, got {list(cfg.probe_depths)}")
    bad = [b for b in cfg.bn_batches if not 1 <= b <= minibatch(cfg)]
    if bad:
        raise ConfigError(f"bn_batches: each must be in 1..{minibatch(cfg)} (the minibatch, data.batch_size), got {bad[0]}")


# ----------------------------------------------------------------------------- BatchNorm net


class BatchNormBlock(nn.Module):
    """One hidden block with flax's BatchNorm; returns (h, the BatchNorm's input, its output)."""

    width: int
    activation: str
    position: str
    momentum: float
    train: bool

    @nn.compact
    def __call__(self, h, residual, leaky_slope, mask):
        act = models.activation_fn(self.activation, leaky_slope)
        bn = nn.BatchNorm(use_running_average=not self.train, momentum=self.momentum, epsilon=BN_EPS, name="bn")
        dense = nn.Dense(self.width, name="dense")
        if self.position == "pre":
            z = bn(h, mask=mask[:, None])
            return residual * h + act(dense(z)), h, z
        u = residual * h + act(dense(h))
        out = bn(u, mask=mask[:, None])
        return out, u, out


def bn_init(key, spec: models.MLPSpec, hyper: models.MLPHyper):
    """(params, batch_stats): the weights models.init draws for the same key, BatchNorm scale 1 and
    bias 0, running mean 0 and variance 1 (flax's initial values)."""
    params = models.init(key, dataclasses.replace(spec, norm="layernorm"), hyper)
    d, w = spec.depth, spec.width
    stats = {"hidden": {"mean": jnp.zeros((d, w)), "var": jnp.ones((d, w))}}
    if spec.final_norm:
        stats["final"] = {"mean": jnp.zeros((w,)), "var": jnp.ones((w,))}
    return params, stats


def masked_moments(x, mask):
    """Per-feature mean and biased variance over the rows where mask is true (two-pass)."""
    weight = mask.astype(jnp.float32)[:, None] * jnp.ones((1, x.shape[1]))
    count = jnp.sum(weight, axis=0)
    mean = jnp.sum(weight * x, axis=0) / count
    var = jnp.sum(weight * jnp.square(x - mean[None]), axis=0) / count
    return mean, var


def bn_apply(params, stats, x, mask, spec, hyper, train: bool, momentum: float):
    """Forward pass of the BatchNorm MLP (blocks under lax.scan, flax BatchNorm inside each).

    Returns (out, new batch_stats, moments): moments are the first block's BatchNorm input and output
    per-feature batch mean and variance over the masked rows, in training mode.
    """
    act = models.activation_fn(spec.activation, hyper.leaky_slope)
    block = BatchNormBlock(spec.width, spec.activation, spec.norm_position, momentum, train)
    residual = jnp.asarray(hyper.residual).astype(jnp.float32)
    mutable = ["batch_stats"] if train else False
    h = act(x @ params["input"]["w"] + params["input"]["b"][None])

    def body(h, layer):
        index, p, s = layer
        variables = {"params": {"dense": {"kernel": p["w"], "bias": p["b"]},
                                "bn": {"scale": p["scale"], "bias": p["bias"]}},
                     "batch_stats": {"bn": s}}
        result = block.apply(variables, h, residual, hyper.leaky_slope, mask, mutable=mutable)
        (new, bn_in, bn_out), updated = result if train else (result, {"batch_stats": {"bn": s}})
        active = index < hyper.depth
        new = jnp.where(active, new, h)
        s = jax.tree.map(lambda n, o: jnp.where(active, n, o), updated["batch_stats"]["bn"], s)
        return new, (s, (*masked_moments(bn_in, mask), *masked_moments(bn_out, mask)))

    layers = (jnp.arange(spec.depth), params["hidden"], stats["hidden"])
    h, (hidden_stats, moments) = jax.lax.scan(body, h, layers)
    new_stats = {"hidden": hidden_stats}
    if spec.final_norm:
        bn = nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=BN_EPS)
        variables = {"params": params["final"], "batch_stats": stats["final"]}
        result = bn.apply(variables, h, mask=mask[:, None], mutable=mutable)
        h, updated = result if train else (result, {"batch_stats": stats["final"]})
        new_stats["final"] = updated["batch_stats"]
    out = h @ params["output"]["w"] + params["output"]["b"][None]
    return out, new_stats, jax.tree.map(lambda m: m[0], moments)


# ----------------------------------------------------------------------------- one net, any norm


def masked_loss(data_cfg, out, y, mask):
    """data.loss over the rows where mask is true."""
    if data_cfg.task == "classification":
        per_row = optax.softmax_cross_entropy_with_integer_labels(out, y)
    else:
        per_row = jnp.mean(jnp.square(out - y), axis=-1)
    weight = mask.astype(jnp.float32)
    return jnp.sum(weight * per_row) / jnp.sum(weight)


class Net(NamedTuple):
    """init(key, hyper) -> (params, stats); apply(params, stats, x, mask, hyper, train) -> (out, stats, moments)."""

    init: callable
    apply: callable


def net(cfg, depth: int) -> Net:
    """The config's net at a static maximum depth; stats is {} without BatchNorm."""
    spec = dataclasses.replace(models.MLPSpec.from_config(cfg.model, cfg.data.input_dim, cfg.data.output_dim),
                               depth=depth)
    if cfg.model.norm == "batchnorm":
        return Net(lambda key, hyper: bn_init(key, spec, hyper),
                   lambda p, s, x, mask, hyper, train: bn_apply(p, s, x, mask, spec, hyper, train, cfg.bn_momentum))

    def apply(p, s, x, mask, hyper, train):
        del mask, train  # per-example norms: no batch statistics, the same in training and inference
        return models.apply(p, x, spec, hyper)[0], s, None

    return Net(lambda key, hyper: (models.init(key, spec, hyper), {}), apply)


def probe(cfg, hp, key, batch: data.Data):
    """Per-layer weight-gradient norms at init, (probe depth, probe seed, layer); exactly 0 for the
    blocks beyond a depth (the mask passes h through them), so the state stays finite."""
    depths = jnp.asarray(cfg.probe_depths)
    model = net(cfg, max(cfg.probe_depths))
    mask = jnp.ones(batch.x.shape[0], bool)

    def one(depth, k):
        hyper = models.MLPHyper.from_hp({**hp, "model.depth": depth})
        params, stats = model.init(k, hyper)

        def loss_fn(p):
            out, _, _ = model.apply(p, stats, batch.x, mask, hyper, True)
            return masked_loss(cfg.data, out, batch.y, mask)

        return models.per_layer(jax.grad(loss_fn)(params), telemetry.frobenius)  # 0 beyond the depth

    keys = jax.random.split(key, cfg.probe_seeds)
    return jax.vmap(lambda d: jax.vmap(lambda k: one(d, k))(keys))(depths)


# ----------------------------------------------------------------------------- the Trial


class State(NamedTuple):
    params: dict
    stats: dict
    opt_state: optax.OptState
    data: data.Data
    step: jax.Array
    key: jax.Array
    init_grads: jax.Array  # (probe depth, probe seed, layer), from init


def trial(cfg) -> Trial:
    """Train the net (for batchnorm: one net per batch size of bn_sizes, vmapped over row masks) and
    record, before each update: loss (training mode, on the rows it trains on), eval_loss (inference
    mode, on the whole minibatch: for batchnorm the running averages replace the batch statistics), lr; the gradients probed at init: init_grad_norm (probe depth, layer;
    geometric mean over probe seeds), init_last_grad and init_readout_grad (probe depth, probe seed):
    the last block's and the readout's. Batchnorm adds bn_loss and bn_eval_loss per batch size and,
    for the first block's BatchNorm, its input's batch moments, its running averages after the
    update and its output's batch moments (bn_batch, feature)."""
    validate(cfg)
    total, rows = cfg.steps, minibatch(cfg)
    model = net(cfg, cfg.model.depth)
    is_bn = cfg.model.norm == "batchnorm"
    sizes = bn_sizes(cfg) if is_bn else (rows,)
    masks = jnp.arange(rows)[None, :] < jnp.asarray(sizes)[:, None]  # (nets, rows)
    cold = dataclasses.replace(cfg.optim, warmup_steps=0)
    ramp = max(1, cfg.optim.warmup_steps)

    def warmup_factor(hp, step):
        """Linear warmup on top of optim.schedule: every optax optimizer here applies its rate last,
        so scaling the update scales the rate."""
        return jnp.where(hp["warmup"], jnp.minimum(1.0, step / ramp), 1.0)

    def init(hp, key):
        k_params, k_batches, k_probe = jax.random.split(key, 3)
        hyper = models.MLPHyper.from_hp(hp)
        params, stats = model.init(k_params, hyper)
        copies = lambda tree: jax.tree.map(lambda a: jnp.broadcast_to(a, (len(sizes),) + a.shape), tree)  # noqa: E731
        params, stats = copies(params), copies(stats)
        opt_state = jax.vmap(transforms.build(cold, hp, total).init)(params)
        train = data.make(cfg.data)
        first = data.batch(train, cfg.data, jnp.int32(0), k_batches)
        grads = probe(cfg, hp, k_probe, first)
        return State(params, stats, opt_state, train, jnp.int32(0), k_batches, grads)

    def step(hp, state):
        hyper = models.MLPHyper.from_hp(hp)
        batch = data.batch(state.data, cfg.data, state.step, state.key)
        everything = jnp.ones(rows, bool)
        tx = transforms.build(cold, hp, total)
        factor = warmup_factor(hp, state.step)

        def one(params, stats, opt_state, mask):
            def loss_fn(p):
                out, new_stats, moments = model.apply(p, stats, batch.x, mask, hyper, True)
                return masked_loss(cfg.data, out, batch.y, mask), (new_stats, moments)

            (loss, (new_stats, moments)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            out, _, _ = model.apply(params, stats, batch.x, everything, hyper, False)
            eval_loss = masked_loss(cfg.data, out, batch.y, everything)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, jax.tree.map(lambda u: factor * u, updates))
            metrics = {"loss": loss, "eval_loss": eval_loss, "grad_global_norm": telemetry.global_norm(grads)}
            if is_bn:
                in_mean, in_var, out_mean, out_var = moments
                first = new_stats["hidden"]
                metrics.update(bn_in_mean=in_mean, bn_in_var=in_var, bn_out_mean=out_mean, bn_out_var=out_var,
                               bn_running_mean=first["mean"][0], bn_running_var=first["var"][0])
            return params, new_stats, opt_state, metrics

        params, stats, opt_state, per_net = jax.vmap(one)(state.params, state.stats, state.opt_state, masks)
        lr = factor * transforms.learning_rate(cold, hp["optim.lr"], total)(state.step)
        grads = jnp.where(state.init_grads > 0, state.init_grads, jnp.nan)
        last = grads[jnp.arange(len(cfg.probe_depths)), :, jnp.asarray(cfg.probe_depths)]
        metrics = {
            "loss": per_net["loss"][-1], "eval_loss": per_net["eval_loss"][-1],
            "grad_global_norm": per_net["grad_global_norm"][-1], "lr": lr,
            "init_grad_norm": jnp.exp(jnp.mean(jnp.log(grads), axis=1)),
            "init_last_grad": last, "init_readout_grad": grads[..., -1],
        }
        if is_bn:
            metrics.update(bn_loss=per_net["loss"], bn_eval_loss=per_net["eval_loss"],
                           **{k: v for k, v in per_net.items() if k.startswith("bn_")})
        new_state = State(params, stats, opt_state, state.data, state.step + 1, state.key, state.init_grads)
        return new_state, metrics

    bn_dims = {k: ("bn_batch", "feature") for k in ("bn_in_mean", "bn_in_var", "bn_out_mean", "bn_out_var",
                                                   "bn_running_mean", "bn_running_var")}
    dims = {"init_grad_norm": ("probe_depth", "layer"), "init_last_grad": ("probe_depth", "probe_seed"),
            "init_readout_grad": ("probe_depth", "probe_seed"), "bn_loss": ("bn_batch",),
            "bn_eval_loss": ("bn_batch",), **bn_dims}
    return Trial(init, step, dims)



# ----------------------------------------------------------------------------- reading the results


ULP = float(np.finfo(np.float32).eps) / 2  # float32 unit roundoff, 2^-24


def variants(ds):
    """(label, selection) per (norm, position) group; `none` once, its position being moot."""
    seen_none = False
    for norm in ds["model.norm"].values:
        for position in ds["model.norm_position"].values:
            if norm == "none":
                if seen_none:
                    continue
                seen_none = True
                label = "none"
            else:
                label = f"{position}-{ {'layernorm': 'LN', 'rmsnorm': 'RMS', 'batchnorm': 'BN'}[str(norm)] }"
            yield label, {"model.norm": norm, "model.norm_position": position}


def probe_table(ds, name: str, sel: dict) -> np.ndarray:
    """A probe metric at init, (init, probe depth): every seed's probe inits stacked."""
    x = ds[name].sel(sel).isel({"step": 0, "warmup": 0, "model.depth": 0})
    x = x.transpose("seed", "probe_seed", "probe_depth").values.astype(float)
    return x.reshape(-1, x.shape[-1])


def per_init_slopes(depths, g) -> np.ndarray:
    """Least-squares slope of ln g against ln L for each init (row of g)."""
    return np.polyfit(np.log(depths), np.log(g).T, 1)[0]


def theory_slope(depths) -> float:
    """Pre-norm: the last block's gradient ~ (L + 1)^(-1/2); its least-squares slope against ln L."""
    depths = np.asarray(depths, float)
    return float(np.polyfit(np.log(depths), -0.5 * np.log(depths + 1.0), 1)[0])


def slope_stats(ds, sel, ratio: bool = False):
    """(mean, standard error) over inits of the fitted slope of the last block's gradient (or of its
    ratio to the readout's) against depth at init."""
    depths = ds["probe_depth"].values if "probe_depth" in ds.coords else probe_depths(ds)
    g = probe_table(ds, "init_last_grad", sel)
    if ratio:
        g = g / probe_table(ds, "init_readout_grad", sel)
    s = per_init_slopes(depths, g)
    return float(np.mean(s)), float(np.std(s, ddof=1) / np.sqrt(len(s))) if len(s) > 1 else float("inf")


def probe_depths(ds) -> np.ndarray:
    return np.asarray(results.config_of(ds)["config"]["probe_depths"])


def constant_loss(data_cfg: dict) -> float:
    """Mean squared error of the best constant prediction (NaN for classification)."""
    if data_cfg["task"] != "regression":
        return float("nan")
    y = np.asarray(data.make(config.DataConfig(**data_cfg)).y, float)
    return float(np.mean(np.var(y, axis=0)))


def final_loss(ds, sel, warmup: bool, name: str = "loss") -> np.ndarray:
    """Mean of the last TAIL steps per seed (first training depth); a diverged run counts as +inf."""
    x = ds[name].sel({**sel, "warmup": warmup}).isel({"model.depth": 0})
    diverged = ds["diverged"].sel({**sel, "warmup": warmup}).isel({"model.depth": 0}).values
    tail = x.isel(step=slice(-TAIL, None)).mean("step").transpose("seed", ...).values.astype(float)
    tail = np.where(np.reshape(diverged, diverged.shape + (1,) * (tail.ndim - 1)), np.inf, tail)
    return np.where(np.isfinite(tail), tail, np.inf)


def bn_closed_form_error(ds, sel) -> tuple[float, float]:
    """Training-mode BatchNorm at init: (max |error| / its float32 bound, max |error|) of the first
    block's output batch mean (0) and variance (v / (v + eps), v the input's batch variance).

    flax reduces E[x^2] - E[x]^2 in float32: over B rows its mean and variance carry up to ~B u
    E[x^2] (u = 2^-24), which moves the output's mean by B u sqrt(E[x^2] / (v + eps)) and its
    variance by B u E[x^2] / (v + eps); the bound is 16 times that (and 1e-6 for the sums here).
    """
    sizes = np.asarray(bn_sizes_of(ds), float)[:, None]
    at0 = {k: ds[k].sel(sel).isel(step=0).transpose(..., "bn_batch", "feature").values.astype(float)
           for k in ("bn_in_mean", "bn_in_var", "bn_out_mean", "bn_out_var")}
    v = at0["bn_in_var"]
    r = (np.square(at0["bn_in_mean"]) + v) / (v + BN_EPS)
    mean_err = np.abs(at0["bn_out_mean"])
    var_err = np.abs(at0["bn_out_var"] - v / (v + BN_EPS))
    bound_mean = 16 * sizes * ULP * np.sqrt(r) + 1e-6
    bound_var = 16 * sizes * ULP * r + 1e-6
    ratio = max(np.nanmax(mean_err / bound_mean), np.nanmax(var_err / bound_var))
    return float(ratio), float(max(np.nanmax(mean_err), np.nanmax(var_err)))


def bn_sizes_of(ds) -> tuple[int, ...]:
    cfg = results.config_of(ds)["config"]
    rows = cfg["data"]["batch_size"] if 0 < cfg["data"]["batch_size"] < cfg["data"]["examples"] else cfg["data"]["examples"]
    return tuple(sorted(set(cfg["bn_batches"]) | {rows}))


def ema_reference(batch_stat: np.ndarray, start: float, momentum: float) -> np.ndarray:
    """Running averages after each step, float64 loop: s_k = m s_{k-1} + (1 - m) stat_k, s_-1 = start.

    batch_stat has steps on axis 0."""
    out = np.empty(batch_stat.shape, float)
    s = np.full(batch_stat.shape[1:], start, float)
    for k, stat in enumerate(np.asarray(batch_stat, float)):
        s = momentum * s + (1.0 - momentum) * stat
        out[k] = s
    return out


def bn_ema_error(ds, sel) -> tuple[float, float]:
    """(max |running - numpy EMA| / its float32 bound, max relative error) over steps, features,
    batch sizes, seeds: the recorded running mean and variance of the first block's BatchNorm after
    each step against ema_reference of the recorded batch moments (computed two-pass, not by flax).

    The bound: flax's one-pass statistics differ from the two-pass ones by up to ~B u E[x^2] per step
    (see bn_closed_form_error); an average with weights summing to <= 1 keeps that size; 16 times it.
    """
    momentum = results.config_of(ds)["config"]["bn_momentum"]
    sizes = np.asarray(bn_sizes_of(ds), float)[:, None]
    get = lambda k: np.moveaxis(ds[k].sel(sel).transpose(..., "step", "bn_batch", "feature").values.astype(float),
                                -3, 0)  # noqa: E731
    mean, var = get("bn_in_mean"), get("bn_in_var")
    scale = np.max(np.square(mean) + var, axis=0)  # max over steps of E[x^2]
    worst, rel = 0.0, 0.0
    for stat, run, start in ((mean, get("bn_running_mean"), 0.0), (var, get("bn_running_var"), 1.0)):
        ref = ema_reference(stat, start, momentum)
        err = np.abs(run - ref)
        worst = max(worst, float(np.nanmax(err / (16 * sizes * ULP * np.maximum(scale, 1.0)))))
        rel = max(rel, float(np.nanmax(err / np.maximum(np.abs(ref), 1e-3))))
    return worst, rel


def checks(ds) -> list[Check]:
    ds = results.with_axes(ds, AXES)
    cfg = results.config_of(ds)["config"]
    depths = probe_depths(ds)
    found = dict(variants(ds))
    out = []
    fit = len(depths) >= 2
    for short, tag in (("LN", "LN"), ("RMSNorm", "RMS"), ("BN", "BN")):
        pre, post = found.get(f"pre-{tag}"), found.get(f"post-{tag}")
        if not (fit and cfg["model"]["final_norm"] and cfg["model"]["residual"]):
            break
        if pre is not None:
            m, se = slope_stats(ds, pre)
            out.append(Check(f"Pre-{short}: d ln|dL/dW_last| / d ln L at init", m,
                             f"in [{PRE_BAND[0]}, {PRE_BAND[1]}] (Xiong et al. 2020: L^-1/2)",
                             PRE_BAND[0] <= m <= PRE_BAND[1]))
            m, se = slope_stats(ds, pre, ratio=True)
            want = theory_slope(depths)
            out.append(Check(f"Pre-{short}: d ln(|dL/dW_last| / |dL/dW_out|) / d ln L at init", m,
                             f"{want:+.3f} +- {SIGMAS * se:.3f} ((L+1)^-1/2, {SIGMAS:g} s.e.)",
                             abs(m - want) <= SIGMAS * se))
        if post is not None:
            m, se = slope_stats(ds, post)
            out.append(Check(f"Post-{short}: d ln|dL/dW_last| / d ln L at init", m,
                             f">= {-SIGMAS * se:+.3f} (does not shrink; {SIGMAS:g} s.e.)", m >= -SIGMAS * se))
    chance = constant_loss(cfg["data"])
    warm = set(bool(w) for w in ds["warmup"].values)
    if {True, False} <= warm and "pre-LN" in found and "post-LN" in found and ds.sizes["step"] > TAIL:
        post_cold = float(np.median(final_loss(ds, found["post-LN"], False)))
        post_warm = float(np.median(final_loss(ds, found["post-LN"], True)))
        pre_cold = float(np.median(final_loss(ds, found["pre-LN"], False)))
        lr = cfg["optim"]["lr"]
        out.append(Check(f"Post-LN, {cfg['optim']['name']} lr {lr:g}: final loss without / with warmup",
                         post_cold / post_warm, f">= {WORSE:g} (warmup needed)", post_cold / post_warm >= WORSE))
        if np.isfinite(chance):
            out.append(Check(f"Pre-LN, lr {lr:g}, no warmup: final loss / best constant's", pre_cold / chance,
                             f"<= {FINE:g} (trains without warmup)", pre_cold / chance <= FINE))
    for label in ("pre-BN", "post-BN"):
        if label in found and "bn_in_mean" in ds:
            ratio, err = bn_closed_form_error(ds, found[label])
            out.append(Check(f"{label}: training-mode output batch mean 0, var v/(v+eps) at init; "
                             f"max |err| {err:.1e} / float32 bound", ratio, "<= 1", ratio <= 1.0))
            ratio, rel = bn_ema_error(ds, found[label])
            out.append(Check(f"{label}: running stats vs numpy EMA of the batch moments; max rel err {rel:.1e}, "
                             "|err| / float32 bound", ratio, "<= 1", ratio <= 1.0))
    return out



# ----------------------------------------------------------------------------- figures


def _found(ds) -> dict:
    return {c.name: c for c in checks(ds)}


def _profile_panel(ax, ds, sel, title):
    depths = probe_depths(ds)
    profile = ds["init_grad_norm"].sel(sel).isel({"step": 0, "warmup": 0, "model.depth": 0})
    profile = profile.transpose("seed", "probe_depth", "layer").values.astype(float)
    colors = plotting.matplotlib.colormaps["viridis"](np.linspace(0.0, 0.85, len(depths)))
    for i, depth in enumerate(depths):
        layers = np.arange(depth + 2)
        g = profile[:, i, :].copy()
        g[:, depth + 1] = g[:, -1]  # the readout sits after the last active block
        plotting.band(ax, layers / (depth + 1), g[:, : depth + 2], f"L = {depth}", color=colors[i])
    ax.set(yscale="log", xlabel="layer l / (L + 1)   (0: input projection, 1: readout)",
           ylabel=r"$\|\partial L/\partial W_l\|_F$ at init", title=title)


def figures(ds) -> dict:
    ds = results.with_axes(ds, AXES)
    cfg = results.config_of(ds)["config"]
    found, labels = _found(ds), dict(variants(ds))
    depths = probe_depths(ds)
    fig, axes = plotting.figure(2, 3, width=3.9, height=3.1)
    for col, label in enumerate(("pre-LN", "post-LN")):
        ax = axes[0, col]
        if label in labels:
            _profile_panel(ax, ds, labels[label], f"{label}: per-layer gradient at init")
            ax.legend(loc="lower right" if col == 0 else "upper left", fontsize=6.5, ncol=2, frameon=False)
        else:
            ax.axis("off")
    # The last block's gradient against depth.
    ax = axes[0, 2]
    for i, (label, sel) in enumerate(labels.items()):
        plotting.band(ax, depths, probe_table(ds, "init_last_grad", sel), label, color=plotting.COLORS[i % 8])
    ax.plot(depths, np.median(probe_table(ds, "init_last_grad", labels.get("pre-LN", next(iter(labels.values())))
                                          )[:, 0]) * np.sqrt((depths[0] + 1) / (depths + 1)),
            "k--", lw=0.9, label="(L+1)^-1/2")
    ax.set(xscale="log", yscale="log", xlabel="depth L", ylabel=r"last block $\|\partial L/\partial W_L\|_F$ at init",
           title="last block's gradient against depth")
    ax.set_xticks(depths, [str(d) for d in depths])
    ax.minorticks_off()
    lines = [f"{c.name.split(':')[0]}: {'ratio ' if 'W_out' in c.name else ''}slope {c.measured:+.2f} "
             f"({c.expected.split(' (')[0]})" for c in found.values() if "d ln L" in c.name]
    if lines:
        plotting.note(ax, "\n".join(lines), loc="lower left")
    ax.legend(loc="upper right", fontsize=6.5, frameon=False, ncol=2)
    lo, hi = ax.get_ylim()
    ax.set_ylim(lo / (hi / lo) ** 1.2, hi * (hi / lo) ** 0.3)
    # Loss curves with and without warmup.
    chance = constant_loss(cfg["data"])
    ax = axes[1, 0]
    lr, name = cfg["optim"]["lr"], cfg["optim"]["name"]
    for i, label in enumerate(("pre-LN", "post-LN")):
        if label not in labels:
            continue
        for warm in sorted({bool(w) for w in ds["warmup"].values}):
            loss = ds["loss"].sel({**labels[label], "warmup": warm}).isel({"model.depth": 0})
            loss = loss.transpose("seed", "step").values.astype(float)
            ax.plot(np.median(loss, axis=0), color=plotting.COLORS[i], ls="-" if warm else ":",
                    label=f"{label}, {'warmup' if warm else 'no warmup'}")
    if np.isfinite(chance):
        ax.axhline(chance, color="0.4", lw=0.8, ls="--", label="best constant")
    ax.set(yscale="log", xlabel="step", ylabel="training loss (median over seeds)",
           title=f"{name} lr {lr:g}, depth {int(ds['model.depth'].values[0])}, warmup {cfg['optim']['warmup_steps']} steps")
    ax.legend(fontsize=6.5, frameon=False, loc="lower left")
    key = next((c for c in found.values() if c.name.startswith("Post-LN, ")), None)
    if key is not None:
        plotting.note(ax, f"Post-LN final loss\nno warmup / warmup = {key.measured:.2g}\n({key.expected.split(' (')[0]})",
                      loc="upper right")
    # Final loss of every variant, with and without warmup.
    ax = axes[1, 1]
    width = 0.38
    for j, warm in enumerate(sorted({bool(w) for w in ds["warmup"].values})):
        finals = [float(np.median(final_loss(ds, sel, warm))) for sel in labels.values()]
        shown = [f if np.isfinite(f) else np.nan for f in finals]
        x = np.arange(len(labels)) + (j - 0.5) * width
        ax.bar(x, shown, width, color=plotting.COLORS[2 + j], label="warmup" if warm else "no warmup")
        for xi, f in zip(x, finals):
            if not np.isfinite(f):
                ax.text(xi, 1.0, "x", ha="center", color="#d1495b")
    if np.isfinite(chance):
        ax.axhline(chance, color="0.4", lw=0.8, ls="--")
    ax.set_xticks(np.arange(len(labels)), list(labels), rotation=30, fontsize=7.5)
    ax.set(yscale="log", ylabel=f"final training loss (last {TAIL} steps)", title="every variant, same lr")
    ax.legend(fontsize=7, frameon=False)
    # BatchNorm with tiny batches: train (batch statistics) vs eval (running averages).
    ax = axes[1, 2]
    _bn_gap_panel(ax, ds, labels)
    fig.suptitle(f"Normalization: residual {cfg['model']['activation']} MLP, width {cfg['model']['width']}, "
                 f"final norm {'on' if cfg['model']['final_norm'] else 'off'}; "
                 f"{ds.sizes['seed'] * cfg['probe_seeds']} inits per depth at init, {ds.sizes['seed']} seeds trained",
                 fontsize=10)
    out = {"": fig}
    if any(label.endswith("BN") for label in labels) and "bn_in_mean" in ds:
        out["batchnorm"] = _bn_figure(ds, labels, found)
    return out


def _bn_final(ds, sel, name):
    """(batch size, seed) final bn_loss / bn_eval_loss with warmup (or the only warmup value)."""
    warm = bool(np.max(ds["warmup"].values))
    x = final_loss(ds, sel, warm, name)  # (seed, bn_batch)
    return x.T


def _bn_gap_panel(ax, ds, labels):
    sizes = np.asarray(bn_sizes_of(ds))
    shown = False
    for i, label in enumerate(("pre-BN", "post-BN")):
        if label not in labels or "bn_loss" not in ds:
            continue
        shown = True
        train = np.median(_bn_final(ds, labels[label], "bn_loss"), axis=1)
        evals = np.median(_bn_final(ds, labels[label], "bn_eval_loss"), axis=1)
        color = plotting.COLORS[4 + i]
        ax.plot(sizes, train, "o-", color=color, label=f"{label} train (batch stats)")
        ax.plot(sizes, evals, "s--", color=color, label=f"{label} eval (running stats)")
        ax.text(sizes[0], evals[0], f" x{evals[0] / train[0]:.2g}", fontsize=7, color=color, va="bottom")
    if not shown:
        ax.axis("off")
        return
    ax.set(xscale="log", yscale="log", xlabel="batch size B (BatchNorm statistics over B rows)",
           ylabel=f"final loss (last {TAIL} steps)", title="BatchNorm: train vs eval by batch size")
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.legend(fontsize=6.5, frameon=False, loc="upper right")
    plotting.note(ax, "x: eval / train at the smallest B", loc="lower left")


def _bn_figure(ds, labels, found):
    sizes = bn_sizes_of(ds)
    fig, axes = plotting.figure(1, 3, width=4.2, height=3.3)
    label = "pre-BN" if "pre-BN" in labels else "post-BN"
    sel = {**labels[label], "warmup": bool(np.max(ds["warmup"].values))}
    ax = axes[0, 0]
    colors = plotting.matplotlib.colormaps["plasma"](np.linspace(0.0, 0.8, len(sizes)))
    smooth = np.ones(TAIL // 2) / (TAIL // 2)
    for j, b in enumerate(sizes):
        for name, ls in (("bn_loss", "-"), ("bn_eval_loss", "--")):
            x = ds[name].sel(sel).isel({"model.depth": 0, "bn_batch": j}).transpose("seed", "step").values.astype(float)
            ax.plot(np.convolve(np.median(x, axis=0), smooth, mode="valid"), color=colors[j], ls=ls,
                    label=f"B={b}" if name == "bn_loss" else None)
    ax.set(yscale="log", xlabel="step", ylabel="loss (moving average)",
           title=f"{label}: train (solid), eval (dashed)")
    ax.legend(fontsize=7, frameon=False)
    # Running mean of one feature against the numpy exponential average of the recorded batch means.
    ax = axes[0, 1]
    momentum = results.config_of(ds)["config"]["bn_momentum"]
    one = {**sel, "seed": ds["seed"].values[0]}
    for j, b in enumerate(sizes):
        batch_mean = ds["bn_in_mean"].sel(one).isel({"model.depth": 0, "bn_batch": j, "feature": 0}).values.astype(float)
        running = ds["bn_running_mean"].sel(one).isel({"model.depth": 0, "bn_batch": j, "feature": 0}).values
        ref = ema_reference(batch_mean, 0.0, momentum)
        steps = np.arange(len(ref))
        ax.plot(steps, batch_mean, color=colors[j], lw=0.5, alpha=0.35)
        ax.plot(steps, running, color=colors[j], lw=1.3, label=f"B={b}")
        ax.plot(steps[::6], ref[::6], "o", color=colors[j], ms=2.5, mfc="none")
    ax.set(xlabel="step", ylabel="block 1 BatchNorm input, feature 0",
           title=f"running mean vs numpy EMA (o), m={momentum:g}")
    c = next((c for c in found.values() if c.name.startswith(f"{label}: running stats")), None)
    text = "faint: batch means"
    if c is not None:
        text += f"\nmax rel. err {bn_ema_error(ds, labels[label])[1]:.1e}\n(|err| / bound {c.measured:.2g} <= 1)"
    plotting.note(ax, text, loc="lower left")
    ax.legend(fontsize=7, frameon=False, loc="upper right")
    # Closed form: the training-mode output's batch variance against v / (v + eps).
    ax = axes[0, 2]
    for j, b in enumerate(sizes):
        v = ds["bn_in_var"].sel(sel).isel({"model.depth": 0, "bn_batch": j, "step": 0}).values.astype(float).ravel()
        out = ds["bn_out_var"].sel(sel).isel({"model.depth": 0, "bn_batch": j, "step": 0}).values.astype(float).ravel()
        ax.plot(v, out - v / (v + BN_EPS), ".", color=colors[j], ms=3, label=f"B={b}")
    ratio, err = bn_closed_form_error(ds, labels[label])
    ax.set(xscale="log", xlabel="input batch variance v (per feature, step 0)",
           ylabel="output batch var - v/(v+eps)", title="at init: var = v/(v+eps), mean 0")
    plotting.note(ax, f"max |error| of mean and var: {err:.1e}\n(|err| / float32 bound {ratio:.2g} <= 1)",
                  loc="upper right")
    ax.legend(fontsize=7, frameon=False, loc="lower right")
    fig.suptitle(f"flax BatchNorm ({label}) with tiny batches: rows masked out of a minibatch of {sizes[-1]}",
                 fontsize=10)
    return fig
