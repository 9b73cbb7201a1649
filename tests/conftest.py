"""Strict numerics for every test: silent broadcasts raise."""

import jax
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def tiny_overrides():
    """A gradient_flow-sized model small enough to compile in a second or two."""
    return ["model.width=16", "model.depth=4", "data.examples=32", "data.input_dim=8"]
