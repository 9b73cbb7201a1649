"""Strict numerics for every test: silent broadcasts raise; XLA set up as for a CLI run."""

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
