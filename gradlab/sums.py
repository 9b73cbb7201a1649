"""Whole-array sums as matrix-vector products, which XLA:CPU runs several times faster.

XLA:CPU reduces a large array to one number at about 3 GB/s on the 2-core machine the
benchmarks ran on (`jnp.sum` of a 31 MB leaf: 5.6 ms); the same sum as a dot with ones goes
through Eigen at 30 GB/s (1 ms). A sweep step takes several such sums (the global norm that
clipping compares, the finiteness check of the state), and using dots ran workload W about
8% faster. Small arrays keep the plain reduction. Both accumulate in float32 (float64 for
float64 input), in another order than `jnp.sum`: the last bits differ.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradlab.norms import at_least_f32

DOT_FROM = 4096  # entries; below this a plain reduction is as fast


def total(x) -> jax.Array:
    """The sum of x's entries, in at least float32."""
    x = jnp.ravel(at_least_f32(jnp.asarray(x)))
    return jnp.dot(x, jnp.ones_like(x)) if x.size >= DOT_FROM else jnp.sum(x)


def sum_of_squares(x) -> jax.Array:
    """The sum of x's squared entries, in at least float32."""
    x = jnp.ravel(at_least_f32(jnp.asarray(x)))
    return jnp.dot(x, x) if x.size >= DOT_FROM else jnp.sum(jnp.square(x))


def global_norm(tree) -> jax.Array:
    """The L2 norm of every float in a pytree together."""
    return jnp.sqrt(sum(sum_of_squares(x) for x in jax.tree.leaves(tree)))
