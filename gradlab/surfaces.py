"""Two-dimensional loss surfaces and gradient descent on them.

The bowl w0^2 + 4 w1^2 is a separable quadratic with Hessian diag(2, 8) (BOWL_CURVATURE). On any
L(w) = sum_i lambda_i w_i^2 / 2, gradient descent at rate eta multiplies coordinate i by
(1 - lambda_i eta) each step, so after t steps w_i = (1 - lambda_i eta)^t w_i(0) (`gd_closed_form`):
it converges iff eta < 2 / lambda_max. Rosenbrock's function (1 - w0)^2 + 100 (w1 - w0^2)^2 has its
minimum at (1, 1) at the end of a narrow curved valley. Both are written with operators only, so one
function serves jax and numpy arrays alike (SURFACE: the loss, its minimum and a title).

The cliff (Pascanu et al. 2013, Sec. 3 and Fig. 6): the loss (x_T - target)^2 of the one-unit
recurrent map x_t = w tanh(x_{t-1}) + b, as a function of (w, b) (`Cliff`, `rnn_final`, `cliff_loss`).
For w > cosh^2(x_0) the map has an unstable fixed point between two stable ones; along the line
b = x_0 - w tanh(x_0), x_0 sits on it and x_T jumps from one stable branch to the other, so the loss
falls a cliff whose gradient is orders of magnitude larger than anywhere else. `cliff_surface`
evaluates the loss and gradient over a (w, b) grid, `descend` runs gradient descent from beside the
wall with or without global-norm clipping.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# ----------------------------------------------------------------------------- the bowl and Rosenbrock

BOWL_CURVATURE = (2.0, 8.0)  # Hessian eigenvalues of w0^2 + 4 w1^2


def bowl(x, y):
    """w0^2 + 4 w1^2: curvatures 2 and 8, condition number 4, minimum at (0, 0)."""
    return x**2 + 4.0 * y**2


def rosenbrock(x, y):
    """(1 - w0)^2 + 100 (w1 - w0^2)^2 (Rosenbrock 1960), minimum at (1, 1)."""
    return (1.0 - x) ** 2 + 100.0 * (y - x**2) ** 2


class Surface(NamedTuple):
    loss: Callable  # (x, y) -> L, written with operators only so it serves jax and numpy
    minimum: tuple[float, float]
    title: str


SURFACE = {
    "bowl": Surface(bowl, (0.0, 0.0), r"bowl $w_0^2 + 4 w_1^2$"),
    "rosenbrock": Surface(rosenbrock, (1.0, 1.0), r"Rosenbrock $(1-w_0)^2 + 100(w_1-w_0^2)^2$"),
}


def gd_closed_form(start, lr: float, t: int, curvature=BOWL_CURVATURE) -> np.ndarray:
    """Gradient descent's iterate after t updates on sum_i lambda_i w_i^2 / 2 (lambda_i = curvature,
    the bowl by default) from `start`: w_i (1 - lambda_i eta)^t, eta as the float32 a program holds."""
    eta = float(np.float32(lr))
    return np.asarray([w0 * (1.0 - lam * eta) ** t for w0, lam in zip(start, curvature)])


# ----------------------------------------------------------------------------- the cliff


class Cliff(NamedTuple):
    """The one-neuron RNN of Pascanu et al. 2013, Fig. 6 (tanh instead of their sigmoid)."""

    steps: int = 50
    x0: float = 0.5
    target: float = -1.0
    w_range: tuple = (0.5, 3.0, 251)  # grid: lo, hi, points
    b_range: tuple = (-1.5, 0.5, 201)
    start: tuple = (2.5, -0.5)  # (w, b) beside the wall
    lr: float = 0.01
    tau: float = 5.0
    iterations: int = 80


CLIFF = Cliff()


def rnn_final(w, b, x0, steps: int):
    """x_T of x_t = w tanh(x_{t-1}) + b."""
    return jax.lax.scan(lambda x, _: (w * jnp.tanh(x) + b, None), jnp.asarray(x0, jnp.float32), None, length=steps)[0]


def cliff_loss(params, cliff: Cliff = CLIFF):
    """(x_T - target)^2 at params = (w, b)."""
    return jnp.square(rnn_final(params[0], params[1], cliff.x0, cliff.steps) - cliff.target)


def descend(cliff: Cliff, clip: bool) -> tuple[np.ndarray, np.ndarray]:
    """Gradient descent on the cliff loss from cliff.start: (points (iterations + 1, 2), losses)."""
    tx = optax.sgd(cliff.lr)
    if clip:
        tx = optax.chain(optax.clip_by_global_norm(cliff.tau), tx)
    loss_and_grad = jax.value_and_grad(lambda p: cliff_loss(p, cliff))

    def body(carry, _):
        p, opt_state = carry
        loss, g = loss_and_grad(p)
        u, opt_state = tx.update(g, opt_state, p)
        return (optax.apply_updates(p, u), opt_state), (p, loss)

    p0 = jnp.asarray(cliff.start, jnp.float32)
    (last, _), (points, losses) = jax.lax.scan(body, (p0, tx.init(p0)), None, length=cliff.iterations)
    points = np.vstack([np.asarray(points), np.asarray(last)[None]])
    return points, np.append(np.asarray(losses), float(cliff_loss(last, cliff)))


CLIFF_KEYS = ("w", "b", "loss", "grad", "plain", "plain_loss", "clipped", "clipped_loss")


def cliff_surface(cliff: Cliff = CLIFF) -> dict:
    """{CLIFF_KEYS: numpy arrays}: the (w, b) grid, the loss and gradient over it (vmapped), and the
    points and losses of both descents (`descend`: without, then with clipping)."""
    ws, bs = np.linspace(*cliff.w_range), np.linspace(*cliff.b_range)
    grid = jnp.stack(jnp.meshgrid(jnp.asarray(ws, jnp.float32), jnp.asarray(bs, jnp.float32), indexing="ij"), -1)
    f = jax.jit(jax.vmap(jax.vmap(jax.value_and_grad(lambda p: cliff_loss(p, cliff)))))
    loss, grad = (np.asarray(a, float) for a in f(grid))
    return dict(zip(CLIFF_KEYS, (ws, bs, loss, grad, *descend(cliff, clip=False), *descend(cliff, clip=True))))


def wall_slope(surface: dict) -> float:
    """max |L(w + h, b) - L(w, b)| / h over neighbouring grid points of a `cliff_surface`: by the mean
    value theorem the true max |dL/dw| between them is at least this, however thin the wall is."""
    return float(np.max(np.abs(np.diff(surface["loss"], axis=0)) / np.diff(surface["w"])[:, None]))


def step_lengths(points: np.ndarray) -> np.ndarray:
    """The Euclidean length of each step of a path of points (steps, dims): (steps - 1,)."""
    return np.linalg.norm(np.diff(points, axis=0), axis=1)
