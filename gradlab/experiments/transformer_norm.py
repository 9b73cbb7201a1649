"""Pre-LN against Post-LN on attention blocks (Xiong et al. 2020, "On Layer Normalization in the
Transformer Architecture").

A causal decoder (gradlab/transformer.py: attention + GELU MLP blocks) learns next-token prediction on
a random sparse Markov chain of order 2 (gradlab/sequences.py), whose entropy rate H is the best
achievable loss.

Gradient at init (Xiong et al. 2020, Theorem 1). Pre-LN adds each branch's output, computed from a
normalised input and so of depth-free size, to the residual stream: its variance grows ~ L, the final
norm divides by its RMS, and the gradient reaching the last block falls like L^-1/2 (with small
embeddings, as here: embed_std 0.02). Post-LN normalises after every residual sum: the stream's size,
and the last block's gradient, do not depend on L. Measured: |dL/dW| of the last block's weight
matrices (wq, wk, wv, wo, w1, w2 together) against L, at init, for probe_seeds inits per depth; depth
is a traced mask up to max(probe_depths), all depths vmapped in one program. Checks: the log-log slope
of Pre-LN within SLOPE_TOL of -1/2 (or of the (L+1)^-1/2 form's slope over the same depths); Post-LN's
slope >= POST_FLOOR.

Warmup (Xiong et al. 2020, Sec. 3; Liu et al. 2020): trained with Adam at a rate where Pre-LN trains
with or without warmup, Post-LN without warmup ends clearly worse than with it. Measured as the excess
of the final loss over the entropy rate; warmup is a traced switch scaling the update by
min(1, step / optim.warmup_steps).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from gradlab import analysis, results, sequences
from gradlab import transformer as tf
from gradlab import transformer_trials as tt
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "transformer_norm"
CLAIM = (
    "attention blocks: Pre-LN's last-block gradient at init falls like L^-1/2, Post-LN's does not; Post-LN needs warmup"
)
AXES = ["model.norm_position", "warmup", "seed"]
SLOPE_TOL = 0.15  # Pre-LN: |slope - (-1/2)| (or - the (L+1)^-1/2 form's) at most this (the catalog's bound)
POST_FLOOR = -0.1  # Post-LN: slope at least this (the catalog's bound)
WORSE = 2.0  # Post-LN without warmup: excess loss over H at least this many times the excess with warmup
FINE = 0.1  # Pre-LN "trains": its excess loss over H, either way, at most this fraction of (L0 - H)
TAIL = 20  # final losses: mean over the last TAIL steps


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """A transformer on Markov-chain sequences, warmup on/off, and the depths probed at init."""

    model: tf.TransformerConfig = field(default_factory=tf.TransformerConfig)
    data: sequences.SequenceConfig = field(default_factory=sequences.SequenceConfig)
    warmup: bool = param(True, sweep="traced", doc="scale updates by min(1, step / optim.warmup_steps); false: none")
    probe_depths: tuple[int, ...] = param((2, 4, 8, 16), doc="depths whose last-block gradient is probed at init")
    probe_seeds: int = param(8, low=1, doc="independent inits per probed depth (and per seed)")

    def validate(self) -> None:
        super().validate()  # the model's and the sequence task's own validate()
        if len(self.probe_depths) < 2 or min(self.probe_depths) < 1:
            raise ConfigError(f"needs two or more depths >= 1, got {list(self.probe_depths)}", key="probe_depths")
        if self.optim.warmup_steps < 1:
            raise ConfigError("must be >= 1 (the warmup switch's ramp), got 0", key="optim.warmup_steps")


reference = tt.sequence_reference  # ref.entropy_rate (the best achievable loss), ref.unigram_entropy


def trial(cfg) -> Trial:
    """language_model under the traced warmup switch; records init_last_grad (probe_depth, probe_seed)."""
    deepest = dataclasses.replace(cfg.model, depth=max(cfg.probe_depths))
    probe_spec = tf.TransformerSpec.from_config(deepest, cfg.data.vocab, cfg.data.seq_len)
    weights = jnp.asarray(sequences.make(cfg.data).target_mask)
    depths = jnp.asarray(cfg.probe_depths)

    def probe(hp, key, tokens):
        def one(depth, k):
            hyper = tf.TransformerHyper.from_hp({**hp, "model.depth": depth, "model.z_loss": 0.0}, cfg.model.init)
            params = tf.init(k, probe_spec, hyper)
            grads = jax.grad(lambda p: tt.loss_fn(probe_spec, hyper, weights)(p, tokens)[0])(params)
            return tf.block_grad_norms(grads)[depth - 1]

        # One init at a time (lax.map): a vmap would hold every probe's activations at once.
        keys = jax.random.split(key, cfg.probe_seeds)
        pairs = (jnp.repeat(depths, cfg.probe_seeds), jnp.tile(keys, (len(cfg.probe_depths), 1)))
        return jax.lax.map(lambda dk: one(*dk), pairs).reshape(len(cfg.probe_depths), cfg.probe_seeds)

    ramp = cfg.optim.warmup_steps
    cold = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, warmup_steps=0))

    def update_scale(hp, step):
        return jnp.where(hp["warmup"], jnp.minimum(1.0, step / ramp), 1.0)

    base = tt.language_model(
        cold, update_scale=update_scale, probe=probe, probe_metrics=lambda g: {"init_last_grad": g}
    )
    return Trial(base.init, base.step, {**base.metric_dims, "init_last_grad": ("probe_depth", "probe_seed")})


# ----------------------------------------------------------------------------- measured (numpy)


def theory_slope(depths) -> float:
    """The least-squares slope of -1/2 ln(L + 1) against ln L over the probed depths."""
    depths = np.asarray(depths, float)
    return analysis.slope(np.log(depths), -0.5 * np.log(depths + 1.0))


class Measured(NamedTuple):
    depths: np.ndarray
    grads: dict  # position -> (inits, probe depth) last-block |dL/dW| at init
    slopes: dict  # position -> (mean, s.e.) over inits of d ln g / d ln L
    theory: float  # the (L+1)^-1/2 form's slope over the probed depths
    finals: dict  # (position, warmup) -> median over seeds of the final loss
    initial: float  # median loss at step 0
    entropy_rate: float
    unigram: float
    warmup_gain: float | None  # Post-LN: excess over H without warmup / with
    pre_excess: float | None  # Pre-LN: max over warmup of excess / (L0 - H)
    cfg: dict


def final_loss(ds, position, warmup) -> np.ndarray:
    sel = {"model.norm_position": position, "warmup": warmup}
    loss = ds["loss"].sel(sel).transpose("seed", "step").values
    return analysis.final(loss, ds["diverged"].sel(sel).values, tail=TAIL)


def measure(ds) -> Measured:
    cfg = results.run_config(ds)
    depths = np.asarray(cfg["probe_depths"])
    positions = [str(p) for p in ds["model.norm_position"].values]
    grads, slopes = {}, {}
    for position in positions:
        g = ds["init_last_grad"].sel({"model.norm_position": position}).isel({"step": 0, "warmup": 0})
        g = g.transpose("seed", "probe_seed", "probe_depth").values.astype(float).reshape(-1, len(depths))
        s = analysis.slopes(np.log(depths), np.log(g))
        grads[position] = g
        slopes[position] = (float(np.mean(s)), float(np.std(s, ddof=1) / np.sqrt(len(s))) if len(s) > 1 else 0.0)
    warm = sorted({bool(w) for w in ds["warmup"].values})
    finals = {(p, w): float(np.median(final_loss(ds, p, w))) for p in positions for w in warm}
    h = float(analysis.reference(ds, "entropy_rate"))
    initial = float(np.median(ds["loss"].isel(step=0).values))
    gain = pre = None
    if warm == [False, True] and ds.sizes["step"] > TAIL:
        if "post" in positions:
            gain = (finals["post", False] - h) / (finals["post", True] - h)
        if "pre" in positions:
            pre = max(finals["pre", w] - h for w in warm) / (initial - h)
    unigram = float(analysis.reference(ds, "unigram_entropy"))
    return Measured(depths, grads, slopes, theory_slope(depths), finals, initial, h, unigram, gain, pre, cfg)


def checks(m: Measured) -> list[Check]:
    out = []
    if "pre" in m.slopes:
        mean = m.slopes["pre"][0]
        name = f"Pre-LN: slope d ln|dL/dW_last| / d ln L at init = {mean:+.3f}: distance to -1/2 or {m.theory:+.3f}"
        distance = min(abs(mean + 0.5), abs(mean - m.theory))
        out.append(Check.at_most(name, distance, SLOPE_TOL, "(L+1)^-1/2"))
    if "post" in m.slopes:
        out.append(Check.at_least("Post-LN: d ln|dL/dW_last| / d ln L at init", m.slopes["post"][0], POST_FLOOR))
    lr = m.cfg["optim"]["lr"]
    if m.warmup_gain is not None:
        name = f"Post-LN, adam lr {lr:g}: excess loss over H without / with warmup"
        out.append(Check.at_least(name, m.warmup_gain, WORSE))
    if m.pre_excess is not None:
        name = f"Pre-LN, lr {lr:g}: max over warmup on/off of excess loss / (L0 - H)"
        out.append(Check.at_most(name, m.pre_excess, FINE))
    return out


def figures(ds, m: Measured) -> dict:
    from gradlab.experiments import _transformer_norm_figures

    return _transformer_norm_figures.draw(ds, m)
