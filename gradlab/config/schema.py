"""The config schema: fields with their allowed values and sweep modes, and the resolved RunSpec.

Every field says how a sweep over it runs (`sweep` in its metadata):
  static  each value is its own compiled program (shapes, code paths)
  traced  a vmapped number inside one compiled program
  max     traced, and the program is built for the largest value (depth under a mask)
  choice  a string traced as its index into `choices` (an init scheme as numbers)

The lists of choices belong to the modules that implement them; this module only imports them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from gradlab import datasets
from gradlab.data import TASKS
from gradlab.errors import ConfigError
from gradlab.inits import INIT_SCHEMES
from gradlab.models import ACTIVATIONS, DTYPES
from gradlab.norms import NORMS
from gradlab.parametrization import DEPTH_PARAMETRIZATIONS, FAN_IN_SCHEMES, PARAMETRIZATIONS
from gradlab.transforms import CLIPPING, OPTIMIZERS, SCHEDULES

MAX_SEEDS = 2**31 - 1


def param(default, *, choices=None, low=None, low_open=False, high=None, sweep=None, doc=""):
    """A config field with its allowed values and how a sweep over it runs."""
    meta = dict(choices=choices, low=low, low_open=low_open, high=high, sweep=sweep, doc=doc)
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    """A deep MLP: input projection, `depth` hidden blocks of `width`, linear readout."""

    depth: int = param(8, low=1, sweep="max", doc="hidden blocks (a mask makes it vmappable)")
    width: int = param(128, low=1, doc="units per hidden layer")
    activation: str = param("tanh", choices=ACTIVATIONS, doc="nonlinearity of every hidden block")
    residual: bool = param(False, sweep="traced", doc="h + f(h) instead of f(h)")
    norm: str = param("none", choices=NORMS, doc="normalisation in every hidden block")
    norm_position: str = param(
        "pre", choices=("pre", "post"), doc="norm before the block's layer (Pre-LN) or after the residual sum (Post-LN)"
    )
    init: str = param(
        "lecun_normal", choices=INIT_SCHEMES, sweep="choice", doc="weight init scheme (gain, fan mode, distribution)"
    )
    init_std: float = param(0.01, low=0.0, doc="std of the 'normal' init scheme")
    init_gain: float = param(1.0, low=0.0, doc="multiplies every init scheme's std")
    bias_std: float = param(0.0, low=0.0, doc="std of the Gaussian bias init (sigma_b)")
    leaky_slope: float = param(0.01, low=0.0, doc="negative-side slope of leaky_relu")
    dtype: str = param("float32", choices=DTYPES, doc="compute dtype; params stay float32")
    unroll: int = param(
        0,
        low=0,
        doc="hidden layers per lax.scan iteration; >= depth: no scan, straight-line blocks; "
        "0: straight-line up to 16 hidden layers, a scan of one layer deeper",
    )
    final_norm: bool = param(False, doc="normalise the last hidden state before the readout (Pre-LN transformers)")
    remat: bool = param(False, doc="jax.checkpoint each hidden block: recompute activations in the backward pass")
    parametrization: str = param(
        "sp",
        choices=PARAMETRIZATIONS,
        doc="abc-parametrization: per-layer init, multiplier and lr scale against width (gradlab/parametrization.py)",
    )
    base_width: int = param(128, low=1, doc="the width at which ntk and mup equal sp (theirs: powers of width/base)")
    depth_parametrization: str = param(
        "none",
        choices=DEPTH_PARAMETRIZATIONS,
        doc="residual branch x (depth/base_depth)^-alpha: depth_mup alpha=1/2, completep alpha=1 (residual nets)",
    )
    base_depth: int = param(1, low=1, doc="the depth at which depth_parametrization changes nothing")

    def validate(self) -> None:
        """A parametrization rescales a fan-in init; a branch multiplier needs residual blocks."""
        if self.parametrization != "sp" and self.init not in FAN_IN_SCHEMES:
            raise ConfigError(
                f"model.parametrization={self.parametrization} rescales a fan-in init (allowed: "
                f"{', '.join(FAN_IN_SCHEMES)}), got {self.init!r}",
                key="model.init",
            )
        if self.depth_parametrization != "none" and not self.residual:
            raise ConfigError(
                f"model.depth_parametrization={self.depth_parametrization} scales residual branches: "
                "needs model.residual=true, got false",
                key="model.residual",
            )


@dataclass(frozen=True)
class OptimConfig:
    """An optax chain: optional clipping, then the optimizer under a learning-rate schedule."""

    name: str = param("sgd", choices=OPTIMIZERS, doc="optimizer family (optax)")
    lr: float = param(0.01, low=0.0, low_open=True, doc="peak learning rate; the schedule scales it")
    momentum: float = param(0.9, low=0.0, high=1.0, doc="momentum of momentum/nesterov SGD")
    b1: float = param(0.9, low=0.0, high=1.0, doc="Adam first-moment decay; Lion's update interpolation")
    b2: float = param(0.999, low=0.0, high=1.0, doc="Adam second-moment decay; RMSProp decay; Lion's momentum decay")
    eps: float = param(1e-8, low=0.0, low_open=True, doc="added to the denominator of adaptive optimizers")
    weight_decay: float = param(0.0, low=0.0, doc="L2 coefficient (adam: in the gradient; adamw: decoupled)")
    schedule: str = param("constant", choices=SCHEDULES, doc="learning-rate schedule (optax.schedules)")
    warmup_steps: int = param(0, low=0, doc="linear warmup from 0, in optimizer updates")
    final_lr_fraction: float = param(
        0.0, low=0.0, high=1.0, sweep="static", doc="where cosine/linear schedules end, as a fraction of lr"
    )
    decay_rate: float = param(
        0.1,
        low=0.0,
        low_open=True,
        sweep="static",
        doc="exponential/inverse_time/step decay: lr factor over the run or per drop",
    )
    cycles: int = param(2, low=1, doc="SGDR restarts / step-schedule drops")
    clip: str = param("none", choices=CLIPPING, doc="gradient clipping before the optimizer")
    clip_threshold: float = param(
        1.0, low=0.0, low_open=True, doc="clipping threshold (global norm, value, or AGC ratio)"
    )
    accumulate_steps: int = param(1, low=1, doc="optax.MultiSteps: one update per this many averaged gradients")


@dataclass(frozen=True)
class DataConfig:
    """A synthetic task or a real dataset; `seed` fixes synthetic data, the run's `seed` axis varies the init.

    With a real dataset (mnist1d, digits, diabetes) examples, input_dim and output_dim are the
    dataset's: they are set from it whatever a file or an override says, so that every config
    that names the dataset resolves to the same numbers (`gradlab show` prints them).
    """

    task: str = param(
        "regression", choices=TASKS, doc="synthetic teacher task, or a real dataset (mnist1d, digits, diabetes)"
    )
    examples: int = param(256, low=1, doc="training set size (a real dataset's own)")
    batch_size: int = param(0, low=0, doc="0: full batch")
    input_dim: int = param(64, low=1, doc="input features (a real dataset's own)")
    output_dim: int = param(1, low=1, doc="regression outputs, or classes (a real dataset's own)")
    noise: float = param(0.0, low=0.0, doc="std of the label noise (synthetic tasks only)")
    seed: int = param(0, low=0, doc="fixes synthetic data; the run's seed axis varies the init")

    def validate(self) -> None:
        """A real dataset needs its package (SetupError naming the extra) and takes no label noise."""
        if self.task in datasets.SHAPES:
            datasets.require(self.task)
            if self.noise != 0:
                raise ConfigError(
                    f"label noise is for synthetic tasks; data.task={self.task} takes 0, got {self.noise}",
                    key="data.noise",
                )

    def __post_init__(self):
        shape = datasets.SHAPES.get(self.task)
        if shape is not None:  # frozen: the dataset's numbers replace whatever was given
            object.__setattr__(self, "examples", shape.train)
            object.__setattr__(self, "input_dim", shape.input_dim)
            object.__setattr__(self, "output_dim", shape.output_dim)


@dataclass(frozen=True)
class ExperimentConfig:
    """What every experiment's config has; experiments subclass it to add their own fields."""

    seed: int = param(0, low=0, high=MAX_SEEDS, sweep="traced", doc="PRNG seed of the init and the batches")
    seeds: int = param(1, low=1, high=MAX_SEEDS, doc="shorthand: a seed axis seed..seed+seeds-1")
    steps: int = param(100, low=1, doc="training steps")
    chunk_steps: int = param(100, low=1, doc="steps per compiled chunk; a checkpoint after each")
    telemetry: str = param("layers", choices=("layers", "loss"), doc="per-layer statistics, or the loss alone")
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def validate(self) -> None:
        """Check relations between fields; raise ConfigError(message, key=...) on a bad one.

        config.load calls it on the resolved config and once per swept value (one axis at a
        time), before anything runs. Experiments override it and call this one, which runs the
        `validate()` of each nested section that has one (ModelConfig's relations; DataConfig's
        real-dataset rules; a transformer's or a sequence task's own).
        """
        for section in (self.model, self.optim, self.data):
            check = getattr(section, "validate", None)
            if callable(check):
                check()

    def require(self, path: str, allowed, why: str) -> None:
        """Refuse a value of the dotted key `path` outside `allowed`, saying why the experiment takes only those."""
        value = get_path(self, path)
        if value not in allowed:
            raise ConfigError(f"{why}; allowed: {', '.join(map(str, allowed))}, got {value!r}", key=path)

    def replaced(self, path: str, by: str) -> None:
        """Refuse a value set at the dotted key `path` where the experiment's own key `by` replaces it.

        The experiment never reads `path`: a value other than its default, which only a user can
        have set, would be silently ignored.
        """
        value, default = get_path(self, path), get_path(type(self)(), path)
        if value != default:
            choices = field_info(type(self))[by].metadata.get("choices") or ()
            allowed = f" (allowed: {', '.join(map(str, choices))})" if choices else ""
            raise ConfigError(
                f"this experiment picks it with `{by}`{allowed}; leave {path} unset, got {value!r}", key=path
            )


# ----------------------------------------------------------------------------- resolved spec


@dataclass(frozen=True)
class Axis:
    """One sweep axis: a dotted config path and its values."""

    path: str
    values: tuple
    mode: str  # static | traced | max | choice


@dataclass(frozen=True)
class RunSpec:
    """A resolved run: the config (axes hold their first value), its sweep axes, its origin."""

    experiment: str
    config: Any
    axes: tuple[Axis, ...]
    source: str
    scale: str

    def to_dict(self) -> dict:
        return {
            "experiment": self.experiment,
            "scale": self.scale,
            "config": _jsonable(dataclasses.asdict(self.config)),
            "axes": {a.path: list(a.values) for a in self.axes},
        }

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def hash(self) -> str:
        """A stable name for the resolved config (the run folder's name)."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def axis(self, path: str) -> Axis | None:
        return next((a for a in self.axes if a.path == path), None)


def _jsonable(x):
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    return x


# ----------------------------------------------------------------------------- schema walking


class FieldInfo(typing.NamedTuple):
    type: type
    metadata: typing.Mapping


def field_info(schema: type) -> dict[str, FieldInfo]:
    """Every scalar field of a (nested) config dataclass, by dotted path."""
    out: dict[str, FieldInfo] = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        tp = hints[f.name]
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            out.update({f"{f.name}.{k}": v for k, v in field_info(tp).items()})
        else:
            out[f.name] = FieldInfo(tp, f.metadata)
    return out


class KeyDoc(typing.NamedTuple):
    """One config key as `gradlab show NAME --doc` prints it."""

    key: str
    type: str
    default: Any
    allowed: str  # the choices or the bounds ("" where any value of the type goes)
    sweep: str  # how a sweep over it runs: vmapped, compiled per value, ...
    meaning: str


SWEEP_WORDS = {
    "static": "compiled per value",
    "traced": "vmapped",
    "max": "vmapped (under a mask)",
    "choice": "vmapped (as an index)",
}


def describe(schema: type) -> list[KeyDoc]:
    """Every key of a config class: its type, default, allowed values or bounds, and meaning."""
    defaults = schema()
    out = []
    for path, f in field_info(schema).items():
        meta = f.metadata
        if meta.get("choices") is not None:
            allowed = ", ".join(map(str, meta["choices"]))
        else:
            low = "" if meta.get("low") is None else f"{'>' if meta.get('low_open') else '>='} {meta['low']}"
            high = "" if meta.get("high") is None else f"<= {meta['high']}"
            allowed = " and ".join(b for b in (low, high) if b)
        kind = getattr(f.type, "__name__", str(f.type))
        out.append(
            KeyDoc(path, kind, get_path(defaults, path), allowed, SWEEP_WORDS[sweep_mode(f)], meta.get("doc", ""))
        )
    return out


def sections_of(schema: type, kind: type, prefix: str = "") -> list[str]:
    """The dotted prefixes ("" for the schema itself, "optim." ...) of every `kind` section."""
    found = [prefix] if issubclass(schema, kind) else []
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        if dataclasses.is_dataclass(hints[f.name]):
            found += sections_of(hints[f.name], kind, f"{prefix}{f.name}.")
    return found


def sweep_mode(f: FieldInfo) -> str:
    mode = f.metadata.get("sweep")
    if mode:
        return mode
    return "traced" if f.type is float else "static"


def get_path(cfg, path: str):
    for part in path.split("."):
        cfg = getattr(cfg, part)
    return cfg


def replace_path(cfg, path: str, value):
    """A copy of a frozen (nested) dataclass with one dotted field replaced."""
    head, _, rest = path.partition(".")
    if not rest:
        return dataclasses.replace(cfg, **{head: value})
    return dataclasses.replace(cfg, **{head: replace_path(getattr(cfg, head), rest, value)})
