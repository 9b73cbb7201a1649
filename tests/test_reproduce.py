"""`gradlab reproduce`: runs the catalog, reuses stored results, one table, --check's exit code."""

import contextlib
import io

import pytest

from gradlab import cli
from gradlab.experiments import Check, quadratic


def reproduce(*args):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(["reproduce", "--quiet", *args])
    return code, out.getvalue(), err.getvalue()


def test_reproduce_runs_then_reuses_and_tables_every_check(tmp_path):
    code, out, _ = reproduce("--only", "quadratic", "--out", str(tmp_path), "--check")
    assert code == 0, out
    assert "[1/1] quadratic: pass (ran" in out
    ds_checks = __import__("gradlab.api").api.checks(__import__("gradlab").load(next((tmp_path / "runs").iterdir())))
    for check in ds_checks:  # every check of the experiment is a row of the table
        assert check.name in out
    assert (tmp_path / "figures" / "quadratic.png").stat().st_size > 10_000
    assert "1 of 1 experiments pass all checks" in out

    code, out, _ = reproduce("--only", "quadratic", "--out", str(tmp_path), "--check")
    assert code == 0 and "quadratic: pass (stored results" in out


def test_a_failing_check_fails_reproduce_check_only(tmp_path, monkeypatch):
    failing = Check("a check that fails", 2.0, "<= 1", False)
    monkeypatch.setattr(quadratic, "checks", lambda ds: [failing])
    code, out, _ = reproduce("--only", "quadratic", "--out", str(tmp_path))
    assert code == 0 and "FAIL" in out and "failing: quadratic" in out
    code, out, _ = reproduce("--only", "quadratic", "--out", str(tmp_path), "--check")
    assert code == 1


@pytest.mark.parametrize(
    "args, message",
    [
        (["--only", "quadratc"], "unknown experiment 'quadratc' (did you mean 'quadratic'?)"),
        (["--scale", "huge", "--only", "quadratic"], "--scale 'huge' is not a preset"),
    ],
)
def test_bad_reproduce_arguments_are_one_line_and_exit_2(tmp_path, args, message):
    code, out, err = reproduce(*args, "--out", str(tmp_path))
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
