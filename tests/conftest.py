"""Strict numerics for every test: silent broadcasts raise."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def tiny_overrides():
    """A gradient_flow-sized model small enough to compile in a second or two."""
    return ["model.width=16", "model.depth=4", "data.examples=32", "data.input_dim=8"]


@pytest.fixture(scope="session", autouse=True)
def compilation_cache(tmp_path_factory):
    """Programs compiled by one test are reused by the next (and by each xdist worker)."""
    jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.getbasetemp().parent / "jax-cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


@pytest.fixture(scope="module")
def tiny(request, tmp_path_factory):
    """The test module's EXPERIMENT run once at its TINY overrides, figures drawn: (Outcome, out folder)."""
    from gradlab import api

    name = request.module.EXPERIMENT
    out = tmp_path_factory.mktemp(name)
    return api.execute(name, request.module.TINY, out=out, progress=False, draw=True), out
