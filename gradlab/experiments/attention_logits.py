"""Attention-logit growth and entropy collapse against the learning rate; qk-layernorm and z-loss.

Wortsman et al. 2023 ("Small-scale proxies for large-scale Transformer training instabilities"): at
high learning rates the attention logits of a transformer grow without bound, the attention
distributions collapse onto one key (Zhai et al. 2023: attention-entropy collapse) and the loss stalls
or diverges; normalising queries and keys (qk-layernorm) bounds the logits and lowers the loss's
sensitivity to the rate. The z-loss (coefficient x mean (log Z)^2 of the output logits) keeps the
readout's log-partition near 0 (output-logit divergence).

A causal Pre-LN decoder (gradlab/transformer.py) learns an order-2 Markov chain (gradlab/sequences.py,
entropy rate H = the best achievable loss) with Adam under a warmup-cosine schedule. The learning rate
and the z-loss coefficient are vmapped; qk-layernorm changes the parameters, one compile each. Per
variant: the largest attention logit at the end (max over blocks and causal entries), the final loss
(mean of the last TAIL steps; a diverged run is +inf) and attention entropy against steps. LR
sensitivity S (analysis.lr_sensitivity, as lr_sweep): E over the log-spaced rates in [3e-4, 3e-1] of
min(L(eta), L0) - L*, divided by L0.

Checks (without qk-layernorm, each z-loss setting): the end-of-training max attention logit of the
highest-logit rate is >= GROWTH x that of the smallest rate; the runs at the high rates (the top
quarter of the grid) end worse than the best rate's, their attention entropy collapsed below COLLAPSE x
its value at init. With qk-layernorm: S lower than without, at each z-loss setting.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from gradlab import analysis, results, sequences
from gradlab import transformer as tf
from gradlab import transformer_trials as tt
from gradlab.config import ExperimentConfig
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "attention_logits"
CLAIM = (
    "without qk-layernorm the attention logits grow with the learning rate and attention collapses; "
    "qk-layernorm lowers LR sensitivity"
)
VARIANT_AXES = ("model.qk_layernorm", "model.z_loss")
AXES = [*VARIANT_AXES, "optim.lr", "seed"]
GROWTH = 10.0  # without qk-layernorm: end max logit, highest over the sweep / smallest rate's (the catalog's bound)
HIGH_FRACTION = 0.25  # "the high-rate runs": the top quarter of the grid's rates (at least one)
COLLAPSE = 0.5  # collapsed: the high-rate runs' final min attention entropy below this fraction of its init value
TAIL = 10  # final losses: mean over the last TAIL steps


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """A transformer on Markov-chain sequences under a learning-rate sweep."""

    model: tf.TransformerConfig = field(default_factory=tf.TransformerConfig)
    data: sequences.SequenceConfig = field(default_factory=sequences.SequenceConfig)

    def validate(self) -> None:
        super().validate()  # the model's and the sequence task's own validate()
        if self.telemetry != "layers":
            raise ConfigError("must be 'layers': the checks read the per-block attention taps", key="telemetry")


reference = tt.sequence_reference  # ref.entropy_rate (the best achievable loss), ref.unigram_entropy


def trial(cfg) -> Trial:
    """language_model: loss, attention taps per block and step."""
    return tt.language_model(cfg)


# ----------------------------------------------------------------------------- measured (numpy)


class Variant(NamedTuple):
    qk_layernorm: bool
    z_loss: float
    lrs: np.ndarray
    final: np.ndarray  # (lrs,) median over seeds of the final loss; inf: diverged
    end_logit: np.ndarray  # (lrs,) median over seeds of the max attention logit at the last finite step
    end_entropy: np.ndarray  # (lrs,) median over seeds of the min over blocks and heads of the entropy at the end
    init_entropy: float  # the same at step 0 (median over rates and seeds)
    entropy: np.ndarray  # (lrs, step) median over seeds of the mean attention entropy over blocks and heads
    initial: float  # L0

    @property
    def label(self) -> str:
        return ("qk-LN" if self.qk_layernorm else "no qk-LN") + (f", z-loss {self.z_loss:g}" if self.z_loss else "")

    def sensitivity(self) -> float:
        return analysis.lr_sensitivity(self.final, self.initial)

    @property
    def high(self) -> int:
        """How many of the top rates are "the high-rate runs"."""
        return max(1, int(HIGH_FRACTION * len(self.lrs)))

    def growth(self) -> float:
        """End max logit: the highest over the sweep / the smallest rate's."""
        return float(np.nanmax(self.end_logit) / self.end_logit[0])


def last_finite(x) -> np.ndarray:
    """The last finite entry along the last axis (NaN if none)."""
    x = np.asarray(x, float)
    ok = np.isfinite(x)
    index = x.shape[-1] - 1 - np.argmax(ok[..., ::-1], axis=-1)
    picked = np.take_along_axis(x, index[..., None], axis=-1)[..., 0]
    return np.where(ok.any(axis=-1), picked, np.nan)


def variants(ds) -> list[Variant]:
    lrs = ds["optim.lr"].values.astype(float)
    out = []
    for qk, z in itertools.product(*(ds[a].values for a in VARIANT_AXES)):
        point = ds.sel({"model.qk_layernorm": qk, "model.z_loss": z})
        loss = point["loss"].transpose("optim.lr", "seed", "step").values.astype(float)
        final = np.median(analysis.final(loss, point["diverged"].transpose("optim.lr", "seed").values, TAIL), axis=1)
        logit = point["attn_logit_max"].max("layer").transpose("optim.lr", "seed", "step").values
        ent = point["attn_entropy"].transpose("optim.lr", "seed", "step", "layer", "head").values.astype(float)
        smallest = ent.min(axis=(-2, -1))  # (lrs, seeds, steps)
        out.append(
            Variant(
                bool(qk),
                float(z),
                lrs,
                final,
                np.median(last_finite(logit), axis=1),
                np.median(last_finite(smallest), axis=1),
                float(np.median(smallest[..., 0])),
                np.median(ent.mean(axis=(-2, -1)), axis=1),
                float(np.median(loss[:, :, 0])),
            )
        )
    return out


class Measured(NamedTuple):
    variants: list[Variant]
    entropy_rate: float
    unigram: float
    cfg: dict


def measure(ds) -> Measured:
    h, unigram = (float(analysis.reference(ds, name)) for name in ("entropy_rate", "unigram_entropy"))
    return Measured(variants(ds), h, unigram, results.run_config(ds))


def checks(m: Measured) -> list[Check]:
    out = []
    by_key = {(v.qk_layernorm, v.z_loss): v for v in m.variants}
    for v in (v for v in m.variants if not v.qk_layernorm):
        out.append(
            Check.at_least(f"{v.label}: end max attention logit, max over lrs / smallest lr's", v.growth(), GROWTH)
        )
        best = float(np.min(v.final))
        high = v.final[-v.high :]
        name = f"{v.label}: top {v.high} lrs' min final loss / best lr's ({best:.3f})"
        out.append(Check.above(name, np.min(high) / best, 1.0))
        collapsed = float(np.max(v.end_entropy[-v.high :]) / v.init_entropy)
        name = f"{v.label}: top {v.high} lrs' max end min-head attention entropy / at init ({v.init_entropy:.2f} nats)"
        out.append(Check.below(name, collapsed, COLLAPSE))
        if (True, v.z_loss) in by_key:
            qk = by_key[True, v.z_loss]
            sensitivities = f"S {qk.sensitivity():.3f} / {v.sensitivity():.3f}"
            name = f"z-loss {v.z_loss:g}: LR sensitivity with qk-LN / without ({sensitivities})"
            out.append(Check.below(name, qk.sensitivity() / v.sensitivity(), 1.0))
    return out


def figures(ds, m: Measured) -> dict:
    from gradlab.experiments import _attention_logits_figures

    return _attention_logits_figures.draw(ds, m)
