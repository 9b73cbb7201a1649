"""CLI conventions: --version, help that lists the experiments, shell completion that completes
experiment names and config keys, and the note on results stored by another version."""

import shutil
import subprocess
import sys

import pytest

from gradlab import api, experiments, results


def gradlab(*args):
    return subprocess.run([sys.executable, "-m", "gradlab", *args], capture_output=True, text=True)


def test_version_names_gradlab_and_jax():
    from importlib.metadata import version

    import gradlab as package

    out = gradlab("--version")
    assert out.returncode == 0
    assert out.stdout.startswith(f"gradlab {package.__version__} (jax {version('jax')}")


def test_run_help_lists_every_experiment_sweep_syntax_and_environment():
    out = gradlab("run", "--help").stdout
    for name in experiments.names():
        assert name in out
    for needle in (
        "logspace",
        "linspace",
        "GRADLAB_CACHE_DIR",
        "JAX_COMPILATION_CACHE_DIR",
        "XDG_CACHE_HOME",
        "XLA_FLAGS",
        "gradlab run mine.yaml",
    ):
        assert needle in out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash to source the script")
@pytest.mark.parametrize(
    "line, expected",
    [
        ("gradlab run gradient_f", "gradient_flow"),
        ("gradlab run gradient_flow model.dep", "model.depth="),
        ("gradlab show init_schemes sch", "scheme="),
        ("gradlab rep", "reproduce"),
    ],
)
def test_bash_completion_completes_experiments_and_keys(tmp_path, line, expected):
    script = tmp_path / "gradlab.bash"
    out = gradlab("completion", "bash")
    assert out.returncode == 0
    script.write_text(out.stdout)
    words = line.split(" ")
    probe = (
        f'source {script}; COMP_WORDS=({line}); COMP_CWORD={len(words) - 1}; COMP_LINE="{line}"; '
        'COMP_POINT=${#COMP_LINE}; _shtab_gradlab; printf "%s\\n" "${COMPREPLY[@]}"'
    )
    replies = subprocess.run(["bash", "-c", probe], capture_output=True, text=True).stdout.split()
    assert expected in replies


def test_zsh_completion_script_is_made():
    out = gradlab("completion", "zsh")
    assert out.returncode == 0 and "#compdef gradlab" in out.stdout and "model.depth=" in out.stdout


def test_results_of_another_version_are_reused_with_a_note(tmp_path):
    tiny = ["model.width=8", "model.depth=2", "seeds=1", "data.examples=16"]
    first = api.execute("gradient_flow", tiny, scale="tiny", out=tmp_path, progress=False, draw=False)
    ds = results.load(first.run_dir)
    ds.attrs["version_jax"] = "0.0.1"
    results.save(ds, first.run_dir / results.RESULTS_FILE)
    notes = []
    again = api.execute(
        "gradient_flow", tiny, scale="tiny", out=tmp_path, progress=False, draw=False, on_note=notes.append
    )
    assert again.cached and len(notes) == 1
    assert "jax 0.0.1" in notes[0] and "--fresh" in notes[0] and "\n" not in notes[0]
