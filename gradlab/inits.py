"""Initialization schemes as numbers, so the scheme itself can be a vmapped sweep axis.

A scheme is (variance numerator, fan mode, distribution): the weight std is
`gain * sqrt(numerator / fan)`, drawn from a unit-variance normal, uniform or (scaled)
orthogonal matrix. `zero` has numerator 0; `normal` ignores the fan and uses `init_std`.
References: LeCun et al. 1998; Glorot & Bengio 2010 (Xavier); He et al. 2015; Saxe et al. 2014
(orthogonal).
"""

import jax
import jax.numpy as jnp
import numpy as np

from gradlab.config import INIT_SCHEMES

FAN_IN, FAN_OUT, FAN_AVG, FAN_NONE = 0, 1, 2, 3
NORMAL, UNIFORM, ORTHOGONAL = 0, 1, 2

# name: (variance numerator, fan mode, distribution)
SCHEMES = {
    "zero": (0.0, FAN_IN, NORMAL),
    "normal": (1.0, FAN_NONE, NORMAL),
    "lecun_normal": (1.0, FAN_IN, NORMAL),
    "lecun_uniform": (1.0, FAN_IN, UNIFORM),
    "xavier_normal": (1.0, FAN_AVG, NORMAL),
    "xavier_uniform": (1.0, FAN_AVG, UNIFORM),
    "he_normal": (2.0, FAN_IN, NORMAL),
    "he_uniform": (2.0, FAN_IN, UNIFORM),
    "orthogonal": (1.0, FAN_IN, ORTHOGONAL),
}
assert tuple(SCHEMES) == INIT_SCHEMES, "inits.SCHEMES and config.INIT_SCHEMES disagree"
_TABLE = np.asarray([SCHEMES[n] for n in INIT_SCHEMES], np.float32)


def weight_std(scheme, fan_in: int, fan_out: int, init_std, init_gain):
    """The std a scheme gives a [fan_in, fan_out] weight; `scheme` is an index (may be traced)."""
    numerator, fan_mode, _ = jnp.asarray(_TABLE)[scheme]
    fans = jnp.asarray([fan_in, fan_out, (fan_in + fan_out) / 2.0, 1.0], jnp.float32)
    fan = fans[fan_mode.astype(jnp.int32)]
    std = jnp.sqrt(numerator / fan)
    std = jnp.where(fan_mode == FAN_NONE, init_std, std)
    return init_gain * std


def orthogonal(key, shape: tuple[int, int], dtype=jnp.float32):
    """A Haar-random matrix with orthonormal columns (rows, if wider than tall).

    Classical Gram-Schmidt, done twice per column, of a Gaussian matrix: the Q of a QR
    factorisation with positive diagonal R, which is Haar distributed (Mezzadri 2007).
    Pure jnp, no LAPACK call: jaxlib's batched CPU QR can deadlock when two run at once on
    a small thread pool, and a sweep vmaps this over layers, seeds and schemes.
    """
    rows, cols = shape
    if rows < cols:
        return orthogonal(key, (cols, rows), dtype).T
    a = jax.random.normal(key, shape, jnp.float32)

    def column(j, q):
        v = jax.lax.dynamic_index_in_dim(a, j, axis=1, keepdims=False)
        earlier = (jnp.arange(cols) < j).astype(a.dtype)
        for _ in range(2):
            v = v - q @ ((q.T @ v) * earlier)
        return jax.lax.dynamic_update_index_in_dim(q, v / jnp.sqrt(jnp.sum(v * v)), j, axis=1)

    return jax.lax.fori_loop(0, cols, column, jnp.zeros_like(a)).astype(dtype)


def sample_weight(key, shape: tuple[int, int], scheme, init_std, init_gain, dtype=jnp.float32):
    """One weight matrix of `shape` = (fan_in, fan_out) under a (traced) scheme index."""
    fan_in, fan_out = shape
    distribution = jnp.asarray(_TABLE)[scheme, 2]
    k_normal, k_uniform, k_orth = jax.random.split(key, 3)
    unit_normal = jax.random.normal(k_normal, shape, dtype)
    unit_uniform = jax.random.uniform(k_uniform, shape, dtype, -np.sqrt(3.0), np.sqrt(3.0))
    # Orthonormal columns (or rows) have entries of variance 1/max(shape): rescale to unit.
    unit_orth = orthogonal(k_orth, shape, dtype) * np.sqrt(max(shape))
    unit = jnp.select([distribution == NORMAL, distribution == UNIFORM], [unit_normal, unit_uniform], unit_orth)
    return weight_std(scheme, fan_in, fan_out, init_std, init_gain) * unit


def scheme_index(name: str) -> int:
    return INIT_SCHEMES.index(name)
