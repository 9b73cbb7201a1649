"""Curvature of a loss from Hessian-vector products: no Hessian is ever materialised.

  hvp(loss_fn, params, v)              H v as forward-over-reverse: jax.jvp of jax.grad
  flat_hvp(loss_fn, params)            the same on flat vectors (ravel_pytree), and the size n
  power_iteration(matvec, v, iters)    the eigenvalue of largest magnitude, warm-startable; `iters`
                                       may be traced: 0 iterations cost nothing, even under vmap
  top_eigenpair(matvec, v, iters)      the same for the top eigenvalue (a shifted rerun if negative)
  gated_top_eigenvalues(due, ...)      warm-started lambda_max of H (and of P^-1 H) in a training
                                       step, skipped on the steps it is not due
  lanczos(matvec, v, m)                the m x m tridiagonal (alphas, betas) of Lanczos, fully
                                       reorthogonalised; vmappable, no LAPACK inside
  gauss_quadrature / slq_density       stochastic Lanczos quadrature (numpy): nodes and weights
                                       of the spectral density, and its Gaussian-smoothed curve
  adam_preconditioner / preconditioned the diagonal P = sqrt(v_hat) + eps of an Adam state, and the
                                       symmetric P^-1/2 H P^-1/2, whose spectrum is that of P^-1 H
  top_eigenvalues                      lambda_max of the Hessian and of each leaf's diagonal block
  stability_threshold(optimizer, ...)  eta x lambda where GD, heavy-ball momentum and Adam turn
                                       unstable on a quadratic: 2, 2 + 2 beta, (2 + 2 b1)/(1 - b1)

A measurement inside a vmapped training step is gated with `gated(due, fn, init, *operands)`: a
while_loop that runs `fn` once when due and never otherwise. Under vmap a lax.cond with a per-lane predicate runs
both branches on every step; a while_loop runs while any lane's predicate holds, so when every lane
shares the step count (a sweep) the work is skipped on the steps between measurements.

Costs, in HVPs (each about two gradient evaluations): power iteration `iters` per measurement;
Lanczos m per probe vector, plus O(m n) memory per lane for the reorthogonalisation.

References: Cohen et al. 2021, "Gradient Descent on Neural Networks Typically Occurs at the Edge of
Stability"; Cohen et al. 2022, "Adaptive Gradient Methods at the Edge of Stability" (P^-1 H);
Ghorbani, Krishnan & Xiao 2019, "An Investigation into Neural Net Optimization via Hessian
Eigenvalue Density" (SLQ); Golub & Meurant 2010, "Matrices, Moments and Quadrature".
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

Matvec = Callable[[jax.Array], jax.Array]


def hvp(loss_fn, params, v):
    """The Hessian of loss_fn at params times the pytree v (forward-over-reverse)."""
    return jax.jvp(jax.grad(loss_fn), (params,), (v,))[1]


def flat_hvp(loss_fn, params) -> tuple[Matvec, int]:
    """(v -> H v on flat float32 vectors, n): the Hessian-vector product over ravel_pytree(params)."""
    flat, unravel = ravel_pytree(params)

    def matvec(v):
        return ravel_pytree(hvp(loss_fn, params, unravel(v.astype(flat.dtype))))[0]

    return matvec, flat.size


def top_eigenvalue(loss_fn, params, key, iterations: int = 40):
    """lambda_max of the Hessian of loss_fn at params: `iterations` power steps from a Gaussian
    vector, then the Rayleigh quotient (iterations + 1 HVPs). The largest-magnitude eigenvalue: the
    top one when, as for MSE nets near a minimum, no negative eigenvalue is larger in size."""
    matvec, n = flat_hvp(loss_fn, params)
    v = jax.lax.fori_loop(0, iterations, lambda _, v: matvec(v / jnp.linalg.norm(v)), jax.random.normal(key, (n,)))
    v = v / jnp.linalg.norm(v)
    return jnp.vdot(v, matvec(v))


def power_iteration(matvec: Matvec, v0, iterations) -> tuple[jax.Array, jax.Array]:
    """(Rayleigh quotient, unit vector) after `iterations` HVPs from v0; (nan, v0/|v0|) for 0.

    `iterations` may be a traced integer (a while_loop): warm-start v0 from the previous
    measurement's vector and a few iterations per measurement track a slowly moving lambda_max.
    """

    def body(carry):
        i, v, _ = carry
        w = matvec(v)
        return i + 1, w / jnp.linalg.norm(w), jnp.vdot(v, w)

    v0 = v0 / jnp.linalg.norm(v0)
    _, v, lam = jax.lax.while_loop(lambda c: c[0] < iterations, body, (jnp.int32(0), v0, jnp.float32(jnp.nan)))
    return lam, v


def top_eigenpair(matvec: Matvec, v0, iterations) -> tuple[jax.Array, jax.Array]:
    """power_iteration, made to find the top (algebraic) eigenvalue: when it converged on a negative
    one mu (the largest in size), a second run from v0 on H - mu I, whose largest-magnitude eigenvalue
    is lambda_max - mu. The second run costs `iterations` more HVPs on those measurements only."""
    lam, v = power_iteration(matvec, v0, iterations)
    negative = lam < 0  # False for nan (0 iterations)
    shift = jnp.where(negative, lam, 0.0)
    top, u = power_iteration(lambda w: matvec(w) - shift * w, v0, jnp.where(negative, iterations, 0))
    return jnp.where(negative, top + shift, lam), jnp.where(negative, u, v)


def gated(due, fn: Callable, init, *operands):
    """fn(*operands) when `due` else init, as a while_loop that runs its body once or never (see the
    module doc). The operands pass an optimisation barrier with the loop counter: a body that does
    not depend on the loop's carry is loop-invariant, and XLA would hoist it out of the loop and
    run it on every step."""

    def body(carry):
        count, ops = jax.lax.optimization_barrier((carry[0], operands))
        return count + 1, fn(*ops)

    return jax.lax.while_loop(lambda c: (c[0] < 1) & due, body, (jnp.int32(0), init))[1]


def gated_top_eigenvalues(due, loss, params, data, vectors, iterations, p_diag=None):
    """lambda_max of the Hessian H of loss(params, data) and, given p_diag, of P^-1 H, when `due`:
    (eigenvalues (k,), vectors (k, n)), top_eigenpair warm-started from `vectors` (k = 1, or 2 with
    p_diag: one row each). Gated: not due, nothing runs and it returns (nan, vectors). A vector that
    comes back non-finite (a zero Hessian) is not kept. Costs `iterations` HVPs per eigenvalue."""

    def measure(params, data, vectors, p_diag):
        flat = flat_hvp(lambda p: loss(p, data), params)[0]
        matvec = lambda v: flat(v).astype(vectors.dtype)  # noqa: E731 (low-precision params: float32 vectors)
        matvecs = [matvec] if p_diag is None else [matvec, preconditioned(matvec, p_diag)]
        pairs = [top_eigenpair(m, v, iterations) for m, v in zip(matvecs, vectors)]
        found = jnp.stack([v for _, v in pairs])
        kept = jnp.where(jnp.all(jnp.isfinite(found), axis=1, keepdims=True), found, vectors)
        return jnp.stack([lam for lam, _ in pairs]).astype(vectors.dtype), kept

    init = (jnp.full(vectors.shape[:1], jnp.nan, vectors.dtype), vectors)
    return gated(due, measure, init, params, data, vectors, p_diag)


def lanczos(matvec: Matvec, v0, m: int) -> tuple[jax.Array, jax.Array]:
    """(alphas (m,), betas (m - 1,)): the tridiagonal T = V^T H V of m Lanczos steps from v0.

    Every new vector is reorthogonalised against all earlier ones (twice, classical Gram-Schmidt),
    so the Ritz values carry no ghost copies; after an invariant subspace is found (beta ~ 0) the
    remaining vectors are zero and T decouples, leaving the quadrature unchanged.
    """
    n = v0.shape[0]
    v0 = v0 / jnp.linalg.norm(v0)
    basis = jnp.zeros((m, n), v0.dtype).at[0].set(v0)
    tiny = jnp.finfo(v0.dtype).eps

    def step(j, carry):
        basis, alphas, betas = carry
        v = basis[j]
        w = matvec(v)
        alpha = jnp.vdot(v, w)
        for _ in range(2):
            w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        nxt = jnp.where(beta > tiny * jnp.maximum(jnp.abs(alpha), 1.0), w / jnp.maximum(beta, tiny), 0.0)
        basis = jnp.where(j + 1 < m, basis.at[jnp.minimum(j + 1, m - 1)].set(nxt), basis)
        return basis, alphas.at[j].set(alpha), betas.at[j].set(jnp.where(jnp.any(nxt != 0), beta, 0.0))

    _, alphas, betas = jax.lax.fori_loop(0, m, step, (basis, jnp.zeros(m, v0.dtype), jnp.zeros(m, v0.dtype)))
    return alphas, betas[: m - 1]


def tridiagonal(alphas, betas):
    """The symmetric tridiagonal matrix with diagonal alphas and off-diagonal betas (numpy)."""
    alphas, betas = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)
    return np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)


def gauss_quadrature(alphas, betas) -> tuple[np.ndarray, np.ndarray]:
    """(nodes, weights) of the m-point Gauss quadrature of a Lanczos run (numpy, float64).

    Nodes are T's eigenvalues (Ritz values), weights the squared first components of its
    eigenvectors: sum_j w_j f(node_j) ~ v^T f(H) v / |v|^2, exact for polynomials of degree <= 2m - 1.
    Leading dims of alphas/betas (probes, lanes) are kept.
    """
    alphas, betas = np.asarray(alphas, np.float64), np.asarray(betas, np.float64)
    lead = alphas.shape[:-1]
    flat_a, flat_b = alphas.reshape(-1, alphas.shape[-1]), betas.reshape(-1, betas.shape[-1])
    nodes, weights = [], []
    for a, b in zip(flat_a, flat_b):
        theta, vectors = np.linalg.eigh(tridiagonal(a, b))
        nodes.append(theta)
        weights.append(vectors[0] ** 2)
    shape = lead + (alphas.shape[-1],)
    return np.reshape(nodes, shape), np.reshape(weights, shape)


def slq_density(nodes, weights, grid, sigma: float) -> np.ndarray:
    """The spectral density on `grid`: each node a Gaussian of width sigma times its weight, the
    average over probes (all leading dims). Integrates to 1 over a grid that covers the nodes."""
    nodes = np.asarray(nodes, np.float64).reshape(-1)
    weights = np.asarray(weights, np.float64).reshape(-1)
    grid = np.asarray(grid, np.float64)
    total = np.sum(weights)
    z = (grid[:, None] - nodes[None, :]) / sigma
    return np.exp(-0.5 * z**2) @ weights / (total * sigma * np.sqrt(2 * np.pi))


def moments(nodes, weights, ks) -> np.ndarray:
    """sum_j w_j node_j^k for each k, averaged over probes (leading dims): the SLQ estimate of
    tr(H^k) / n."""
    nodes, weights = np.asarray(nodes, np.float64), np.asarray(weights, np.float64)
    return np.array([np.mean(np.sum(weights * nodes**k, axis=-1)) for k in ks])


def slq(matvec: Matvec, n: int, key, probes: int, m: int) -> tuple[jax.Array, jax.Array]:
    """Lanczos tridiagonals of `probes` Rademacher vectors: alphas (probes, m), betas (probes, m - 1)."""
    signs = jax.random.rademacher(key, (probes, n), jnp.float32)
    return jax.lax.map(lambda v: lanczos(matvec, v, m), signs)


def lanczos_top_eigenvalue(matvec: Matvec, v0, m: int) -> jax.Array:
    """The largest Ritz value of m Lanczos steps: the top (algebraic) eigenvalue, fast to converge."""
    alphas, betas = lanczos(matvec, v0, m)
    t = jnp.diag(alphas) + jnp.diag(betas, 1) + jnp.diag(betas, -1)
    return jnp.linalg.eigvalsh(t)[-1]


def adam_preconditioner(opt_state, b2, eps):
    """The flat diagonal P = sqrt(v_hat) + eps of the (first) optax ScaleByAdamState in opt_state,
    v_hat = nu / (1 - b2^count) Adam's bias-corrected second moment (count: updates made)."""
    found = [
        s
        for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
        if isinstance(s, optax.ScaleByAdamState)
    ]
    if not found:
        raise ValueError("adam_preconditioner: the optimizer state holds no optax ScaleByAdamState")
    state = found[0]
    nu = ravel_pytree(state.nu)[0]
    correction = 1.0 - jnp.asarray(b2, nu.dtype) ** jnp.asarray(state.count, nu.dtype)
    return jnp.sqrt(nu / jnp.maximum(correction, jnp.finfo(nu.dtype).tiny)) + eps


def preconditioned(matvec: Matvec, p_diag) -> Matvec:
    """v -> P^-1/2 H P^-1/2 v for a positive diagonal P: symmetric, with the eigenvalues of P^-1 H."""
    scale = 1.0 / jnp.sqrt(p_diag)
    return lambda v: scale * matvec(scale * v)


def top_eigenvalues(loss_fn, params, key, steps: int = 30) -> tuple[float, np.ndarray]:
    """(lambda_max of the Hessian, lambda_max of each leaf's diagonal block H_bb: the loss's curvature
    along that leaf alone), each the largest Ritz value of `steps` Lanczos steps (fewer for a block
    of fewer entries: then exact), the top algebraic eigenvalue. Costs (1 + leaves) x steps HVPs."""
    sizes = [int(np.size(leaf)) for leaf in jax.tree.leaves(params)]
    n = sum(sizes)
    v0 = jax.random.normal(key, (n,))

    @partial(jax.jit, static_argnums=2)
    def run(params, mask, m):
        matvec = flat_hvp(loss_fn, params)[0]
        return lanczos(lambda v: mask * matvec(mask * v), mask * v0, m)

    def top(mask, size) -> float:
        return float(np.linalg.eigvalsh(tridiagonal(*run(params, mask, min(steps, size))))[-1])

    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(int)
    blocks = [top(jnp.zeros(n).at[a : a + size].set(1.0), size) for a, size in zip(starts, sizes)]
    return top(jnp.ones(n), n), np.asarray(blocks)


def stability_threshold(optimizer: str, momentum: float = 0.0, b1: float = 0.0) -> float:
    """eta x lambda at which `optimizer` ("sgd", "momentum" or "adam") turns unstable along an eigen-
    direction of curvature lambda of a quadratic (Cohen et al. 2021, 2022):
      sgd       2: the error follows e' = (1 - eta lambda) e
      momentum  2 + 2 beta: heavy ball, e'' = (1 + beta - eta lambda) e' - beta e, has a root of its
                characteristic polynomial z^2 - (1 + beta - eta lambda) z + beta at z = -1 there
      adam      (2 + 2 b1)/(1 - b1), in the preconditioned sharpness lambda(P^-1 H) with P held fixed:
                the update eta P^-1 m with m an EMA (b1) of gradients is heavy ball at rate
                eta (1 - b1) and momentum b1
    `momentum` is beta (used by "momentum" only), `b1` Adam's first-moment decay (by "adam" only)."""
    if optimizer == "momentum":
        return 2 + 2 * momentum
    if optimizer == "adam":
        return (2 + 2 * b1) / (1 - b1)
    if optimizer == "sgd":
        return 2.0
    raise ValueError(f"no stability threshold for optimizer {optimizer!r}")
