"""Mean-field signal propagation in wide random networks, in numpy (no jax, no sampling).

A layer z' = W phi(z) + b with W_ij ~ N(0, sigma_w^2 / N), b_i ~ N(0, sigma_b^2) maps the
pre-activation length q and the correlation c of two inputs (Poole et al. 2016, eqs. 3-5):
  q'  = sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2                         (length map)
  c'  = (sigma_w^2 E[phi(u1) phi(u2)] + sigma_b^2) / q*                   (correlation map)
        u1 = sqrt(q*) z1, u2 = sqrt(q*) (c z1 + sqrt(1 - c^2) z2)
  chi_1 = sigma_w^2 E[phi'(sqrt(q*) z)^2]     the slope of the correlation map at c = 1, and
        the per-layer factor of the squared back-propagated gradient (Schoenholz et al. 2017,
        eq. 15: E[delta_l^2] = chi_1 E[delta_{l+1}^2]); chi_1 = 1 is the order-to-chaos edge.
Depth scales (Schoenholz et al. 2017, eqs. 7 and 9), the number of layers over which q and c
forget their input:
  xi_q^-1 = -ln(chi_1 + sigma_w^2 E[phi''(sqrt(q*) z) phi(sqrt(q*) z)])
  xi_c^-1 = -ln(sigma_w^2 E[phi'(u1) phi'(u2)])  at c = c*   (= -ln chi_1 when c* = 1)
Gaussian expectations are Gauss-Hermite quadrature (numpy.polynomial.hermite_e.hermegauss,
weight exp(-z^2/2)); every function broadcasts over numpy arrays of sigma_w^2, sigma_b^2, q, c.
At the end, how far a finite-width net's measured profile may stray from these, and xi_c as
fitted to the correlations measured in sampled nets.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
from numpy.polynomial.hermite_e import hermegauss

from gradlab import analysis

DEGREE = 200  # nodes: exact for polynomials of degree <= 399; even, so no node sits on a kink at 0
DEGREE_2D = 60  # per dimension of the tensor rule for E[f(u1) g(u2)]


class Activation(NamedTuple):
    """phi and its first two derivatives, as numpy ufunc-likes."""

    phi: Callable
    dphi: Callable
    d2phi: Callable


def _sech2(x):
    return 1.0 - np.tanh(x) ** 2


ACTIVATIONS = {
    "tanh": Activation(np.tanh, _sech2, lambda x: -2.0 * np.tanh(x) * _sech2(x)),
    "linear": Activation(lambda x: x, np.ones_like, np.zeros_like),
    "relu": Activation(lambda x: np.maximum(x, 0.0), lambda x: (x > 0).astype(float), np.zeros_like),
}


ActivationLike = str | Activation | tuple[Callable, Callable, Callable]  # a name in ACTIVATIONS, or the functions


def activation(name_or_fns: ActivationLike) -> Activation:
    """An Activation from its name in ACTIVATIONS, or the (phi, dphi, d2phi) given."""
    if isinstance(name_or_fns, Activation):
        return name_or_fns
    if isinstance(name_or_fns, str):
        if name_or_fns not in ACTIVATIONS:
            raise ValueError(f"no mean-field activation {name_or_fns!r}; known: {', '.join(ACTIVATIONS)}")
        return ACTIVATIONS[name_or_fns]
    return Activation(*name_or_fns)


@functools.cache
def gauss_hermite(degree: int = DEGREE) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights with sum(w f(z)) ~ E[f(z)], z ~ N(0, 1)."""
    nodes, weights = hermegauss(degree)
    return nodes, weights / np.sqrt(2.0 * np.pi)


def expect(f: Callable, q, degree: int = DEGREE) -> np.ndarray:
    """E[f(sqrt(q) z)] for z ~ N(0, 1), broadcast over q."""
    z, w = gauss_hermite(degree)
    q = np.asarray(q, float)
    return np.sum(w * f(np.sqrt(q)[..., None] * z), axis=-1)


def expect_pair(f: Callable, g: Callable, q, c, degree: int = DEGREE_2D) -> np.ndarray:
    """E[f(u1) g(u2)] for (u1, u2) Gaussian with variances q and correlation c, broadcast."""
    z, w = gauss_hermite(degree)
    z1, z2 = z[:, None], z[None, :]
    w2 = w[:, None] * w[None, :]
    q, c = np.broadcast_arrays(np.asarray(q, float), np.asarray(c, float))
    s = np.sqrt(q)[..., None, None]
    cc = c[..., None, None]
    u1 = s * z1
    u2 = s * (cc * z1 + np.sqrt(np.clip(1.0 - cc**2, 0.0, None)) * z2)
    return np.sum(w2 * f(u1) * g(u2), axis=(-2, -1))


def q_map(q, sigma_w2, sigma_b2, act: ActivationLike = "tanh") -> np.ndarray:
    """The length map q -> sigma_w^2 E[phi(sqrt(q) z)^2] + sigma_b^2."""
    phi = activation(act).phi
    return sigma_w2 * expect(lambda u: phi(u) ** 2, q) + sigma_b2


def q_profile(q0, sigma_w2, sigma_b2, layers: int, act: ActivationLike = "tanh") -> np.ndarray:
    """q^0, q^1, ..., q^layers under the length map: shape (layers + 1, *broadcast shape)."""
    q = np.broadcast_arrays(np.asarray(q0, float), np.asarray(sigma_w2, float), np.asarray(sigma_b2, float))[0]
    out = [q]
    for _ in range(layers):
        out.append(q_map(out[-1], sigma_w2, sigma_b2, act))
    return np.stack(out)


def q_map_slope(q, sigma_w2, act: ActivationLike = "tanh") -> np.ndarray:
    """d q_map / dq = sigma_w^2 E[phi'^2 + phi phi''] (Stein's lemma twice)."""
    a = activation(act)
    return sigma_w2 * expect(lambda u: a.dphi(u) ** 2 + a.phi(u) * a.d2phi(u), q)


def q_star(
    sigma_w2, sigma_b2, act: ActivationLike = "tanh", q0=1.0, tol=1e-12, max_iter=300, newton_iter=200
) -> np.ndarray:
    """The stable fixed point of the length map, by fixed-point iteration from q0.

    Points still moving after max_iter iterations (near sigma_w^2 = 1, sigma_b^2 = 0, where
    tanh approaches q* = 0 only like 1/(2l)) finish with Newton steps on q_map(q) - q, which
    from above the root move monotonically onto the stable fixed point (the map is concave).
    inf where the iterate grows without bound (ReLU with sigma_w^2 > 2).
    """
    arrays = np.broadcast_arrays(*(np.asarray(v, float) for v in (q0, sigma_w2, sigma_b2)))
    shape = arrays[0].shape
    q, sw2, sb2 = (a.ravel().copy() for a in arrays)
    active = np.arange(q.size)  # iterate only the points that have not converged

    def settle(update, iters):
        nonlocal active
        for _ in range(iters):
            if not active.size:
                return
            old = q[active]
            new = update(old, sw2[active], sb2[active])
            new = np.where(new > 1e12, np.inf, new)
            q[active] = new
            done = (np.abs(new - old) <= tol * np.maximum(1.0, np.abs(old))) | ~np.isfinite(new)
            active = active[~done]

    settle(lambda q, w, b: q_map(q, w, b, act), max_iter)

    def newton(q, w, b):
        step = (q_map(q, w, b, act) - q) / (q_map_slope(q, w, act) - 1.0)
        return np.maximum(q - np.nan_to_num(step), 0.0)

    settle(newton, newton_iter)
    return q.reshape(shape)


def chi_1(sigma_w2, q, act: ActivationLike = "tanh") -> np.ndarray:
    """sigma_w^2 E[phi'(sqrt(q) z)^2]: the per-layer factor of the squared gradient at length q."""
    dphi = activation(act).dphi
    return sigma_w2 * expect(lambda u: dphi(u) ** 2, q)


def c_map(c, q, sigma_w2, sigma_b2, act: ActivationLike = "tanh") -> np.ndarray:
    """The correlation map at the fixed length q (= q*)."""
    phi = activation(act).phi
    return (sigma_w2 * expect_pair(phi, phi, q, c) + sigma_b2) / q


def c_star(sigma_w2, sigma_b2, act: ActivationLike = "tanh", q=None, iters: int = 40) -> np.ndarray:
    """The stable fixed point of the correlation map: 1 where chi_1 <= 1 (ordered), otherwise
    the root of c_map(c) - c in [0, 1) by bisection (c_map(0) - c >= 0 > c_map(1-) - c there)."""
    q = q_star(sigma_w2, sigma_b2, act) if q is None else np.asarray(q, float)
    sw2, sb2, q = np.broadcast_arrays(np.asarray(sigma_w2, float), np.asarray(sigma_b2, float), q)
    out = np.ones(q.shape)
    chaotic = chi_1(sw2, q, act) > 1.0
    sw2, sb2, q = sw2[chaotic], sb2[chaotic], q[chaotic]
    lo, hi = np.zeros(q.shape), np.ones(q.shape)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        above = c_map(mid, q, sw2, sb2, act) > mid
        lo, hi = np.where(above, mid, lo), np.where(above, hi, mid)
    out[chaotic] = 0.5 * (lo + hi)
    return out


def chi_c(sigma_w2, sigma_b2, act: ActivationLike = "tanh", q=None, c=None) -> np.ndarray:
    """sigma_w^2 E[phi'(u1) phi'(u2)] at (q*, c*): the slope of the correlation map at c*."""
    q = q_star(sigma_w2, sigma_b2, act) if q is None else np.asarray(q, float)
    c = c_star(sigma_w2, sigma_b2, act, q) if c is None else np.asarray(c, float)
    dphi = activation(act).dphi
    return sigma_w2 * expect_pair(dphi, dphi, q, c)


def xi_c(sigma_w2, sigma_b2, act: ActivationLike = "tanh", q=None, c=None) -> np.ndarray:
    """The correlation depth scale -1 / ln chi_c (Schoenholz et al. 2017, eq. 9)."""
    return -1.0 / np.log(chi_c(sigma_w2, sigma_b2, act, q, c))


def xi_q(sigma_w2, sigma_b2, act: ActivationLike = "tanh", q=None) -> np.ndarray:
    """The length depth scale (Schoenholz et al. 2017, eq. 7)."""
    q = q_star(sigma_w2, sigma_b2, act) if q is None else np.asarray(q, float)
    a = activation(act)
    slope = chi_1(sigma_w2, q, a) + sigma_w2 * expect(lambda u: a.d2phi(u) * a.phi(u), q)
    return -1.0 / np.log(slope)


def dphi2_moment(q, k: int, act: ActivationLike = "tanh") -> np.ndarray:
    """E[phi'(sqrt(q) z)^(2k)]: the k-th moment of the squared diagonal D^2 of a layer's Jacobian."""
    dphi = activation(act).dphi
    return expect(lambda u: dphi(u) ** (2 * k), q)


def critical_line(q, act: ActivationLike = "tanh") -> tuple[np.ndarray, np.ndarray]:
    """(sigma_w^2, sigma_b^2) of the edge of chaos parametrised by its fixed point q*: chi_1 = 1
    gives sigma_w^2 = 1 / E[phi'(sqrt(q) z)^2], and q = q_map(q) then gives
    sigma_b^2 = q - sigma_w^2 E[phi(sqrt(q) z)^2] (Poole et al. 2016, Fig. 2)."""
    a = activation(act)
    sigma_w2 = 1.0 / expect(lambda u: a.dphi(u) ** 2, q)
    return sigma_w2, np.asarray(q, float) - sigma_w2 * expect(lambda u: a.phi(u) ** 2, q)


def critical_sigma_w2(
    sigma_b2: float | np.ndarray = 0.0, act: ActivationLike = "tanh", lo: float = 0.5, hi: float = 4.0, iters: int = 40
) -> np.ndarray:
    """The sigma_w^2 in [lo, hi] where chi_1 at the fixed point q* crosses 1, at each sigma_b^2, by bisection."""
    sigma_b2 = np.asarray(sigma_b2, float)
    below, above = np.full(sigma_b2.shape, lo), np.full(sigma_b2.shape, hi)
    for _ in range(iters):
        mid = 0.5 * (below + above)
        chaotic = chi_1(mid, q_star(mid, sigma_b2, act), act) > 1.0
        below, above = np.where(chaotic, below, mid), np.where(chaotic, mid, above)
    return 0.5 * (below + above)


# ----------------------------------------------------------------------------- finite width


def finite_width_slope_tolerance(layers: int, width: int, seeds: int, kappa: float, sigmas: float) -> float:
    """How far the fitted per-layer slope of ln E[h_l^2] may fall from mean field's at a finite width.

    A width-n layer multiplies the second moment m = E[h^2] by a random factor 1 + e with Var e =
    kappa / n (kappa = E[phi(u)^4] / E[phi(u)^2]^2 - 1 over its independent pre-activations u: 5 for
    ReLU, 2 for a linear net), so ln m_l is a random walk around the mean-field profile whose steps
    are independent across layers and seeds, each biased by E ln(1 + e) ~ -kappa / (2n). Returns
    `sigmas` standard deviations of the least-squares slope of the seed mean over `layers` layers
    (analysis.random_walk_slope_std) plus one layer's bias.
    """
    return sigmas * np.sqrt(kappa / (width * seeds)) * analysis.random_walk_slope_std(layers) + kappa / (2.0 * width)


def finite_width_end_tolerance(layers: int, width: int, seeds: int, kappa: float, sigmas: float) -> float:
    """`sigmas` standard deviations of ln(m_L / m_1), averaged over seeds, at a finite width: the end of
    the random walk of finite_width_slope_tolerance after layers - 1 steps of variance kappa / width."""
    return sigmas * np.sqrt(kappa * (layers - 1) / (width * seeds))


def fitted_correlation_depth_scale(one_minus_c, c_star, dev_max: float, where: np.ndarray | bool = True) -> np.ndarray:
    """xi_c as sampled nets show it: -1 / the slope of ln|c_l - c*| against the layer l.

    one_minus_c: (*grid, seeds, layers), per net the mean of 1 - c_l over input pairs at layers
    0..depth; c_star: (*grid,), the fixed point they approach. The fit is of the seed mean, over the
    layers l >= 1 where dev_max >= |c_l - c*| >= the noise floor, three standard errors of the seed
    mean late in the net (its last quarter, 2 layers at least: O(N^-1/2) in the chaotic phase; ~0 in
    the ordered one, where pairs converge together). NaN where fewer than 4 layers qualify and off
    `where` (the grid points to fit; all by default), inf where |c_l - c*| does not fall.
    """
    seeds, depth = one_minus_c.shape[-2], one_minus_c.shape[-1] - 1
    dev = np.abs(np.nanmean(one_minus_c, axis=-2) - (1.0 - c_star)[..., None])
    late = one_minus_c[..., -max(depth // 4, 2) :]
    floor = np.maximum(3.0 * np.nanmean(np.nanstd(late, axis=-2), axis=-1) / np.sqrt(seeds), 1e-6)
    xi = np.full(np.shape(c_star), np.nan)
    fit = np.broadcast_to(where, xi.shape)
    for index in np.ndindex(xi.shape):
        use = np.nonzero((dev[index] <= dev_max) & (dev[index] >= floor[index]))[0]
        use = use[use >= 1]
        if fit[index] and len(use) >= 4:
            slope = analysis.slope(use, np.log(dev[index][use]))
            xi[index] = -1.0 / slope if slope < 0 else np.inf
    return xi
