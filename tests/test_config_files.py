"""Config files a user writes, keeps and reruns: layering, numbers read as numbers, the round trip
`gradlab show > file; gradlab run file` to the same hash, and every example in configs/."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from gradlab import api, config
from gradlab.errors import ConfigError

EXAMPLES = Path(__file__).resolve().parent.parent / "configs"
# Each example, shrunk on the command line to a run of seconds (the file itself stays as users see it).
SHRINK = {
    "deep_gradient_flow.yaml": ["model.width=32", "seeds=1", "data.examples=32"],
    "adam_lr_sweep.yaml": ["model.width=8", "steps=20", "chunk_steps=20", "optim.lr={logspace: [-4, -2, 3]}"],
    "rosenbrock_lion.yaml": ["steps=200", "chunk_steps=200"],
}


@pytest.mark.parametrize(
    "value, expected",
    [
        ("1e-4", 1e-4),
        ("1E3", 1000.0),
        (".5", 0.5),
        ("-2.5e-3", -2.5e-3),
        ("3", 3),
        ("-inf", -math.inf),
    ],
)
def test_overrides_read_numbers_as_numbers(value, expected):
    _, parsed = config.parse_override(f"optim.lr={value}")
    assert parsed == expected and type(parsed) is type(expected)


def test_a_list_of_exponent_floats_is_a_float_sweep():
    spec = api.resolve("gradient_flow", ["optim.weight_decay=[1e-4, 0.1]", "optim.lr=[1, 0.5]"])
    assert spec.axis("optim.weight_decay").values == (1e-4, 0.1)
    assert spec.axis("optim.lr").values == (1.0, 0.5)
    assert all(type(v) is float for v in spec.axis("optim.lr").values)


@pytest.mark.parametrize("value, needle", [("-inf", "finite"), ("nan", "finite"), ("-1", "must be > 0")])
def test_a_bad_learning_rate_is_refused_naming_the_key(value, needle):
    with pytest.raises(ConfigError, match=rf"optim\.lr: .*{needle}") as e:
        api.resolve("gradient_flow", [f"optim.lr={value}"])
    assert "overridden on the command line" in str(e.value)


@pytest.mark.parametrize(
    "experiment, overrides, scale",
    [
        ("gradient_flow", [], None),
        ("lr_sweep", ["optim.lr={logspace: [-4, -1, 7]}", "seeds=3"], "tiny"),
        ("quadratic", ["seed=[3, 5]"], None),
        ("init_schemes", ["model.width=48", "optim.weight_decay=1e-4"], "paper"),
    ],
)
def test_show_prints_a_file_that_runs_to_the_same_hash(tmp_path, experiment, overrides, scale):
    spec = api.resolve(experiment, overrides, scale)
    mine = tmp_path / "mine.yaml"
    mine.write_text(config.runnable_yaml(spec))
    again = api.resolve(str(mine))
    assert again.experiment == experiment and again.hash == spec.hash
    assert config.runnable_yaml(again) == mine.read_text()


def test_a_file_holds_only_what_it_changes_and_is_layered(tmp_path):
    mine = tmp_path / "deeper.yaml"
    mine.write_text("experiment: gradient_flow\nmodel:\n  depth: 32\noptim:\n  lr: 3e-4\n")
    own = api.resolve("gradient_flow")
    spec = api.resolve(str(mine))
    assert spec.config.model.depth == 32 and spec.config.optim.lr == 3e-4
    # Everything else, sweep axes and the default (quick) preset included, is the experiment's own.
    assert spec.config.model.width == own.config.model.width
    assert [a.path for a in spec.axes] == [a.path for a in own.axes]
    # The command line wins over the file, an explicit --scale picks another preset.
    assert api.resolve(str(mine), ["model.depth=40"]).config.model.depth == 40
    paper = api.resolve(str(mine), scale="paper")
    assert paper.scale == "paper" and paper.config.model.depth == 32


def test_a_seed_list_in_a_file_replaces_the_seeds_count(tmp_path):
    mine = tmp_path / "seeds.yaml"
    mine.write_text("experiment: gradient_flow\nseed: [7, 9]\n")
    assert api.resolve(str(mine)).axis("seed").values == (7, 9)


@pytest.mark.parametrize(
    "text, needle",
    [
        ("model:\n  depth: 32\n", "experiment: a config file names its experiment"),
        ("experiment: gradient_flo\n", "unknown experiment 'gradient_flo'"),
        ("experiment: gradient_flow\nmodel:\n  detph: 3\n", "model.detph: unknown key"),
        ("experiment: gradient_flow\noptim:\n  lr: -1\n", "mine.yaml: optim.lr: must be > 0"),
        ("experiment: gradient_flow\nscale: huge\n", "scale: 'huge' is not a preset"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_file_and_key(tmp_path, text, needle):
    mine = tmp_path / "mine.yaml"
    mine.write_text(text)
    with pytest.raises(Exception, match=needle.replace("(", r"\(").replace(".", r"\.")) as e:
        api.resolve(str(mine))
    assert "\n" not in str(e.value)


def test_a_run_folders_config_runs_again_to_the_same_folder(tmp_path):
    first = api.execute(
        "gradient_flow",
        ["model.width=8", "model.depth=2", "seeds=1", "data.examples=16"],
        scale="tiny",
        out=tmp_path,
        progress=False,
        draw=False,
    )
    again = api.execute(str(first.run_dir / "config.yaml"), out=tmp_path, progress=False, draw=False)
    assert again.cached and again.run_dir == first.run_dir


def test_examples_are_all_covered_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.yaml")) == sorted(SHRINK)


@pytest.mark.parametrize("name", sorted(SHRINK))
def test_every_example_resolves_and_runs(tmp_path, name):
    path = EXAMPLES / name
    text = path.read_text()
    assert text.startswith("#") and "gradlab run configs/" + name in text  # says how to run it
    spec = api.resolve(str(path))
    assert spec.experiment == yaml.safe_load(text)["experiment"]
    outcome = api.execute(str(path), SHRINK[name], out=tmp_path, progress=False, draw=True)
    assert int(outcome.dataset["diverged"].size) > 0
    assert (tmp_path / "figures" / f"{spec.experiment}.png").exists()


def test_the_cli_runs_a_file_and_show_round_trips(tmp_path):
    shown = subprocess.run(
        [sys.executable, "-m", "gradlab", "show", "gradient_flow", "model.depth=6"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    mine = tmp_path / "mine.yaml"
    mine.write_text(shown)
    again = subprocess.run(
        [sys.executable, "-m", "gradlab", "show", str(mine)], capture_output=True, text=True, check=True
    ).stdout
    assert again == shown
