"""An MLP with BatchNorm (Ioffe & Szegedy 2015) as its norm, as pure init/apply functions.

The layout, init, residual rule and depth mask are models.py's (input projection, `depth` hidden
blocks under lax.scan, linear readout), with flax.linen.BatchNorm where models.py has a per-example
norm, r = 1 for residual nets and 0 otherwise:
  pre:  h <- r h + act(W BN(h) + b)        post: h <- BN(r h + act(W h + b))
and with spec.final_norm one more BN before the readout. In training mode BN normalises each feature
with the mean mu_B and biased variance v_B of the batch's rows where `mask` is true (Algorithm 1):
  BN(x) = scale (x - mu_B) / sqrt(v_B + eps) + bias,
and updates its running averages s <- m s + (1 - m) stat_B (flax's momentum m; the variance stays
biased, without Algorithm 2's B / (B - 1)); in inference mode the running averages replace mu_B, v_B.
Masking rows is training on fewer of them: a net under mask[:B] equals one fed the first B rows.
`net` puts this net and models.py's behind one signature, so `trial` trains any norm: one net per
batch size (batch_sizes), vmapped over row masks, with its running statistics, and the per-layer
gradients at init over a range of depths (init_gradients).
`statistics_errors` holds the recorded statistics to their closed forms within flax's float32 error.

References: Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network Training by
Reducing Internal Covariate Shift", Algorithms 1 and 2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradlab import analysis, data, models, telemetry, transforms, trials
from gradlab.engine import Trial

EPS = 1e-5  # flax.linen.BatchNorm's default epsilon
ULP = float(np.finfo(np.float32).eps) / 2  # float32 unit roundoff, 2^-24
MOMENTS = ("in_mean", "in_var", "out_mean", "out_var", "running_mean", "running_var")  # trial: bn_<name>


class _Block(nn.Module):
    """One hidden block with flax's BatchNorm; returns (h, the BatchNorm's input, its output)."""

    width: int
    activation: str
    position: str
    momentum: float
    train: bool

    @nn.compact
    def __call__(self, h, residual, leaky_slope, mask):
        act = models.activation_fn(self.activation, leaky_slope)
        bn = nn.BatchNorm(use_running_average=not self.train, momentum=self.momentum, epsilon=EPS, name="bn")
        dense = nn.Dense(self.width, name="dense")
        if self.position == "pre":
            z = bn(h, mask=mask[:, None])
            return residual * h + act(dense(z)), h, z
        u = residual * h + act(dense(h))
        out = bn(u, mask=mask[:, None])
        return out, u, out


def init(key, spec: models.MLPSpec, hyper: models.MLPHyper) -> tuple[dict, dict]:
    """(params, batch_stats): the weights models.init draws for the same key, BatchNorm scale 1 and
    bias 0, running mean 0 and variance 1 (flax's initial values)."""
    params = models.init(key, dataclasses.replace(spec, norm="layernorm"), hyper)
    d, w = spec.depth, spec.width
    stats = {"hidden": {"mean": jnp.zeros((d, w)), "var": jnp.ones((d, w))}}
    if spec.final_norm:
        stats["final"] = {"mean": jnp.zeros((w,)), "var": jnp.ones((w,))}
    return params, stats


def masked_moments(x, mask) -> tuple[jax.Array, jax.Array]:
    """Per-feature mean and biased variance over the rows where mask is true (two-pass)."""
    weight = mask.astype(jnp.float32)[:, None] * jnp.ones((1, x.shape[1]))
    count = jnp.sum(weight, axis=0)
    mean = jnp.sum(weight * x, axis=0) / count
    var = jnp.sum(weight * jnp.square(x - mean[None]), axis=0) / count
    return mean, var


def apply(params, stats, x, mask, spec: models.MLPSpec, hyper: models.MLPHyper, train: bool, momentum: float):
    """Forward pass on the rows of x (batch, in_dim) where mask is true (training mode) or on all
    rows with the running averages (inference mode).

    Returns:
      (out, new batch_stats, moments): moments are the first block's BatchNorm input's and output's
      per-feature mean and variance over the masked rows (masked_moments), in training mode.
    """
    act = models.activation_fn(spec.activation, hyper.leaky_slope)
    block = _Block(spec.width, spec.activation, spec.norm_position, momentum, train)
    residual = jnp.asarray(hyper.residual).astype(jnp.float32)
    mutable = ["batch_stats"] if train else False
    h = act(x @ params["input"]["w"] + params["input"]["b"][None])

    def body(h, layer):
        index, p, s = layer
        variables = {
            "params": {"dense": {"kernel": p["w"], "bias": p["b"]}, "bn": {"scale": p["scale"], "bias": p["bias"]}},
            "batch_stats": {"bn": s},
        }
        result = block.apply(variables, h, residual, hyper.leaky_slope, mask, mutable=mutable)
        # flax types apply's result as one union of `out` and `(out, updated)`; `mutable` decides which.
        (new, bn_in, bn_out), updated = result if train else (cast(tuple, result), {"batch_stats": {"bn": s}})
        active = index < hyper.depth
        new = jnp.where(active, new, h)
        s = jax.tree.map(lambda n, o: jnp.where(active, n, o), updated["batch_stats"]["bn"], s)
        return new, (s, (*masked_moments(bn_in, mask), *masked_moments(bn_out, mask)))

    layers = (jnp.arange(spec.depth), params["hidden"], stats["hidden"])
    h, (hidden_stats, moments) = jax.lax.scan(body, h, layers)
    new_stats = {"hidden": hidden_stats}
    if spec.final_norm:
        bn = nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=EPS)
        variables = {"params": params["final"], "batch_stats": stats["final"]}
        result = bn.apply(variables, h, mask=mask[:, None], mutable=mutable)
        h, updated = result if train else (result, {"batch_stats": stats["final"]})
        new_stats["final"] = updated["batch_stats"]
    out = h @ params["output"]["w"] + params["output"]["b"][None]
    return out, new_stats, jax.tree.map(lambda m: m[0], moments)


def masked_loss(data_cfg, out, y, mask):
    """data.loss over the rows where mask is true: mean squared error or softmax cross-entropy."""
    if data.kind(data_cfg) == "classification":
        per_row = optax.softmax_cross_entropy_with_integer_labels(out, y)
    else:
        per_row = jnp.mean(jnp.square(out - y), axis=-1)
    weight = mask.astype(jnp.float32)
    return jnp.sum(weight * per_row) / jnp.sum(weight)


class Net(NamedTuple):
    """init(key, hyper) -> (params, stats); apply(params, stats, x, mask, hyper, train) -> (out, stats, moments)."""

    init: Callable
    apply: Callable


def net(spec: models.MLPSpec, momentum: float) -> Net:
    """Any norm's net behind this module's signature, so one training loop runs them all: BatchNorm's
    for spec.norm == "batchnorm", else models.py's with no statistics ({}) and no moments (None),
    the same in training and inference."""
    if spec.norm == "batchnorm":
        return Net(
            lambda key, hyper: init(key, spec, hyper),
            lambda p, s, x, mask, hyper, train: apply(p, s, x, mask, spec, hyper, train, momentum),
        )

    def per_example(p, s, x, mask, hyper, train):
        del mask, train  # per-example norms: no batch statistics
        return models.apply(p, x, spec, hyper)[0], s, None

    return Net(lambda key, hyper: (models.init(key, spec, hyper), {}), per_example)


# ----------------------------------------------------------------------------- training (a Trial)


def batch_sizes(batches, batch_size: int, examples: int) -> tuple[int, ...]:
    """The batch sizes `trial` trains side by side for a batchnorm net, ascending: `batches` and the
    whole minibatch, the last (batch_size rows; every example when batch_size is 0 or >= examples)."""
    return tuple(sorted(set(batches) | {batch_size if 0 < batch_size < examples else examples}))


def config_net(cfg, depth: int) -> Net:
    """The config's net (trials.mlp_spec, any norm; momentum cfg.bn_momentum) at a static maximum depth."""
    return net(dataclasses.replace(trials.mlp_spec(cfg), depth=depth), cfg.bn_momentum)


def init_gradients(cfg, hp, key, batch: data.Data):
    """Per-layer weight-gradient norms at init (telemetry.frobenius per models.per_layer entry), shape
    (probe depth, probe seed, layer): the config's net at each of cfg.probe_depths (a traced depth mask
    over one net of the deepest), cfg.probe_seeds inits each, on `batch` in training mode. Exactly 0
    for the blocks beyond a depth (the mask passes h through them), so the state stays finite."""
    model = config_net(cfg, max(cfg.probe_depths))
    mask = jnp.ones(batch.x.shape[0], bool)

    def one(depth, k):
        hyper = models.MLPHyper.from_hp({**hp, "model.depth": depth})
        params, stats = model.init(k, hyper)

        def loss_fn(p):
            out, _, _ = model.apply(p, stats, batch.x, mask, hyper, True)
            return masked_loss(cfg.data, out, batch.y, mask)

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
    """Train the net (for batchnorm: one per batch size of batch_sizes, vmapped over row masks) and record,
    before each update: loss (training mode, on the rows it trains on), eval_loss (inference mode, on
    the whole minibatch), lr; init_grad_norm (probe depth, layer; geometric mean over probe seeds),
    init_last_grad and init_readout_grad (probe depth, probe seed) at init. Batchnorm adds bn_loss and
    bn_eval_loss per batch size and the first block's bn_<MOMENTS> (bn_batch, feature).

    cfg is an ExperimentConfig (model with any norm of models.py or batchnorm, data, optim, steps) with
    bn_batches, bn_momentum, probe_depths and probe_seeds; the traced hyperparameter `warmup` turns a
    linear warmup over optim.warmup_steps on or off. Not trials.supervised_mlp: a batchnorm net carries
    running statistics beside its parameters, and one net per batch size trains side by side."""
    total = cfg.steps
    model = config_net(cfg, cfg.model.depth)
    is_bn = cfg.model.norm == "batchnorm"
    sizes = batch_sizes(cfg.bn_batches if is_bn else (), cfg.data.batch_size, cfg.data.examples)
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
        grads = init_gradients(cfg, hp, k_probe, data.batch(train, cfg.data, jnp.int32(0), k_batches))
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
                return masked_loss(cfg.data, out, batch.y, mask), (new_stats, moments)

            (loss, (new_stats, moments)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
            out, _, _ = model.apply(params, stats, batch.x, everything, hyper, False)
            eval_loss = masked_loss(cfg.data, out, batch.y, everything)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, jax.tree.map(lambda u: factor * u, updates))
            metrics = {"loss": loss, "eval_loss": eval_loss, "grad_global_norm": telemetry.global_norm(grads)}
            if is_bn:
                first = new_stats["hidden"]
                metrics.update(
                    {f"bn_{k}": v for k, v in zip(MOMENTS, moments)},
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
        **{f"bn_{k}": ("bn_batch", "feature") for k in MOMENTS},
    }
    return Trial(init, step, dims)


# ----------------------------------------------------------------------------- statistics (numpy)


def statistics_errors(moments: dict, sizes, momentum: float) -> tuple[float, float, float, float]:
    """The first block's recorded BatchNorm statistics against their closed forms (numpy).

    Args:
      moments: arrays (step, ..., batch size, feature) of the BatchNorm's input and output batch
        moments (masked_moments, two-pass) and its running averages after each step: in_mean, in_var,
        out_mean, out_var, running_mean, running_var.
      sizes: the batch size (rows) of each entry of the batch size axis.
      momentum: the running averages' m.

    Returns:
      (max |error| / its float32 bound, max |error|) of the training-mode output's batch mean (0) and
      variance (v / (v + eps), v the input's batch variance) at init (step 0), and (the same, max
      relative error) of the running mean and variance against a float64 exponential average of the
      input's batch moments.

    flax reduces E[x^2] - E[x]^2 in float32: over B rows its mean and variance carry up to ~B u E[x^2]
    (u = 2^-24), which moves the output's mean by B u sqrt(E[x^2] / (v + eps)) and its variance by
    B u E[x^2] / (v + eps); an average with weights summing to <= 1 keeps that size. The bounds are 16
    times that (and 1e-6 for the sums at init).
    """
    x = {k: np.asarray(v, float) for k, v in moments.items()}
    ulps = 16 * np.asarray(sizes, float)[:, None] * ULP
    v = x["in_var"][0]
    r = (np.square(x["in_mean"][0]) + v) / (v + EPS)
    mean_err, var_err = np.abs(x["out_mean"][0]), np.abs(x["out_var"][0] - v / (v + EPS))
    closed = max(np.nanmax(mean_err / (ulps * np.sqrt(r) + 1e-6)), np.nanmax(var_err / (ulps * r + 1e-6)))
    scale = np.max(np.square(x["in_mean"]) + x["in_var"], axis=0)  # max over steps of E[x^2]
    worst, rel = 0.0, 0.0
    for stat, start in (("mean", 0.0), ("var", 1.0)):
        ref = analysis.exponential_average(x[f"in_{stat}"], start, momentum)
        err = np.abs(x[f"running_{stat}"] - ref)
        worst = max(worst, float(np.nanmax(err / (ulps * np.maximum(scale, 1.0)))))
        rel = max(rel, float(np.nanmax(err / np.maximum(np.abs(ref), 1e-3))))
    return float(closed), float(max(np.nanmax(mean_err), np.nanmax(var_err))), worst, rel
