"""Strict numerics for every test: silent broadcasts raise; XLA set up as for a CLI run."""

import fcntl
import os

import jax
import pytest

from gradlab import runtime

jax.config.update("jax_numpy_rank_promotion", "raise")


def pytest_configure():
    """XLA:CPU as the CLI runs it (YNNPACK off), before any test module computes at import."""
    runtime.xla_cpu_defaults()


@pytest.fixture
def tiny_overrides():
    """A gradient_flow-sized model small enough to compile in a second or two."""
    return ["model.width=16", "model.depth=4", "data.examples=32", "data.input_dim=8"]


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Programs compiled by one test are reused by the next (and by each xdist worker)."""
    runtime.compilation_cache(tmp_path_factory.getbasetemp().parent / "jax-cache")


@pytest.fixture(scope="module")
def tiny(request, tmp_path_factory):
    """The test module's EXPERIMENT run once at its TINY overrides, figures drawn: (Outcome, out folder)."""
    from gradlab import api

    name = request.module.EXPERIMENT
    out = tmp_path_factory.mktemp(name)
    return api.execute(name, request.module.TINY, out=out, progress=False, draw=True), out


@pytest.fixture(scope="session")
def tiny_scale(tmp_path_factory):
    """run(name) -> (Outcome, out folder): the experiment at its `tiny` scale as `gradlab run` makes
    it (no overrides, figures drawn), made once per session and shared by every test and xdist
    worker that reads it. The first to ask runs it; the others wait on a lock and reuse its stored
    results, as a second `gradlab run` would."""
    from gradlab import api

    root = tmp_path_factory.getbasetemp()
    if "PYTEST_XDIST_WORKER" in os.environ:
        root = root.parent  # the workers' folders sit side by side in one

    def run(name: str):
        out = root / "tiny-scale" / name
        out.mkdir(parents=True, exist_ok=True)
        with open(out / ".test-lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
            return api.execute(name, [], "tiny", out=out, progress=False, draw=True), out

    return run
