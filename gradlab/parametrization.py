"""abc-parametrizations of gradlab's MLPs as data: SP, NTK and muP against width, and the residual
branch scaling against depth (depth-muP, CompleteP).

An abc-parametrization (Yang & Hu 2021, Tensor Programs IV, Sec. 3 and its Tab. 3; in the
"multiplier 1" form of Yang et al. 2022, Tensor Programs V, Tab. 3) gives every layer an init
variance, a forward multiplier and a learning-rate scale, each a power of the width. Here every
number is relative to the standard parametrization (SP) at `model.base_width`, a power of the width
multiplier m = width / base_width, so at width == base_width every parametrization is SP and
a learning rate tuned there is the one to transfer. Exponents of m (init std, forward multiplier,
SGD lr, Adam lr):

                             sp            ntk                 mup
  input  W  (d_in x n)       0  0  0  0    0    0    0  0       0    0  +1   0
  hidden W  (n x n)          0  0  0  0  +1/2 -1/2   0  0       0    0   0  -1
  output W  (n x d_out)      0  0  0  0  +1/2 -1/2   0  0     -1/2   0  -1  -1
  width-sized vectors        0  0  0  0    0    0    0  0       0    0  +1   0
  readout bias (d_out)       0  0  0  0    0    0    0  0       0    0   0   0

SP's own init is the config's fan-in scheme (variance c / fan_in), so muP's readout variance is
c / (fan_in m), 1/fan_in^2 up to base_width, and NTK's raw weights have variance c / base fan_in
while their forward multiplier m^(-1/2) makes the function at init SP's. "Width-sized vectors" are
the biases of the input and hidden layers and the norms' scales and offsets (muP's "all biases": SGD
lr x fan_out). The lr scales multiply each parameter's update after the optimizer (transforms.
scale_by_label); "Adam" holds for every entrywise-normalised optimizer (adam, adamw, rmsprop,
adagrad, lion), "SGD" for sgd, momentum and nesterov. The input multiplier is 1 throughout: the
input's fan-in does not grow with width.

Depth (residual nets): each hidden block's branch is multiplied by (L / base_depth)^(-alpha), L the
active depth, and every hidden-block parameter's lr by (L / base_depth)^(2 alpha - 1) under SGD,
^(alpha - 1) under Adam, so each block moves h by O(1/L) and the sum of L blocks by O(1):
  depth_mup  alpha = 1/2 (Yang et al. 2023, Tensor Programs VI; Bordelon et al. 2023)
  completep  alpha = 1   (Dey et al. 2025): the one exponent for which every block's features keep
             learning non-linearly as L grows ("complete feature learning"): 1/L.
Both are implemented (one row of the table each); completep is the one to use for transfer across
depth with Adam, since its hidden lr needs no depth factor at all.

What it applies to: gradlab's MLPs (models.py) through trials.supervised_mlp, which reads
model.parametrization; not users' Flax models nor the transformer.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from gradlab import inits, transforms

PARAMETRIZATIONS = ("sp", "ntk", "mup")  # the choices of model.parametrization
DEPTH_PARAMETRIZATIONS = ("none", "depth_mup", "completep")  # the choices of model.depth_parametrization
KINDS = ("input", "hidden", "output", "vector", "hidden_vector", "readout_bias")
QUANTITIES = ("init", "multiplier", "lr_sgd", "lr_adam")
SGD_FAMILY = ("sgd", "momentum", "nesterov")  # every other optimizer takes the Adam column
# Schemes whose std is c / sqrt(fan_in): the ones whose variance the table rescales by powers of m.
FAN_IN_SCHEMES = tuple(name for name, (_, fan, _) in inits.SCHEMES.items() if fan == inits.FAN_IN)

_ZERO = (0.0, 0.0, 0.0, 0.0)
WIDTH_EXPONENTS = {  # parametrization -> kind -> exponent of m for each of QUANTITIES
    "sp": dict.fromkeys(KINDS, _ZERO),
    "ntk": {
        **dict.fromkeys(KINDS, _ZERO),
        "hidden": (0.5, -0.5, 0.0, 0.0),
        "output": (0.5, -0.5, 0.0, 0.0),
    },
    "mup": {
        **dict.fromkeys(KINDS, _ZERO),
        "input": (0.0, 0.0, 1.0, 0.0),
        "hidden": (0.0, 0.0, 0.0, -1.0),
        "output": (-0.5, 0.0, -1.0, -1.0),
        "vector": (0.0, 0.0, 1.0, 0.0),
        "hidden_vector": (0.0, 0.0, 1.0, 0.0),
    },
}
DEPTH_EXPONENTS = {  # exponent of L / base_depth: (branch multiplier, hidden-block SGD lr, hidden-block Adam lr)
    "none": (0.0, 0.0, 0.0),
    "depth_mup": (-0.5, 0.0, -0.5),
    "completep": (-1.0, 1.0, 0.0),
}
_TABLE = np.asarray([[WIDTH_EXPONENTS[p][k] for k in KINDS] for p in PARAMETRIZATIONS], np.float32)


class Parametrized(NamedTuple):
    """The numbers of one parametrization at one width (and depth); each a float or a traced scalar."""

    init: dict  # input, hidden, output -> multiplies the init scheme's weight std
    multiplier: dict  # hidden, output -> multiplies x @ W in the forward pass
    branch: jax.Array | float  # multiplies each residual block's branch
    lr: dict  # kind -> multiplies the optimizer's update of that kind's parameters

    def hyper(self, hyper):
        """models.MLPHyper with these init scales and multipliers."""
        return hyper._replace(
            input_init=self.init["input"],
            hidden_init=self.init["hidden"],
            output_init=self.init["output"],
            hidden_multiplier=self.multiplier["hidden"],
            output_multiplier=self.multiplier["output"],
            branch_multiplier=self.branch,
        )

    def optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """tx followed by the per-layer lr scales (tx itself where every scale is a constant 1)."""
        if all(_is_one(s) for s in self.lr.values()):
            return tx
        return optax.chain(tx, transforms.scale_by_label(self.lr, labels))


def _is_one(x) -> bool:
    return isinstance(x, (int, float)) and x == 1


def family(optimizer: str) -> str:
    """'sgd' or 'adam': which lr column of the table an optimizer takes."""
    return "sgd" if optimizer in SGD_FAMILY else "adam"


def exponents(parametrization: str) -> dict:
    """kind -> {quantity: exponent of m}: the table's row of one parametrization, by name."""
    return {kind: dict(zip(QUANTITIES, row)) for kind, row in WIDTH_EXPONENTS[parametrization].items()}


def numbers(
    parametrization,
    optimizer: str,
    width: int,
    base_width: int,
    depth_parametrization: str = "none",
    depth=1,
    base_depth: int = 1,
) -> Parametrized:
    """The multipliers of a parametrization, given by name (Python floats) or by a traced index into
    PARAMETRIZATIONS (traced scalars, so parametrizations can share one compiled program).

    `depth` (the active number of hidden blocks) may be traced too.
    """
    m = width / base_width
    if isinstance(parametrization, str):
        table = {k: [float(m**e) for e in row] for k, row in WIDTH_EXPONENTS[parametrization].items()}
    else:  # m ** 0 is exactly 1 in float32, so SP's lane multiplies by exact ones
        powers = jnp.float32(m) ** jnp.asarray(_TABLE)[parametrization]
        table = {k: [powers[i, j] for j in range(len(QUANTITIES))] for i, k in enumerate(KINDS)}
    column = QUANTITIES.index(f"lr_{family(optimizer)}")
    lr = {k: table[k][column] for k in KINDS}
    branch = 1.0
    if depth_parametrization != "none":
        branch_e, sgd_e, adam_e = DEPTH_EXPONENTS[depth_parametrization]
        ratio = depth / base_depth
        branch = ratio**branch_e
        depth_lr = ratio ** (sgd_e if family(optimizer) == "sgd" else adam_e)
        lr["hidden"], lr["hidden_vector"] = lr["hidden"] * depth_lr, lr["hidden_vector"] * depth_lr
    return Parametrized(
        init={k: table[k][0] for k in ("input", "hidden", "output")},
        multiplier={k: table[k][1] for k in ("hidden", "output")},
        branch=branch,
        lr=lr,
    )


def of_model(model, optimizer: str, width: int, depth=None) -> Parametrized:
    """The numbers of a ModelConfig's parametrization (`depth`: the traced active depth, default model.depth)."""
    return numbers(
        model.parametrization,
        optimizer,
        width,
        model.base_width,
        model.depth_parametrization,
        model.depth if depth is None else depth,
        model.base_depth,
    )


def labels(params: dict) -> dict:
    """The kind of every leaf of an MLP's parameters (models.init's layout)."""

    def fill(tree, kind):
        return jax.tree.map(lambda _: kind, tree)

    out = {
        "input": {"w": "input", "b": "vector"},
        "hidden": {name: "hidden" if name == "w" else "hidden_vector" for name in params["hidden"]},
        "output": {"w": "output", "b": "readout_bias"},
    }
    if "final" in params:
        out["final"] = fill(params["final"], "vector")
    return out
