"""gradlab.surfaces: the bowl and Rosenbrock at hand-computed points, their minima and curvature from
jax derivatives, GD's closed form on the bowl against a float64 loop; the cliff of the one-neuron RNN
against a numpy loop, finite differences and its fold, and both descents on it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import surfaces


def test_surfaces_at_hand_computed_points_in_numpy_and_jax():
    # bowl(3, 2) = 9 + 4 * 4; rosenbrock(-1.2, 1) = 2.2^2 + 100 (1 - 1.44)^2 = 4.84 + 19.36
    for name, point, value in (("bowl", (3.0, 2.0), 25.0), ("rosenbrock", (-1.2, 1.0), 24.2)):
        loss = surfaces.SURFACE[name].loss
        assert loss(*point) == pytest.approx(value, rel=1e-12)
        assert float(loss(*(jnp.float32(v) for v in point))) == pytest.approx(value, rel=1e-5)
    np.testing.assert_allclose(surfaces.bowl(np.array([1.0, -2.0]), np.array([0.5, 0.0])), [2.0, 4.0])


@pytest.mark.parametrize("name", ["bowl", "rosenbrock"])
def test_minimum_has_zero_loss_and_gradient_and_positive_curvature(name):
    s = surfaces.SURFACE[name]
    f = lambda w: s.loss(w[0], w[1])
    w = jnp.asarray(s.minimum, jnp.float32)
    assert float(f(w)) == 0.0
    np.testing.assert_array_equal(np.asarray(jax.grad(f)(w)), [0.0, 0.0])
    assert np.all(np.linalg.eigvalsh(np.asarray(jax.hessian(f)(w))) > 0)


def test_bowl_hessian_is_diag_of_its_curvatures():
    f = lambda w: surfaces.bowl(w[0], w[1])
    hessian = np.asarray(jax.hessian(f)(jnp.asarray([0.3, -1.7])))
    np.testing.assert_allclose(hessian, np.diag(surfaces.BOWL_CURVATURE), rtol=1e-6)


@pytest.mark.parametrize("lr, t", [(0.15, 30), (0.24, 7), (0.26, 30), (0.01, 0)])
def test_gd_closed_form_equals_a_gradient_descent_loop(lr, t):
    """w <- w - eta (2 w0, 8 w1) in float64 at the float32 eta, t times."""
    eta = float(np.float32(lr))
    w = np.array([3.0, 2.0])
    for _ in range(t):
        w = w - eta * np.array([2 * w[0], 8 * w[1]])
    np.testing.assert_allclose(surfaces.gd_closed_form((3.0, 2.0), lr, t), w, rtol=1e-12)


def test_gd_closed_form_takes_other_curvatures():
    # lambda = (1, 4), eta = 0.5: factors 1/2 and -1 per step
    np.testing.assert_allclose(surfaces.gd_closed_form((8.0, 1.0), 0.5, 3, curvature=(1.0, 4.0)), [1.0, -1.0])


def test_step_lengths_of_a_path():
    np.testing.assert_allclose(
        surfaces.step_lengths(np.array([[0.0, 0.0], [3.0, 4.0], [3.0, 4.0], [2.0, 4.0]])), [5, 0, 1]
    )


def test_wall_slope_is_the_largest_difference_quotient_along_w():
    grid = {"w": np.array([0.0, 0.5, 1.5]), "loss": np.array([[0.0, 1.0], [2.0, 1.0], [2.0, -4.0]])}
    assert surfaces.wall_slope(grid) == pytest.approx(5.0)  # |-4 - 1| / 1, against |2 - 0| / 0.5 = 4


# ----------------------------------------------------------------------------- the cliff


def test_rnn_final_equals_a_numpy_loop_and_its_gradient_finite_differences():
    def loop(w, b, steps=50, x=0.5):
        for _ in range(steps):
            x = w * np.tanh(x) + b
        return x

    for w, b in [(0.7, 0.2), (2.0, -0.3), (2.5, -1.0)]:
        np.testing.assert_allclose(float(surfaces.rnn_final(w, b, 0.5, 50)), loop(w, b), rtol=1e-5, atol=1e-6)
        # Away from the wall the loss is smooth: central differences in float64 (h = 1e-5, error ~h^2)
        # against float32 autodiff, agreeing to ~1e-4 relative.
        h = 1e-5
        fd = [
            ((loop(w + h, b) + 1) ** 2 - (loop(w - h, b) + 1) ** 2) / (2 * h),
            ((loop(w, b + h) + 1) ** 2 - (loop(w, b - h) + 1) ** 2) / (2 * h),
        ]
        grad = jax.grad(surfaces.cliff_loss)(jnp.asarray([w, b], jnp.float32))
        np.testing.assert_allclose(np.asarray(grad), fd, rtol=1e-3, atol=1e-4)


def test_the_wall_is_where_x0_is_the_unstable_fixed_point():
    """For w > cosh^2(x_0) the map x -> w tanh x + b has an unstable fixed point between two stable ones;
    x_0 sits on it where b = x_0 - w tanh x_0. Above that line x_T goes to the positive branch, below
    it to the negative one, and the distance from x_0 to the unstable point grows like
    (w sech^2 x_0)^T: the loss jumps within one grid cell of the line."""
    c = surfaces.CLIFF
    s = surfaces.cliff_surface(c)
    w, b = s["w"], s["b"]
    cols = (w >= 1.5) & (w <= 3.0)  # growth factor w sech^2(0.5) >= 1.18 per step: 1.18^50 ~ 4e3
    jump = b[np.argmax(np.abs(np.diff(s["loss"][cols], axis=1)), axis=1)]  # lower point of the jump
    line = c.x0 - w[cols] * np.tanh(c.x0)
    db = b[1] - b[0]
    assert np.all((jump <= line + 1e-6) & (jump >= line - db - 1e-6)), np.c_[w[cols], jump, line][:5]


def test_clipped_descent_steps_are_bounded_and_the_plain_one_is_thrown():
    s = surfaces.cliff_surface(surfaces.CLIFF)
    c = surfaces.CLIFF
    bound = c.lr * c.tau
    assert surfaces.step_lengths(s["clipped"]).max() <= bound * (1 + 1e-5)  # float32 points, see clipping.checks
    assert surfaces.step_lengths(s["plain"]).max() >= 10 * bound
    assert s["clipped_loss"][-1] < s["plain_loss"][-1]
    # The difference quotient across the wall bounds the true slope from below (mean value theorem):
    # a fine 1-D scan between the two grid points around the steepest jump finds a slope at least as big.
    i, j = np.unravel_index(np.argmax(np.abs(np.diff(s["loss"], axis=0))), (len(s["w"]) - 1, len(s["b"])))
    quotient = abs(s["loss"][i + 1, j] - s["loss"][i, j]) / (s["w"][i + 1] - s["w"][i])
    assert surfaces.wall_slope(s) == pytest.approx(quotient, rel=1e-12)
    ws = jnp.linspace(s["w"][i], s["w"][i + 1], 2001)
    slopes = jax.vmap(lambda x: jax.grad(surfaces.cliff_loss)(jnp.stack([x, jnp.float32(s["b"][j])]))[0])(ws)
    steepest = float(jnp.max(jnp.abs(slopes)))
    assert steepest >= quotient
    assert steepest / np.median(np.abs(s["grad"][..., 0])) >= 100


def test_descend_without_clipping_is_a_plain_gradient_descent_loop():
    """The points of `descend` follow p <- p - lr grad L(p) step by step (jax's gradient at each point),
    started where the map has no unstable fixed point (w = 1 < cosh^2 x_0): the loss is smooth there."""
    c = surfaces.CLIFF._replace(iterations=5, start=(1.0, 0.0))
    points, losses = surfaces.descend(c, clip=False)
    assert points.shape == (6, 2) and losses.shape == (6,)
    grad = jax.value_and_grad(lambda p: surfaces.cliff_loss(p, c))
    for k in range(5):
        loss, g = grad(jnp.asarray(points[k], jnp.float32))
        np.testing.assert_allclose(points[k + 1], points[k] - c.lr * np.asarray(g), rtol=1e-5, atol=1e-6)
        assert losses[k] == pytest.approx(float(loss), rel=1e-5)
