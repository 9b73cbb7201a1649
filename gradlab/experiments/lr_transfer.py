"""Learning-rate transfer across width: under muP the best learning rate stays put, under SP it moves.

Final training loss (mean of the last TAIL steps, median over seeds) against a log2 grid of
learning rates, one curve per width, under the standard parametrization (SP), muP and the NTK
parametrization (gradlab/parametrization.py; Yang & Hu 2021, Tensor Programs IV; Yang et al. 2022,
Tensor Programs V). All three equal SP at model.base_width (the narrowest width here), so they share
their best rate there. Under SP with Adam every entry of every weight moves by ~lr per step whatever
the width, so a hidden layer's output moves ~ lr n and the readout's ~ lr n^(3/2) (see
width_scaling): the rate that trains the narrow net best makes the wide one overshoot, and the
best rate falls with width. muP scales the hidden and readout rates by 1/m (m = width / base_width)
and the readout's init by m^(-1/2), so every layer's change per step is width-independent and the
best rate found at the narrow width is the wide net's too (Tensor Programs V's muTransfer).

Width changes shapes: each width is its own compiled program. The parametrization (a traced choice,
as width_scaling's optimizer), the learning rate and the seed are vmapped inside it. A diverged run
counts as an infinite loss. Checks (the catalog's bounds): under muP the best rate moves by at most
one grid step (a factor 2) from the narrowest to the widest width; under SP by at least 4x; and the
widest muP net's best loss is no worse than the widest SP net's.

The task matters: on noisy 10-class labels (4096 examples, logit noise 1.0) no width fits the data
in 400 steps, so every curve has an interior best rate. Measured at quick scale (Adam, 2 seeds),
best rate at widths 32, 64, 128, 256: SP 2^-5, 2^-6, 2^-6, 2^-7; muP 2^-5, 2^-5, 2^-5, 2^-4; NTK
2^-5 at every width; best loss at width 256: muP 0.031, SP 0.058. On an easy regression task (the
sin teacher, 1024 examples) the losses fell to 1e-3..1e-5, the curves were ragged and neither
check held (SP's best rate 2^-5 at 32 and 256; muP's moved 2^-5 -> 2^-3).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from gradlab import analysis, parametrization, trials
from gradlab.config import ExperimentConfig, param
from gradlab.engine import Trial
from gradlab.errors import ConfigError
from gradlab.experiments import Check

NAME = "lr_transfer"
CLAIM = "under muP the best learning rate stays put across width (within 2x); under SP it falls by 4x or more"
AXES = ["optim.name", "parametrization", "model.width", "optim.lr", "seed"]
TAIL = 20  # final loss: mean of the last TAIL steps
MUP_SHIFT = 1.0  # the catalog's bound: muP's best lr moves by at most one grid step (log2 units: 2x)
SP_SHIFT = 2.0  # ... and SP's by at least 4x


@dataclass(frozen=True)
class Config(ExperimentConfig):
    """ExperimentConfig plus the parametrization as a traced choice (one program per width)."""

    parametrization: str = param(
        "sp",
        choices=parametrization.PARAMETRIZATIONS,
        sweep="choice",
        doc="replaces model.parametrization: every choice is built into each width's program, picked by index",
    )

    def validate(self) -> None:
        super().validate()
        self.replaced("model.parametrization", by="parametrization")
        if self.model.init not in parametrization.FAN_IN_SCHEMES:
            raise ConfigError(
                f"the parametrizations rescale a fan-in init (allowed: {', '.join(parametrization.FAN_IN_SCHEMES)}), "
                f"got {self.model.init!r}",
                key="model.init",
            )


def trial(cfg) -> Trial:
    """supervised_mlp with the traced parametrization's init scales, multipliers and per-layer lr scales."""
    spec = trials.mlp_spec(cfg)
    model = cfg.model

    def parametrized(hp):
        return parametrization.numbers(
            hp["parametrization"],
            cfg.optim.name,
            spec.width,
            model.base_width,
            model.depth_parametrization,
            hp["model.depth"],
            model.base_depth,
        )

    return trials.supervised_mlp(cfg, parametrized=parametrized)


# ----------------------------------------------------------------------------- measured


class Curves(NamedTuple):
    """One optimizer x parametrization: final loss per width and learning rate."""

    optimizer: str
    parametrization: str
    widths: np.ndarray
    lrs: np.ndarray
    final: np.ndarray  # (widths, lrs): median over seeds of the tail-mean loss; inf where it diverged
    best: np.ndarray  # (widths,) the best learning rate of each width (nan: every rate diverged)
    best_loss: np.ndarray  # (widths,)

    @property
    def shift(self) -> float:
        """log2(best lr at the widest / at the narrowest width): grid steps on a log2 grid."""
        return float(np.log2(self.best[-1] / self.best[0]))


def curves(ds) -> list[Curves]:
    widths = ds["model.width"].values.astype(int)
    lrs = ds["optim.lr"].values.astype(float)
    out = []
    for opt in ds["optim.name"].values:
        for name in ds["parametrization"].values:
            point = ds.sel({"optim.name": opt, "parametrization": name})
            loss = point["loss"].transpose("model.width", "optim.lr", "seed", "step").values
            diverged = point["diverged"].transpose("model.width", "optim.lr", "seed").values
            final = np.median(analysis.final(loss, diverged, TAIL), axis=-1)
            finite = np.isfinite(final).any(axis=1)
            index = np.argmin(final, axis=1)
            best = np.where(finite, lrs[index], np.nan)
            out.append(
                Curves(str(opt), str(name), widths, lrs, final, best, np.where(finite, final.min(axis=1), np.inf))
            )
    return out


class Measured(NamedTuple):
    curves: list[Curves]


def measure(ds) -> Measured:
    return Measured(curves(ds))


def checks(m: Measured) -> list[Check]:
    out = []
    by = {(c.optimizer, c.parametrization): c for c in m.curves}
    for (opt, name), c in by.items():
        if len(c.widths) < 2:
            continue
        span = f"width {c.widths[0]} -> {c.widths[-1]}"
        if name == "mup":
            out.append(Check.at_most(f"{opt}, muP: |log2 best-lr shift|, {span}", abs(c.shift), MUP_SHIFT, "one step"))
        if name == "sp":
            out.append(Check.at_least(f"{opt}, SP: |log2 best-lr shift|, {span}", abs(c.shift), SP_SHIFT, "4x"))
        if name == "mup" and (opt, "sp") in by:
            sp = by[opt, "sp"]
            out.append(
                Check.at_most(
                    f"{opt}, width {c.widths[-1]}: best loss, muP / SP", c.best_loss[-1] / sp.best_loss[-1], 1.0
                )
            )
    return out


def figures(ds, m: Measured) -> dict:
    """Final loss against lr, one panel per parametrization (gradlab/experiments/_lr_transfer_figures.py)."""
    from gradlab.experiments import _lr_transfer_figures

    return _lr_transfer_figures.draw(ds, m)
