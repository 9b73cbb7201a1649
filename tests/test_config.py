import math
from dataclasses import dataclass

import numpy as np
import pytest

from gradlab import config, data, inits, models, norms, transforms
from gradlab.config import ExperimentConfig, param
from gradlab.errors import ConfigError


def write(tmp_path, text, name="exp.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def load(tmp_path, text, overrides=(), scale=None):
    return config.load("exp", ExperimentConfig, overrides, scale, write(tmp_path, text))


def test_scalar_overrides_are_parsed_as_yaml(tmp_path):
    spec = load(tmp_path, "steps: 5\nmodel: {depth: 3}\n", ["model.depth=32", "optim.lr=1e-3", "model.activation=relu"])
    assert spec.config.model.depth == 32
    assert spec.config.optim.lr == pytest.approx(1e-3)
    assert spec.config.model.activation == "relu"
    assert spec.axes == ()


def test_logspace_linspace_and_list_axes(tmp_path):
    spec = load(
        tmp_path,
        "optim: {lr: {logspace: [-4, -1, 4]}}\nmodel: {norm: [none, layernorm]}\n",
        ["model.bias_std={linspace: [0, 0.3, 4]}", "seeds=3"],
    )
    axes = {a.path: a for a in spec.axes}
    np.testing.assert_allclose(axes["optim.lr"].values, [1e-4, 1e-3, 1e-2, 1e-1], rtol=1e-12)
    np.testing.assert_allclose(axes["model.bias_std"].values, [0.0, 0.1, 0.2, 0.3], atol=1e-12)
    assert axes["model.norm"].values == ("none", "layernorm") and axes["model.norm"].mode == "static"
    assert axes["optim.lr"].mode == "traced"
    assert axes["seed"].values == (0, 1, 2)
    assert spec.axes[-1].path == "seed"


def test_plan_groups_static_axes_and_vmaps_traced_ones(tmp_path):
    spec = load(tmp_path, "model: {norm: [none, rmsnorm], depth: [2, 6], init: [he_normal, orthogonal]}\nseeds: 2\n")
    plan = config.plan(spec)
    assert len(plan.groups) == 2  # only the norm is static
    group = plan.groups[1]
    assert group.config.model.norm == "rmsnorm"
    assert group.config.model.depth == 6  # built at the largest depth, masked below it
    assert group.points == 2 * 2 * 2
    assert sorted(set(group.hp["model.depth"].tolist())) == [2, 6]
    assert sorted(set(group.hp["model.init"].tolist())) == [
        config.INIT_SCHEMES.index("he_normal"),
        config.INIT_SCHEMES.index("orthogonal"),
    ]
    assert group.hp["optim.lr"].dtype == np.float32 and np.all(group.hp["optim.lr"] == np.float32(0.01))


def test_hash_is_stable_and_changes_with_the_config(tmp_path):
    a = load(tmp_path, "steps: 5\n")
    b = load(tmp_path, "steps: 5\n")
    c = load(tmp_path, "steps: 6\n")
    assert a.hash == b.hash and a.hash != c.hash and len(a.hash) == 12


def test_scales_are_presets_overridden_by_the_command_line(tmp_path):
    text = "steps: 5\nscales:\n  quick: {steps: 7}\n  paper: {steps: 900, model.width: 512}\n"
    assert load(tmp_path, text).config.steps == 7
    assert load(tmp_path, text, scale="paper").config.model.width == 512
    assert load(tmp_path, text, ["steps=3"], scale="paper").config.steps == 3


@pytest.mark.parametrize(
    "text, overrides, expected",
    [
        ("", ["model.dpth=3"], "model.dpth: unknown key; did you mean 'model.depth'"),
        ("", ["model.depth=abc"], "model.depth"),
        ("", ["optim.lr=-1"], "optim.lr: must be > 0"),
        ("", ["optim.lr=0"], "optim.lr: must be > 0"),
        ("", ["model.depth=0"], "model.depth: must be >= 1"),
        ("", ["model.width=0"], "model.width: must be >= 1"),
        ("", ["model.init=glorot"], "allowed: zero, normal"),
        ("", ["model.activation=swish"], "model.activation: unknown value 'swish'"),
        ("", ["model.norm=batchnorm"], "allowed: none, layernorm, rmsnorm"),
        ("", ["optim.name=lamb"], "optim.name: unknown value 'lamb'"),
        ("", ["optim.schedule=cosin"], "did you mean 'cosine'"),
        ("", ["optim.lr={logspace: [-1, -4, 8]}"], "lo <= hi"),
        ("", ["optim.lr={logspace: [-4, -1, 0]}"], "count n"),
        ("", ["optim.lr={uniform: [0, 1]}"], "a mapping is not a value"),
        ("", ["model.norm=[none, 3]"], "one type"),
        ("", ["optim.lr=.nan"], "finite"),
        ("", ["optim.lr=.inf"], "finite"),
        ("", ["optim.lr=[]"], "empty list"),
        ("model: [1, 2\n", [], "malformed YAML at line"),
        ("- 1\n- 2\n", [], "top level must be a mapping"),
        ("a: &x [1, 2]\nb: *x\n", [], "anchors and aliases"),
        ("", ["nonsense"], "expected key=value"),
    ],
)
def test_user_errors_name_the_key_and_what_is_allowed(tmp_path, text, overrides, expected):
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text, overrides)
    message = str(info.value)
    assert expected in message
    assert "\n" not in message


def test_missing_file_directory_and_unknown_scale(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        config.load("x", ExperimentConfig, path=tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="is a directory"):
        config.load("x", ExperimentConfig, path=tmp_path)
    with pytest.raises(ConfigError, match=r"--scale 'huge'.*allowed: quick"):
        load(tmp_path, "scales: {quick: {steps: 2}}\n", scale="huge")


def test_errors_from_the_command_line_say_so(tmp_path):
    with pytest.raises(ConfigError, match=r"overridden on the command line\): optim.lr"):
        load(tmp_path, "", ["optim.lr=-1"])


def test_logspace_values_are_exact_powers():
    values = config.loader._axis_values({"logspace": [-5, 0, 6]}, "optim.lr", "x")
    assert all(math.isclose(v, 10.0**e, rel_tol=1e-12) for v, e in zip(values, range(-5, 1)))


@pytest.mark.parametrize("schedule", ["inverse_time", "[constant, inverse_time]"])
def test_inverse_time_ending_above_the_peak_is_refused(tmp_path, schedule):
    with pytest.raises(ConfigError, match=r"optim\.decay_rate: .*inverse_time.*\(0, 1\], got 2"):
        load(tmp_path, "optim: {decay_rate: 2.0}\n", [f"optim.schedule={schedule}"])
    # an exponential schedule may grow: decay_rate > 1 is allowed there
    assert load(tmp_path, "optim: {decay_rate: 2.0, schedule: exponential}\n").config.optim.decay_rate == 2.0


@dataclass(frozen=True)
class ProbedConfig(ExperimentConfig):
    """An experiment whose probe depths must lie within the model's depth."""

    probe_depth: int = param(2, low=1)

    def validate(self) -> None:
        if self.probe_depth > self.model.depth:
            raise ConfigError(
                f"must be at most model.depth ({self.model.depth}), got {self.probe_depth}", key="probe_depth"
            )


def load_probed(tmp_path, text, overrides=()):
    return config.load("exp", ProbedConfig, overrides, path=write(tmp_path, text))


def test_validate_accepts_a_good_config_and_every_swept_value(tmp_path):
    spec = load_probed(tmp_path, "model: {depth: 4}\nprobe_depth: [1, 4]\n")
    assert spec.axis("probe_depth").values == (1, 4)


@pytest.mark.parametrize(
    "text, overrides, where",
    [
        ("model: {depth: 4}\nprobe_depth: 5\n", [], "exp.yaml: probe_depth"),
        ("model: {depth: 4}\n", ["probe_depth=5"], "exp.yaml (overridden on the command line): probe_depth"),
        ("model: {depth: 4}\nprobe_depth: [1, 5, 2]\n", [], "exp.yaml: probe_depth"),
        ("model: {depth: [8, 4]}\nprobe_depth: 5\n", [], "exp.yaml: probe_depth"),
    ],
    ids=["file", "override", "second-swept-value", "other-swept-field"],
)
def test_validate_refuses_a_bad_value_naming_file_and_key(tmp_path, text, overrides, where):
    with pytest.raises(ConfigError) as info:
        load_probed(tmp_path, text, overrides)
    message = str(info.value)
    assert message == f"{tmp_path / where}: must be at most model.depth (4), got 5"
    assert "\n" not in message


def test_config_error_carries_its_key():
    assert ConfigError("bad", key="probe_depth").key == "probe_depth"
    assert ConfigError("bad").key is None and str(ConfigError("bad")) == "bad"


def test_choice_lists_come_from_the_modules_that_implement_them():
    assert config.ACTIVATIONS is models.ACTIVATIONS and config.DTYPES is models.DTYPES
    assert config.NORMS is norms.NORMS and config.TASKS is data.TASKS
    assert config.INIT_SCHEMES == tuple(inits.SCHEMES)
    assert config.OPTIMIZERS == transforms.OPTIMIZERS and {"adagrad", "lion"} <= set(config.OPTIMIZERS)
    assert config.SCHEDULES is transforms.SCHEDULES and config.CLIPPING is transforms.CLIPPING
    assert config.CONFIG_DIR.name == "configs" and (config.CONFIG_DIR / "gradient_flow.yaml").is_file()


def test_plan_carries_the_run_length(tmp_path):
    plan = config.plan(load(tmp_path, "steps: 10\nchunk_steps: 4\n"))
    assert (plan.steps, plan.chunk_steps) == (10, 4)
    assert config.plan(load(tmp_path, "steps: 3\nchunk_steps: 100\n")).chunk_steps == 3


@dataclass(frozen=True)
class PickingConfig(ExperimentConfig):
    """An experiment that takes only plain nets and picks its optimizer with a key of its own."""

    optimizer: str = param("sgd", choices=("sgd", "adam"), sweep="choice", doc="replaces optim.name")

    def validate(self) -> None:
        super().validate()
        self.require("model.norm", ("none",), "it measures a plain MLP")
        self.replaced("optim.name", by="optimizer")


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["model.norm=layernorm"], "model.norm: it measures a plain MLP; allowed: none, got 'layernorm'"),
        (
            ["optim.name=adam"],
            "optim.name: this experiment picks it with `optimizer` (allowed: sgd, adam); "
            "leave optim.name unset, got 'adam'",
        ),
    ],
)
def test_require_and_replaced_refuse_naming_the_key(tmp_path, overrides, expected):
    assert config.load("exp", PickingConfig, ["optimizer=[sgd, adam]"], path=write(tmp_path, "{}\n")).config
    with pytest.raises(ConfigError) as info:
        config.load("exp", PickingConfig, overrides, path=write(tmp_path, "{}\n"))
    assert str(info.value) == f"{tmp_path / 'exp.yaml'} (overridden on the command line): {expected}"
