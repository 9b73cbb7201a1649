"""Decoder-only transformers as pure functions over explicit parameter pytrees.

Layout: token + learned position embeddings (std `embed_std`), `depth` blocks stacked on a leading
axis and run under lax.scan, then the readout (the embedding's transpose when tied). A block is
causal multi-head self-attention followed by a GELU MLP (4x wider by default):
  pre:   h <- h + attn(norm1(h));   h <- h + mlp(norm2(h));   final norm before the readout
  post:  h <- norm1(h + attn(h));   h <- norm2(h + mlp(h));   no final norm (Vaswani et al. 2017)
(Xiong et al. 2020 compare the two.) A block at index >= the traced active depth passes h through,
so depth can be a vmapped axis under one compile, as in models.py. Options:
  qk_layernorm  the norm applied to each head's queries and keys (Dehghani et al. 2023; Wortsman et
                al. 2023): attention logits are then bounded by sqrt(head_dim) x |scale_q| |scale_k|
  z_loss        coefficient of mean(log Z)^2 on the output logits' log-partition (PaLM, Chowdhery
                et al. 2022), which keeps log Z near 0 (traced)
  softcap       logits <- c tanh(logits / c) where c > 0 (Gemma 2); 0 leaves them alone (traced)
  tied          readout = embedding^T
Taps per block (the `layer` axis): attention-logit max and RMS over the causal entries, attention
entropy per head (nats, mean over queries), residual-stream RMS after the block; and of the output
logits their RMS and mean log-partition log Z.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import inits, models
from gradlab.config import param
from gradlab.errors import ConfigError
from gradlab.norms import apply_norm, at_least_f32

TRANSFORMER_NORMS = ("layernorm", "rmsnorm")
MASKED = -1e30  # a causal-masked logit: exp underflows to exactly 0 in float32


@dataclass(frozen=True)
class TransformerConfig:
    """A causal decoder; vocabulary and sequence length come from the data."""

    depth: int = param(4, low=1, sweep="max", doc="blocks (a mask makes it vmappable)")
    width: int = param(64, low=1, doc="residual-stream width d_model")
    heads: int = param(4, low=1, doc="attention heads (width must be a multiple)")
    mlp_ratio: int = param(4, low=1, doc="MLP hidden width / width")
    norm: str = param("layernorm", choices=TRANSFORMER_NORMS, doc="the norm of every block (and of qk_layernorm)")
    norm_position: str = param(
        "pre", choices=("pre", "post"), doc="norm before each branch (Pre-LN) or after each residual sum (Post-LN)"
    )
    qk_layernorm: bool = param(False, doc="normalise each head's queries and keys before their dot product")
    z_loss: float = param(1e-4, low=0.0, sweep="traced", doc="coefficient of mean((log Z)^2) added to the loss")
    softcap: float = param(0.0, low=0.0, sweep="traced", doc="logits <- c tanh(logits / c); 0: no capping")
    tied: bool = param(False, doc="the readout is the token embedding's transpose")
    init: str = param("lecun_normal", choices=inits.INIT_SCHEMES, doc="init scheme of every weight matrix")
    init_gain: float = param(1.0, low=0.0, sweep="traced", doc="multiplies every weight matrix's init std")
    embed_std: float = param(0.02, low=0.0, sweep="traced", doc="std of the token and position embeddings")
    unroll: int = param(1, low=1, doc="blocks per lax.scan iteration")

    def validate(self) -> None:
        if self.width % self.heads:
            raise ConfigError(f"must divide model.width={self.width}, got {self.heads}", key="model.heads")


@dataclass(frozen=True)
class TransformerSpec:
    """What fixes the program: shapes and code paths; static under jit."""

    vocab: int
    seq_len: int
    depth: int
    width: int
    heads: int
    mlp_ratio: int = 4
    norm: str = "layernorm"
    norm_position: str = "pre"
    qk_layernorm: bool = False
    tied: bool = False
    unroll: int = 1

    @classmethod
    def from_config(cls, model: TransformerConfig, vocab: int, seq_len: int) -> TransformerSpec:
        return cls(
            vocab,
            seq_len,
            model.depth,
            model.width,
            model.heads,
            model.mlp_ratio,
            model.norm,
            model.norm_position,
            model.qk_layernorm,
            model.tied,
            model.unroll,
        )

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def hidden(self) -> int:
        return self.width * self.mlp_ratio


class TransformerHyper(NamedTuple):
    """The numbers that may vary inside one compiled program (traced under vmap)."""

    depth: jax.Array | int
    init: jax.Array | int
    init_gain: jax.Array | float
    embed_std: jax.Array | float
    z_loss: jax.Array | float
    softcap: jax.Array | float

    @classmethod
    def from_hp(cls, hp: dict, scheme: str, prefix: str = "model.") -> TransformerHyper:
        """The traced fields from hp; the init scheme, static (a compile per scheme builds only its own
        distribution), by name."""
        values = {name: hp[prefix + name] for name in cls._fields if name != "init"}
        return cls(**values, init=inits.scheme_index(scheme))

    @classmethod
    def from_config(cls, model: TransformerConfig) -> TransformerHyper:
        values = {name: getattr(model, name) for name in cls._fields}
        values["init"] = inits.scheme_index(model.init)
        return cls(**values)


def _norm_params(kind: str, shape: tuple[int, ...]) -> dict:
    out = {"scale": jnp.ones(shape)}
    if kind == "layernorm":
        out["bias"] = jnp.zeros(shape)
    return out


def init(key, spec: TransformerSpec, hyper: TransformerHyper) -> dict:
    """Parameters, float32: weight matrices under the (traced) init scheme, biases 0, norm scales 1."""
    d, f, n, v, t = spec.width, spec.hidden, spec.depth, spec.vocab, spec.seq_len
    shapes = {"wq": (d, d), "wk": (d, d), "wv": (d, d), "wo": (d, d), "w1": (d, f), "w2": (f, d)}
    sizes = [v * d, t * d, d * v] + [n * a * b for a, b in shapes.values()]
    z = jnp.split(jax.random.normal(key, (sum(sizes),)), np.cumsum(sizes)[:-1])

    def weight(z_):
        return inits.weight_from_normal(z_, hyper.init, 1.0, hyper.init_gain)

    blocks = {name: jax.vmap(weight)(z[3 + i].reshape(n, *shape)) for i, (name, shape) in enumerate(shapes.items())}
    blocks |= {"b1": jnp.zeros((n, f)), "b2": jnp.zeros((n, d))}
    blocks |= {"norm1": _norm_params(spec.norm, (n, d)), "norm2": _norm_params(spec.norm, (n, d))}
    if spec.qk_layernorm:
        blocks |= {
            "q_norm": _norm_params(spec.norm, (n, spec.head_dim)),
            "k_norm": _norm_params(spec.norm, (n, spec.head_dim)),
        }
    params = {
        "embed": hyper.embed_std * z[0].reshape(v, d),
        "pos": hyper.embed_std * z[1].reshape(t, d),
        "blocks": blocks,
    }
    if spec.norm_position == "pre":
        params["final_norm"] = _norm_params(spec.norm, (d,))
    if not spec.tied:
        params["unembed"] = weight(z[2].reshape(d, v))
    return params


def causal_mask(length: int) -> jax.Array:
    """(query, key) True where key <= query."""
    return jnp.tril(jnp.ones((length, length), bool))


def attention(x, lp: dict, spec: TransformerSpec):
    """Causal multi-head self-attention of x (batch, seq, width).

    Returns:
      (out, taps): out like x; taps logit_max and logit_rms (over the causal entries of every head),
      entropy (heads,): -sum_k p log p of each query's attention, averaged over batch and queries.
    """
    b, t, _ = x.shape
    h, e = spec.heads, spec.head_dim
    q, k, v = ((x @ lp[w]).reshape(b, t, h, e) for w in ("wq", "wk", "wv"))
    if spec.qk_layernorm:
        q, k = apply_norm(spec.norm, q, lp["q_norm"]), apply_norm(spec.norm, k, lp["k_norm"])
    logits = jnp.einsum("bqhe,bkhe->bhqk", q, k) / np.sqrt(e)
    mask = causal_mask(t)[None, None]
    logits = jnp.where(mask, logits, MASKED)
    log_p = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(log_p)
    out = jnp.einsum("bhqk,bkhe->bqhe", p, v).reshape(b, t, h * e) @ lp["wo"]
    causal = mask.sum() * b * h
    logits_free = jax.lax.stop_gradient(logits)
    taps = {
        "attn_logit_max": jnp.max(jnp.where(mask, logits_free, -jnp.inf)),
        "attn_logit_rms": jnp.sqrt(jnp.sum(jnp.where(mask, jnp.square(logits_free), 0.0)) / causal),
        "attn_entropy": jnp.mean(
            -jnp.sum(jnp.where(mask, jax.lax.stop_gradient(p * log_p), 0.0), axis=-1), axis=(0, 2)
        ),
    }
    return out, taps


def _features(v, x):
    """A per-feature vector shaped to broadcast explicitly against x's leading axes."""
    return jnp.reshape(v, (1,) * (x.ndim - 1) + jnp.shape(v))


def mlp(x, lp: dict):
    return jax.nn.gelu(x @ lp["w1"] + _features(lp["b1"], x)) @ lp["w2"] + _features(lp["b2"], x)


def rms(x) -> jax.Array:
    """models.rms of x, a tap: no gradient flows through it."""
    return models.rms(jax.lax.stop_gradient(x))


def apply(params: dict, tokens, spec: TransformerSpec, hyper: TransformerHyper):
    """Output logits (batch, seq, vocab) of int tokens (batch, seq), and the taps.

    Returns:
      (logits, taps): taps attn_logit_max, attn_logit_rms, resid_rms of shape (depth,),
      attn_entropy (depth, heads), output_logit_rms and log_partition (mean log Z) scalars.
    """
    norm = spec.norm
    h = params["embed"][tokens] + params["pos"][None, : tokens.shape[1]]

    def block(h, layer):
        index, lp = layer
        if spec.norm_position == "pre":
            a, taps = attention(apply_norm(norm, h, lp["norm1"]), lp, spec)
            mid = h + a
            new = mid + mlp(apply_norm(norm, mid, lp["norm2"]), lp)
        else:
            a, taps = attention(h, lp, spec)
            mid = apply_norm(norm, h + a, lp["norm1"])
            new = apply_norm(norm, mid + mlp(mid, lp), lp["norm2"])
        new = jnp.where(index < hyper.depth, new, h)
        return new, {**taps, "resid_rms": rms(new)}

    h, taps = jax.lax.scan(block, h, (jnp.arange(spec.depth), params["blocks"]), unroll=spec.unroll)
    if "final_norm" in params:
        h = apply_norm(norm, h, params["final_norm"])
    readout = params["embed"].T if spec.tied else params["unembed"]
    logits = soft_cap(h @ readout, hyper.softcap)
    log_z = jax.nn.logsumexp(jax.lax.stop_gradient(logits), axis=-1)
    return logits, {**taps, "output_logit_rms": rms(logits), "log_partition": jnp.mean(log_z)}


def soft_cap(logits, cap):
    """cap tanh(logits / cap) where cap > 0, logits unchanged where cap is 0 (a traced switch)."""
    on = cap > 0
    safe = jnp.where(on, cap, 1.0)
    return jnp.where(on, safe * jnp.tanh(logits / safe), logits)


def losses(logits, targets, weights, z_loss):
    """(objective, cross-entropy): the weighted mean over positions of -log p(target), plus z_loss x
    the weighted mean of (log Z)^2 in the objective. `weights` (seq,) selects the scored positions."""
    logits = at_least_f32(logits)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    w = jnp.broadcast_to(weights[None], targets.shape)
    total = jnp.sum(w)
    ce = jnp.sum(w * (log_z - picked)) / total
    return ce + z_loss * jnp.sum(w * jnp.square(log_z)) / total, ce


def block_grad_norms(grads: dict) -> jax.Array:
    """The Frobenius norm of each block's weight-matrix gradients (wq, wk, wv, wo, w1, w2 together): (depth,)."""
    leaves = [g for name, g in grads["blocks"].items() if name.startswith("w")]
    return jnp.sqrt(sum(jnp.sum(jnp.square(g.reshape(g.shape[0], -1)), axis=1) for g in leaves))


def block_mask(spec: TransformerSpec, hyper: TransformerHyper) -> jax.Array:
    """True for the blocks in use."""
    return jnp.arange(spec.depth) < hyper.depth
