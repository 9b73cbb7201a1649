"""Per-layer statistics computed inside the compiled step.

Every per-layer quantity has shape (layers,); layers not in use (beyond a masked depth) are NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from gradlab import models, sums
from gradlab.norms import at_least_f32


def frobenius(a) -> jax.Array:
    return jnp.sqrt(jnp.sum(jnp.square(at_least_f32(a))))


def nonfinite_fraction(a) -> jax.Array:
    return jnp.mean((~jnp.isfinite(a)).astype(jnp.float32))


def frobenius_rows(stack) -> jax.Array:
    """frobenius of each matrix of a stack, as one matrix-vector product (sums.row_*)."""
    return jnp.sqrt(sums.row_sums_of_squares(stack))


def nonfinite_fraction_rows(stack) -> jax.Array:
    """nonfinite_fraction of each matrix of a stack."""
    return sums.row_means((~jnp.isfinite(stack)).astype(jnp.float32))


def spectral_norm(w, squarings: int = 12) -> jax.Array:
    """||w||_2, the largest singular value, without LAPACK (see inits.orthonormalize).

    Squares g = w^T w `squarings` times, rescaling, so that g^(2^squarings) is dominated by the top
    eigenvector of w^T w (to (s_2 / s_1)^(2^(squarings + 1))), takes its largest column as that
    vector, and returns the square root of its Rayleigh quotient. Equal top singular values (an
    orthogonal w) are exact: any vector of that eigenspace gives the same quotient.
    """
    w = at_least_f32(w)
    g = w.T @ w

    def rescale(p):
        return p / jnp.maximum(jnp.max(jnp.abs(p)), jnp.finfo(p.dtype).tiny)

    p = jax.lax.fori_loop(0, squarings, lambda _, p: rescale(p @ p), rescale(g))
    v = jnp.take(p, jnp.argmax(jnp.sum(jnp.square(p), axis=0)), axis=1)
    vv = v @ v  # 0 only for w = 0
    return jnp.sqrt(safe_ratio(v @ g @ v, vv))


def safe_ratio(num, den):
    """num / den, 0 where den is 0 (a zero-initialised layer has no relative update)."""
    return jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)


def mlp_layer_stats(params, grads, updates, mask) -> dict:
    """Weight-matrix statistics per layer of an MLP (see models.py for the layer axis)."""
    grad_norm = models.per_layer_rows(grads, frobenius_rows)
    param_norm = models.per_layer_rows(params, frobenius_rows)
    update_norm = models.per_layer_rows(updates, frobenius_rows)
    stats = {
        "grad_norm": grad_norm,
        "param_norm": param_norm,
        "update_norm": update_norm,
        "update_ratio": safe_ratio(update_norm, param_norm),
        "grad_nonfinite": models.per_layer_rows(grads, nonfinite_fraction_rows),
    }
    return {k: jnp.where(mask, v, jnp.nan) for k, v in stats.items()}


# The global L2 norm of a pytree: what transforms.clip_by_global_norm compares with its threshold.
global_norm = sums.global_norm
