"""What a compiled program keeps and costs: XLA's own accounts, and the residuals reverse mode saves.

  compiled_profile(fn, args, repeats)         jit-compile fn at args and read XLA's memory analysis
                                              (temporary, argument and output bytes) and cost analysis
                                              (flops, transcendentals), then time calls (median)
  activation_residual_bytes(fn, args, b, w)   bytes of what jax.vjp keeps from the forward pass that
                                              are (b, w) activations: the shapes-level reference for
                                              the growth of a gradient program's temporary memory

A gradient program's temporary memory is dominated by the activations reverse mode keeps for the
backward pass, so its growth with depth should match the residual count, up to XLA's bookkeeping
and buffer reuse. XLA's cost analysis counts the body of a loop (a lax.scan) once, not once per
iteration: a difference of two programs' flops over one scan body is one body's difference.
"""

from __future__ import annotations

import time

import jax
import numpy as np


def compiled_profile(fn, args, repeats: int) -> dict:
    """jax.jit(fn) compiled at `args`: {temp_bytes, argument_bytes, output_bytes} from XLA's memory
    analysis, {flops, transcendentals} from its cost analysis (NaN where it reports none), and
    step_seconds, the median wall time of `repeats` calls after one warm-up call (all floats)."""
    compiled = jax.jit(fn).lower(*args).compile()
    memory = compiled.memory_analysis()
    assert memory is not None  # None where the backend has no memory analysis; CPU and GPU have it
    cost = compiled.cost_analysis() or {}
    cost = cost[0] if isinstance(cost, list) else cost
    jax.block_until_ready(compiled(*args))  # warm-up: first-call allocation and caching
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        seconds.append(time.perf_counter() - start)
    return {
        "temp_bytes": float(memory.temp_size_in_bytes),
        "argument_bytes": float(memory.argument_size_in_bytes),
        "output_bytes": float(memory.output_size_in_bytes),
        "step_seconds": float(np.median(seconds)),
        "flops": float(cost.get("flops", np.nan)),
        "transcendentals": float(cost.get("transcendentals", np.nan)),
    }


def activation_residual_bytes(fn, args, batch: int, width: int) -> int:
    """Bytes of the residuals jax.vjp(fn, *args) keeps that are activations: arrays ending in (batch, width).

    The vjp closure's leaves are exactly what reverse mode saves from the forward pass (weights and
    inputs it reads are among them, but do not end in (batch, width) unless width == in_dim, and the
    input x is counted once, not per layer). Shapes only: nothing is computed."""
    leaves = jax.eval_shape(lambda *a: jax.tree.leaves(jax.vjp(fn, *a)[1]), *args)
    return sum(int(np.prod(s.shape)) * s.dtype.itemsize for s in leaves if tuple(s.shape[-2:]) == (batch, width))
