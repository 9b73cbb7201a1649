"""Normalization layers as pure functions over one example's features (last axis)."""

import jax
import jax.numpy as jnp

NORMS = ("none", "layernorm", "rmsnorm")  # the kinds apply_norm knows


def at_least_f32(x):
    """x in float32, or in float64 if it already is: reductions never run in half precision."""
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _features(v, x):
    """A per-feature vector, shaped to broadcast explicitly against x's leading axes."""
    return jnp.reshape(v, (1,) * (x.ndim - 1) + jnp.shape(v))


def layer_norm(x, scale, bias, eps: float = 1e-5):
    """(x - mean) / sqrt(var + eps) * scale + bias over the last axis (Ba et al. 2016).

    Statistics are reduced in float32 whatever the compute dtype.
    """
    x32 = at_least_f32(x)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * _features(scale, x) + _features(bias, x)).astype(x.dtype)


def rms_norm(x, scale, eps: float = 1e-6):
    """x / sqrt(mean(x**2) + eps) * scale over the last axis (Zhang & Sennrich 2019)."""
    x32 = at_least_f32(x)
    ms = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    return (x32 * jax.lax.rsqrt(ms + eps) * _features(scale, x)).astype(x.dtype)


def apply_norm(kind: str, x, params):
    """Dispatch on the (static) norm kind; `params` holds `scale` and `bias`."""
    if kind == "layernorm":
        return layer_norm(x, params["scale"], params["bias"])
    if kind == "rmsnorm":
        return rms_norm(x, params["scale"])
    return x
