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
INIT_SCHEMES = tuple(SCHEMES)  # the choices of model.init; a scheme's index is its traced value
_TABLE = np.asarray([SCHEMES[n] for n in INIT_SCHEMES], np.float32)


def weight_std(scheme, fan_in: int, fan_out: int, init_std, init_gain):
    """The std a scheme gives a [fan_in, fan_out] weight; `scheme` is an index (may be traced)."""
    numerator, fan_mode, _ = jnp.asarray(_TABLE)[scheme]
    fans = jnp.asarray([fan_in, fan_out, (fan_in + fan_out) / 2.0, 1.0], jnp.float32)
    fan = fans[fan_mode.astype(jnp.int32)]
    std = jnp.sqrt(numerator / fan)
    std = jnp.where(fan_mode == FAN_NONE, init_std, std)
    return init_gain * std


def orthonormalize(a):
    """Gram-Schmidt (twice per column) of a's columns, or of its rows if it is wider than tall.

    Of a Gaussian matrix this is the Q of a QR factorisation with positive diagonal R, which
    is Haar distributed (Mezzadri 2007). Pure jnp, no LAPACK call: jaxlib's batched CPU QR
    can deadlock when two run at once on a small thread pool, and sweeps vmap this.
    """
    rows, cols = a.shape
    if rows < cols:
        return orthonormalize(a.T).T

    def column(j, q):
        v = jax.lax.dynamic_index_in_dim(a, j, axis=1, keepdims=False)
        earlier = (jnp.arange(cols) < j).astype(a.dtype)
        for _ in range(2):
            v = v - q @ ((q.T @ v) * earlier)
        return jax.lax.dynamic_update_index_in_dim(q, v / jnp.sqrt(jnp.sum(v * v)), j, axis=1)

    return jax.lax.fori_loop(0, cols, column, jnp.zeros_like(a))


def orthogonal(key, shape, dtype=jnp.float32):
    """A jax.nn.initializers-style orthogonal initializer (Haar, scale 1) by `orthonormalize`.

    For flax modules in a CPU sweep, in place of flax's QR-based default (errors.LapackOnCpuWarning).
    """
    return orthonormalize(jax.random.normal(key, shape, dtype))


def weight_from_normal(z, scheme, init_std, init_gain):
    """A [fan_in, fan_out] weight under a (traced) scheme index, from a standard normal draw z.

    One draw serves every distribution, so a sweep over schemes costs one random call: the
    uniform is sqrt(3) * erf(z / sqrt(2)) (the normal CDF maps z to U(-1, 1)), the orthogonal
    is z orthonormalized. Each is then scaled to unit entry variance and by the scheme's std.
    """
    fan_in, fan_out = z.shape
    units = {
        NORMAL: lambda: z,
        UNIFORM: lambda: np.sqrt(3.0) * jax.scipy.special.erf(z / np.sqrt(2.0)),
        ORTHOGONAL: lambda: orthonormalize(z) * np.sqrt(max(z.shape)),
    }
    if isinstance(scheme, (int, np.integer)):  # a scheme known when tracing: build only its own
        unit = units[int(_TABLE[scheme, 2])]()
    else:
        distribution = jnp.asarray(_TABLE)[scheme, 2]
        unit = jnp.select(
            [distribution == NORMAL, distribution == UNIFORM], [units[NORMAL](), units[UNIFORM]()], units[ORTHOGONAL]()
        )
    return weight_std(scheme, fan_in, fan_out, init_std, init_gain) * unit


def sample_weight(key, shape: tuple[int, int], scheme, init_std, init_gain):
    """One weight matrix of `shape` = (fan_in, fan_out) under a (traced) scheme index."""
    return weight_from_normal(jax.random.normal(key, shape), scheme, init_std, init_gain)


def scheme_index(name: str) -> int:
    return INIT_SCHEMES.index(name)


def sigma_w2(scheme: str, width: int, init_std: float = 0.0, init_gain: float = 1.0) -> float:
    """n Var(W) of a square width x width layer under a named scheme: the sigma_w^2 of mean-field
    theory (Var W = sigma_w^2 / n). Every fan is the width, so it is the scheme's numerator times
    gain^2, or width * (gain * init_std)^2 for `normal`, which ignores the fan."""
    numerator, fan_mode, _ = SCHEMES[scheme]
    return init_gain**2 * (width * init_std**2 if fan_mode == FAN_NONE else numerator)
