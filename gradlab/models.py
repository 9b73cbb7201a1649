"""Deep MLPs as pure functions over explicit parameter pytrees.

Layout (L = depth + 2 weight layers; telemetry's `layer` axis follows it):
  layer 0            input projection  h = act(x W + b)
  layers 1..depth    hidden blocks, stacked on a leading depth axis; run as straight-line code
                     up to 16 of them and under lax.scan beyond (model.unroll, auto_unroll)
  layer depth + 1    linear readout

A hidden block is, with r = 1 for residual nets and 0 otherwise,
  pre-norm:  h <- r h + act(W norm(h) + b)
  post-norm: h <- norm(r h + act(W h + b))
and a block at index >= the (traced) active depth passes h through unchanged, so depth can
be a vmapped sweep axis under one compile. With `final_norm` (and a norm) the last hidden state
is normalised once more before the readout, as in Pre-LN transformers; with `remat` each block
is wrapped in jax.checkpoint, trading recomputation for activation memory.

A parametrization (gradlab/parametrization.py: NTK, muP, depth-muP) adds numbers to MLPHyper, traced
or constant: a multiplier on each layer kind's init std, forward multipliers on W's product
(h <- act(a_l (h W) + b)) and on a residual block's branch (h <- h + beta act(...)). Under the
standard parametrization all are a constant 1 and cost nothing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import inits, sums
from gradlab.norms import apply_norm, at_least_f32

STRAIGHT_LINE_DEPTH = 16
ACTIVATIONS = ("tanh", "relu", "leaky_relu", "gelu", "sigmoid", "linear")  # activation_fn's names
DTYPES = ("float32", "bfloat16", "float16")  # compute dtypes of apply; params stay float32


def auto_unroll(depth: int) -> int:
    """model.unroll 0: straight-line blocks up to 16 hidden layers, a scan beyond.

    Straight-line blocks ran workload W (15 hidden layers) 1.2x faster than the scan on XLA:CPU;
    the scan keeps compile time flat in depth (benchmarks/compile_vs_depth.py). On W alone,
    straight-line blocks up to depth 64 would also do (compile(64) / compile(8) = 1.85), but the
    experiments pay for it: with a limit of 64, `depth_sweep` (depth traced up to 64, per-layer
    telemetry) compiled in 106 s instead of 10 s and ran 87 s instead of 29 s, and
    `gradient_flow` compiled in 79 s instead of 27 s.
    """
    return depth if depth <= STRAIGHT_LINE_DEPTH else 1


@dataclass(frozen=True)
class MLPSpec:
    """What fixes the program: shapes, activation, norm; static under jit."""

    in_dim: int
    out_dim: int
    depth: int
    width: int
    activation: str = "tanh"
    norm: str = "none"
    norm_position: str = "pre"
    dtype: str = "float32"
    unroll: int = 1
    final_norm: bool = False
    remat: bool = False

    @classmethod
    def from_config(cls, model, in_dim: int, out_dim: int) -> MLPSpec:
        return cls(
            in_dim=in_dim,
            out_dim=out_dim,
            depth=model.depth,
            width=model.width,
            activation=model.activation,
            norm=model.norm,
            norm_position=model.norm_position,
            dtype=model.dtype,
            unroll=model.unroll or auto_unroll(model.depth),
            final_norm=model.final_norm,
            remat=model.remat,
        )

    @property
    def layers(self) -> int:
        return self.depth + 2

    @property
    def unrolled(self) -> bool:
        """Hidden blocks as straight-line code instead of lax.scan (unroll >= depth).

        A scan stacks each block's residuals for the backward pass, zero-fills those stacks and
        copies the weights into its own layout on every step; unrolled blocks skip all three.
        On XLA:CPU that is 25% of workload W's step (benchmarks/compile_vs_depth.py). Compile
        time grows with depth instead.
        """
        return self.unroll >= self.depth


class MLPHyper(NamedTuple):
    """The numbers that may vary inside one compiled program (traced under vmap)."""

    depth: jax.Array | int
    residual: jax.Array | bool
    init: jax.Array | int
    init_std: jax.Array | float
    init_gain: jax.Array | float
    bias_std: jax.Array | float
    leaky_slope: jax.Array | float
    # The parametrization's numbers (gradlab/parametrization.py; 1: the standard parametrization).
    input_init: jax.Array | float = 1.0  # multiplies the input projection's init std
    hidden_init: jax.Array | float = 1.0  # ... the hidden blocks' weights' init std
    output_init: jax.Array | float = 1.0  # ... the readout's init std
    hidden_multiplier: jax.Array | float = 1.0  # forward multiplier of h @ W in every hidden block
    output_multiplier: jax.Array | float = 1.0  # ... of h @ W_out in the readout
    branch_multiplier: jax.Array | float = 1.0  # residual blocks: h + branch_multiplier * act(...)

    @classmethod
    def from_hp(cls, hp: dict, prefix: str = "model.") -> MLPHyper:
        """The config's numbers from a sweep point; the parametrization's are SP's (Parametrized.hyper sets them)."""
        return cls(*(hp[prefix + name] for name in CONFIG_FIELDS))

    @classmethod
    def from_config(cls, model) -> MLPHyper:
        values = {name: getattr(model, name) for name in CONFIG_FIELDS}
        values["init"] = inits.scheme_index(model.init)
        return cls(**values)


CONFIG_FIELDS = ("depth", "residual", "init", "init_std", "init_gain", "bias_std", "leaky_slope")  # model.<name>


def _scaled(x, scale):
    """x * scale, or x itself where scale is a constant 1 (the standard parametrization: no op)."""
    if _concrete(scale) and scale == 1:
        return x
    return x * jnp.asarray(scale).astype(x.dtype)


def _concrete(value) -> bool:
    """A Python or numpy number (a constant of the compiled group), not a traced array."""
    return isinstance(value, (bool, int, float, np.number, np.bool_))


def _unstack(tree, n: int) -> list:
    """n trees, the i-th holding slice i of every leaf's leading axis.

    By jnp.split, not a[i]: the gradient of a split is one concatenate, that of indexing a padded
    add per slice.
    """
    leaves, treedef = jax.tree.flatten(tree)
    parts = [jnp.split(leaf, n) for leaf in leaves]
    return [treedef.unflatten([jnp.squeeze(part[i], 0) for part in parts]) for i in range(n)]


def activation_fn(name: str, leaky_slope: jax.Array | float = 0.01):
    table = {
        "tanh": jnp.tanh,
        "relu": jax.nn.relu,
        "leaky_relu": lambda x: jnp.where(x >= 0, x, leaky_slope * x),
        "gelu": jax.nn.gelu,
        "sigmoid": jax.nn.sigmoid,
        "linear": lambda x: x,
    }
    return table[name]


def init(key, spec: MLPSpec, hyper: MLPHyper) -> dict:
    """Parameters of an MLP, float32, under the (possibly traced) init scheme in `hyper`."""
    d, w, n_in, n_out = spec.depth, spec.width, spec.in_dim, spec.out_dim

    def weight(z, scale):
        return _scaled(inits.weight_from_normal(z, hyper.init, hyper.init_std, hyper.init_gain), scale)

    # One random draw, split: every jax.random call adds about half a second of compile time.
    sizes = [n_in * w, d * w * w, w * n_out, w, d * w, n_out]
    z = jnp.split(jax.random.normal(key, (sum(sizes),)), np.cumsum(sizes)[:-1])
    hidden_w = jax.vmap(weight, (0, None))(z[1].reshape(d, w, w), hyper.hidden_init)
    hidden = {"w": hidden_w, "b": hyper.bias_std * z[4].reshape(d, w)}
    if spec.norm != "none":
        hidden["scale"] = jnp.ones((d, w))
        hidden["bias"] = jnp.zeros((d, w))
    params = {
        "input": {"w": weight(z[0].reshape(n_in, w), hyper.input_init), "b": hyper.bias_std * z[3]},
        "hidden": hidden,
        "output": {"w": weight(z[2].reshape(w, n_out), hyper.output_init), "b": hyper.bias_std * z[5]},
    }
    if spec.final_norm and spec.norm != "none":
        params["final"] = {"scale": jnp.ones((w,)), "bias": jnp.zeros((w,))}
    return params


def zero_probes(spec: MLPSpec, batch: int, dtype=jnp.float32) -> dict:
    """Zeros added to every layer's output; the gradient w.r.t. them is dL/dh per layer.

    "hidden" is one (depth, batch, width) array for a scan, and a tuple of depth (batch, width)
    arrays for straight-line blocks: there the gradient of a stacked probe would be a concatenate
    of every layer's dL/dh, about 4% of workload W's step with telemetry. `apply` and `probe_rms`
    take either form; `hidden_stack` gives the stacked one.
    """
    if spec.unrolled:
        hidden = tuple(jnp.zeros((batch, spec.width), dtype) for _ in range(spec.depth))
    else:
        hidden = jnp.zeros((spec.depth, batch, spec.width), dtype)
    return {
        "input": jnp.zeros((batch, spec.width), dtype),
        "hidden": hidden,
        "output": jnp.zeros((batch, spec.out_dim), dtype),
    }


def _layered(hidden) -> bool:
    """Hidden probes (or their gradients) as one array per layer, not one stack."""
    return isinstance(hidden, (tuple, list))


def hidden_stack(probes: dict) -> jax.Array:
    """The hidden layers' probes (or their gradients) as one (depth, batch, width) array."""
    hidden = probes["hidden"]
    return jnp.stack(hidden) if _layered(hidden) else hidden


def _layer_taps(h, pre) -> dict:
    h32, pre32 = at_least_f32(h), at_least_f32(pre)
    mean = sums.total(h32) / h32.size
    var = sums.sum_of_squares(h32 - mean) / h32.size  # two passes: no cancellation when |mean| >> std
    return {  # sums as dots: XLA:CPU's reductions of a vmapped activation are several times slower
        "act_rms": jnp.sqrt(var + jnp.square(mean)),  # mean(h^2) = var + mean^2: one sum fewer per layer
        "act_std": jnp.sqrt(var),
        "preact_rms": jnp.sqrt(sums.sum_of_squares(pre32) / pre32.size),
        # A unit whose pre-activation is <= 0 on every example of the batch (dead for ReLU).
        "dead_frac": jnp.mean(jnp.all(pre32 <= 0, axis=0).astype(jnp.float32)),
    }


def apply(params: dict, x, spec: MLPSpec, hyper: MLPHyper, probes: dict | None = None):
    """Forward pass on a batch x of shape (batch, in_dim).

    Returns:
      (out, taps): out of shape (batch, out_dim); taps a dict of per-layer statistics, each of
      shape (spec.layers,): act_rms, act_std, preact_rms, dead_frac.
    """
    dtype = jnp.dtype(spec.dtype)
    act = activation_fn(spec.activation, hyper.leaky_slope)
    p = jax.tree.map(lambda a: a.astype(dtype), params)
    probed = probes is not None
    if not probed:  # no zeros to add; the scan carries a dummy per layer
        probes = {"input": 0.0, "hidden": jnp.zeros((spec.depth,), dtype), "output": 0.0}
    residual = hyper.residual
    all_active = _concrete(hyper.depth) and hyper.depth >= spec.depth
    pre_norm = spec.norm != "none" and spec.norm_position == "pre"
    post_norm = spec.norm != "none" and spec.norm_position == "post"

    pre = x.astype(dtype) @ p["input"]["w"] + p["input"]["b"][None]
    h = act(pre) + probes["input"].astype(dtype) if probed else act(pre)
    taps_in = _layer_taps(h, pre)

    def block(h, layer):
        index, lp, probe = layer
        z = apply_norm(spec.norm, h, lp) if pre_norm else h
        pre = _scaled(z @ lp["w"], hyper.hidden_multiplier) + lp["b"][None]
        if _concrete(residual):  # a constant of the group: no multiply by 0 or 1 on every step
            new = h + _scaled(act(pre), hyper.branch_multiplier) if residual else act(pre)
        else:
            branch = hyper.branch_multiplier
            if not (_concrete(branch) and branch == 1):  # a plain (non-residual) lane keeps its act(pre)
                branch = jnp.where(residual, branch, 1.0)
            new = jnp.asarray(residual).astype(dtype) * h + _scaled(act(pre), branch)
        if post_norm:
            new = apply_norm(spec.norm, new, lp)
        if not all_active:
            new = jnp.where(index < hyper.depth, new, h)
        if probed:
            new = new + probe.astype(dtype)
        return new, _layer_taps(new, pre)

    if spec.remat:  # recompute each block's activations in the backward pass instead of storing them
        block = jax.checkpoint(block)
    if spec.unrolled:
        taps = []
        per_layer_probes = probes["hidden"]
        if not _layered(per_layer_probes):
            per_layer_probes = _unstack(per_layer_probes, spec.depth)
        for i, (lp, probe) in enumerate(zip(_unstack(p["hidden"], spec.depth), per_layer_probes)):
            h, tap = block(h, (i, lp, probe))
            taps.append(tap)
        taps_hidden = jax.tree.map(lambda *t: jnp.stack(t), *taps)
    else:
        layers = (jnp.arange(spec.depth), p["hidden"], hidden_stack(probes))
        h, taps_hidden = jax.lax.scan(block, h, layers, unroll=spec.unroll)
    if "final" in p:
        h = apply_norm(spec.norm, h, p["final"])
    out = _scaled(h @ p["output"]["w"], hyper.output_multiplier) + p["output"]["b"][None]
    if probed:
        out = out + probes["output"].astype(dtype)
    taps_out = _layer_taps(out, out)
    taps = {k: jnp.concatenate([taps_in[k][None], taps_hidden[k], taps_out[k][None]]) for k in taps_in}
    return at_least_f32(out), taps


def per_layer(tree: dict, reduce) -> jax.Array:
    """Apply `reduce` (array -> scalar) to each layer's weight matrix: shape (layers,)."""
    return per_layer_rows(tree, jax.vmap(reduce))


def per_layer_rows(tree: dict, rows) -> jax.Array:
    """Apply `rows` (a stack of n matrices -> shape (n,)) to the weight matrices: shape (layers,).

    For reductions that are faster on a whole stack at once (gradlab/sums.py's row_*).
    """
    return jnp.concatenate([rows(tree["input"]["w"][None]), rows(tree["hidden"]["w"]), rows(tree["output"]["w"][None])])


def layer_mask(spec: MLPSpec, hyper: MLPHyper) -> jax.Array:
    """True for the layers in use: the input, the first `depth` hidden blocks, the readout."""
    hidden = jnp.arange(spec.depth) < hyper.depth
    return jnp.concatenate([jnp.ones(1, bool), hidden, jnp.ones(1, bool)])


def probe_rms(probe_grads: dict) -> jax.Array:
    """RMS of dL/dh per layer from the gradient w.r.t. `zero_probes`: shape (layers,)."""

    def rms(stack):
        return jnp.sqrt(sums.row_means(jnp.square(at_least_f32(stack))))

    hidden = probe_grads["hidden"]
    layers = [rms(g[None]) for g in hidden] if _layered(hidden) else [rms(hidden)]
    return jnp.concatenate([rms(probe_grads["input"][None]), *layers, rms(probe_grads["output"][None])])


def layer_values(params: dict, x, spec: MLPSpec, hyper: MLPHyper, dtype=None):
    """Every layer's pre-activation and output on a batch x, as `apply` computes them for a net
    without norms, written out to expose them all (apply keeps per-layer statistics only).

    Args:
      dtype: the compute dtype; spec.dtype by default.
    Returns:
      (pre, outputs): pre (depth + 1, B, W), the input projection's and every hidden block's
      pre-activations; outputs (input (B, W), hidden (depth, B, W), readout (B, out)). A hidden
      block at index >= the active depth repeats its input, as in `apply`.
    """
    dtype = jnp.dtype(spec.dtype if dtype is None else dtype)
    act = activation_fn(spec.activation, hyper.leaky_slope)
    p = jax.tree.map(lambda a: a.astype(dtype), params)
    residual = jnp.asarray(hyper.residual).astype(dtype)
    branch = hyper.branch_multiplier
    if not (_concrete(branch) and branch == 1):
        branch = jnp.where(hyper.residual, jnp.asarray(branch), 1.0).astype(dtype)
    pre_in = x.astype(dtype) @ p["input"]["w"] + p["input"]["b"][None]
    first = act(pre_in)

    def block(h, layer):
        index, lp = layer
        pre = _scaled(h @ lp["w"], hyper.hidden_multiplier) + lp["b"][None]
        new = jnp.where(index < hyper.depth, residual * h + _scaled(act(pre), branch), h)
        return new, (pre, new)

    last, (pre, hidden) = jax.lax.scan(block, first, (jnp.arange(spec.depth), p["hidden"]))
    out = _scaled(last @ p["output"]["w"], hyper.output_multiplier) + p["output"]["b"][None]
    return jnp.concatenate([pre_in[None], pre]), (first, hidden, at_least_f32(out))


def rms(a, axes=None) -> jax.Array:
    """Root mean square of a's entries over `axes` (all by default), in at least float32."""
    return jnp.sqrt(jnp.mean(jnp.square(at_least_f32(a)), axis=axes))


def per_layer_rms(outputs) -> jax.Array:
    """(layers,) RMS over examples and units of each layer's output, from layer_values' outputs."""
    first, hidden, out = outputs
    return jnp.concatenate([rms(first)[None], rms(hidden, (1, 2)), rms(out)[None]])


def decorrelation(pre_LxBxD) -> jax.Array:
    """Per layer, the mean of 1 - c over the disjoint pairs of examples (0, 1), (2, 3), ..., c the
    cosine of their vectors (pre-activations, say), computed as |u_a - u_b|^2 / 2 of the unit vectors
    u = z / |z|, which stays accurate where c is within float32 rounding of 1: shape (layers,)."""
    unit = pre_LxBxD / jnp.sqrt(jnp.sum(jnp.square(pre_LxBxD), axis=-1, keepdims=True))
    pairs = unit.shape[1] // 2
    diff = unit[:, 0 : 2 * pairs : 2] - unit[:, 1 : 2 * pairs : 2]
    return jnp.mean(0.5 * jnp.sum(jnp.square(diff), axis=-1), axis=1)
