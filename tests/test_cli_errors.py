"""Mistakes a user makes on the command line: one line on stderr, exit 2, no traceback."""

import os
import subprocess
import sys

import pytest

TINY = ["model.width=8", "model.depth=2", "seeds=1", "data.examples=16", "data.input_dim=4",
        "model.activation=tanh", "model.norm=none", "model.residual=false"]


def gradlab(*args, cwd=None):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, "-m", "gradlab", *args], capture_output=True, text=True, cwd=cwd,
                          env=env, timeout=300)


def assert_one_line_error(result, *needles):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize(
    "args, needles",
    [
        (["run", "gradient_flw"], ["unknown experiment 'gradient_flw'", "did you mean 'gradient_flow'", "known:"]),
        (["run", "gradient_flow", "model.dept=3"], ["gradient_flow.yaml", "model.dept", "did you mean 'model.depth'"]),
        (["run", "gradient_flow", "model.depth=abc"], ["model.depth"]),
        (["run", "gradient_flow", "optim.lr=-1"], ["optim.lr", "must be > 0"]),
        (["run", "gradient_flow", "model.depth=0"], ["model.depth", "must be >= 1"]),
        (["run", "gradient_flow", "model.init=glorot"], ["model.init", "allowed: zero, normal, lecun_normal"]),
        (["run", "gradient_flow", "model.activation=swish"], ["model.activation", "allowed: tanh"]),
        (["run", "gradient_flow", "model.norm=batch"], ["model.norm", "allowed: none, layernorm, rmsnorm"]),
        (["run", "gradient_flow", "optim.name=lion"], ["optim.name", "allowed: sgd"]),
        (["run", "gradient_flow", "optim.lr={uniform: [1, 2]}"], ["optim.lr", "logspace"]),
        (["run", "gradient_flow", "--scale", "huge"], ["--scale 'huge'", "allowed: quick, paper"]),
        (["run", "gradient_flow", "--bogus"], ["unrecognized arguments: --bogus"]),
        (["run"], ["experiment"]),
    ],
)
def test_config_and_usage_errors(args, needles):
    assert_one_line_error(gradlab(*args), *needles)


def test_malformed_yaml_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  depth: [1, 2\n")
    assert_one_line_error(gradlab("run", "gradient_flow", "--config", str(bad)), str(bad), "malformed YAML at line")


def test_unwritable_output_folder_and_output_that_is_a_file(tmp_path):
    a_file = tmp_path / "file"
    a_file.write_text("keep me")
    assert_one_line_error(gradlab("run", "gradient_flow", *TINY, "--out", str(a_file)), str(a_file))
    assert a_file.read_text() == "keep me"
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        assert_one_line_error(gradlab("run", "gradient_flow", *TINY, "--out", str(locked)), "not writable")


def test_a_small_run_prints_checks_results_and_figure(tmp_path):
    result = gradlab("run", "gradient_flow", *TINY, "--quiet", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "results:" in result.stdout and "figure:" in result.stdout
    assert (tmp_path / "figures" / "gradient_flow.png").stat().st_size > 10_000
    again = gradlab("run", "gradient_flow", *TINY, "--quiet", "--out", str(tmp_path))
    assert "reused stored results" in again.stdout
