"""Mean-field quadrature against closed forms and against sampling written differently."""

import numpy as np
import pytest
from scipy.special import erf

from gradlab import meanfield as mf

# erf has closed-form Gaussian integrals: E[erf(sqrt(q) z)^2] = (2/pi) arcsin(2q / (1 + 2q)) and
# E[erf'(sqrt(q) z)^2] = (4/pi) / sqrt(1 + 4q) (Williams 1997).
ERF = mf.Activation(
    erf, lambda x: 2 / np.sqrt(np.pi) * np.exp(-(x**2)), lambda x: -4 * x / np.sqrt(np.pi) * np.exp(-(x**2))
)
SIN = mf.Activation(np.sin, np.cos, lambda x: -np.sin(x))


def test_linear_net_chi_1_is_sigma_w2_and_q_star_is_geometric():
    sw2 = np.array([0.25, 0.5, 0.9])
    np.testing.assert_allclose(mf.chi_1(sw2, 0.7, "linear"), sw2, rtol=1e-12)
    # q' = sigma_w^2 q + sigma_b^2  ->  q* = sigma_b^2 / (1 - sigma_w^2)
    np.testing.assert_allclose(mf.q_star(sw2, 0.1, "linear"), 0.1 / (1 - sw2), rtol=1e-9)
    # the correlation map of a linear net: c' = (sigma_w^2 q c + sigma_b^2) / q
    q = 0.1 / (1 - 0.5)
    np.testing.assert_allclose(mf.c_map(0.3, q, 0.5, 0.1, "linear"), (0.5 * q * 0.3 + 0.1) / q, rtol=1e-12)


def test_tanh_critical_point_and_phases():
    # sigma_b = 0: q* = 0 for sigma_w^2 <= 1, where tanh'(0)^2 = 1 gives chi_1 = sigma_w^2.
    assert mf.q_star(1.0, 0.0) < 1e-6
    assert mf.chi_1(1.0, mf.q_star(1.0, 0.0)) == pytest.approx(1.0, abs=1e-5)
    assert mf.chi_1(0.7, mf.q_star(0.7, 0.0)) == pytest.approx(0.7, abs=1e-9)
    # q* > 0 beyond, and chi_1 > 1 there (chaos); a bias pushes the edge to larger sigma_w^2.
    assert mf.q_star(1.5, 0.0) > 0.1 and mf.chi_1(1.5, mf.q_star(1.5, 0.0)) > 1.0
    assert mf.chi_1(1.5, mf.q_star(1.5, 0.3)) < 1.0
    # ordered phase: c* = 1 and xi_c = -1 / ln chi_1; chaotic: c* < 1.
    q = mf.q_star(1.2, 0.2)
    assert mf.c_star(1.2, 0.2, q=q) == 1.0
    assert mf.xi_c(1.2, 0.2, q=q) == pytest.approx(-1 / np.log(mf.chi_1(1.2, q)), rel=1e-6)
    assert 0.0 < mf.c_star(3.0, 0.1) < 1.0


def test_q_star_is_a_fixed_point_of_the_length_map():
    sw2, sb2 = np.meshgrid([0.5, 1.0, 1.01, 2.0, 4.0], [0.0, 0.05, 0.3], indexing="ij")
    q = mf.q_star(sw2, sb2)
    np.testing.assert_allclose(mf.q_map(q, sw2, sb2), q, atol=1e-10)
    # chi_1 is the slope of the correlation map at c = 1 (where q* > 0): finite difference.
    sw2, sb2 = 2.0, 0.1
    q = mf.q_star(sw2, sb2)
    h = 1e-4
    slope = (mf.c_map(1.0, q, sw2, sb2) - mf.c_map(1.0 - h, q, sw2, sb2)) / h
    assert slope == pytest.approx(float(mf.chi_1(sw2, q)), rel=1e-3)


def test_quadrature_matches_closed_forms():
    q = np.array([0.05, 0.5, 2.0, 6.0])
    np.testing.assert_allclose(mf.q_map(q, 1.0, 0.0, ERF), 2 / np.pi * np.arcsin(2 * q / (1 + 2 * q)), atol=1e-9)
    np.testing.assert_allclose(mf.chi_1(1.0, q, ERF), 4 / np.pi / np.sqrt(1 + 4 * q), rtol=1e-6)
    # E[sin u1 sin u2] = (E cos(u1 - u2) - E cos(u1 + u2)) / 2 = e^{-q} sinh(q c)
    c = np.array([-0.6, 0.0, 0.4, 0.95, 1.0])
    np.testing.assert_allclose(mf.expect_pair(np.sin, np.sin, 1.5, c), np.exp(-1.5) * np.sinh(1.5 * c), atol=1e-12)
    # ReLU: chi_1 = sigma_w^2 / 2 at any q (the nodes are symmetric, half are positive).
    assert mf.chi_1(2.0, 0.8, "relu") == pytest.approx(1.0, abs=1e-12)


def test_quadrature_matches_monte_carlo_sampling():
    """q*, chi_1 and the correlation map for tanh against plain sampling of the network's units."""
    rng = np.random.default_rng(0)
    n = 1_000_000
    sw2, sb2 = 2.5, 0.2
    q = float(mf.q_star(sw2, sb2))
    # q* from iterating the sampled map: z ~ N(0, q), z' = sqrt(sw2) * tanh(z) * g + sqrt(sb2) * g', sampled
    z = rng.standard_normal(n)
    q_mc = 1.0
    for _ in range(60):
        q_mc = sw2 * np.mean(np.tanh(np.sqrt(q_mc) * z) ** 2) + sb2
    se = sw2 * np.std(np.tanh(np.sqrt(q) * z) ** 2) / np.sqrt(n)
    assert abs(q_mc - q) < 5 * se / (1 - 0.5)  # the map contracts (slope < 0.5 here), so errors do not grow
    derivative = 1.0 / np.cosh(np.sqrt(q) * z) ** 2
    chi_mc = sw2 * np.mean(derivative**2)
    assert abs(chi_mc - mf.chi_1(sw2, q)) < 5 * sw2 * np.std(derivative**2) / np.sqrt(n)
    c = 0.3
    z2 = rng.standard_normal(n)
    u1, u2 = np.sqrt(q) * z, np.sqrt(q) * (c * z + np.sqrt(1 - c**2) * z2)
    prod = np.tanh(u1) * np.tanh(u2)
    c_mc = (sw2 * np.mean(prod) + sb2) / q
    assert abs(c_mc - mf.c_map(c, q, sw2, sb2)) < 5 * sw2 * np.std(prod) / np.sqrt(n) / q


def test_depth_scales_diverge_at_the_edge():
    sb2 = 0.05
    sw2 = np.array([1.2, 1.5, 1.7])
    xi = mf.xi_c(sw2, sb2)
    assert np.all(np.diff(xi) > 0)  # approaching the edge (sigma_w^2 ~ 1.76 at sigma_b^2 = 0.05) from the ordered side
    assert mf.xi_c(1.76, sb2) > 50
    assert mf.xi_q(1.5, sb2) < mf.xi_c(1.5, sb2)  # q settles faster than c (Schoenholz et al. 2017, Fig. 1)


def test_unknown_activation_names_the_known_ones():
    with pytest.raises(ValueError, match="tanh, linear, relu"):
        mf.activation("swish")


def test_critical_line_parametrisation_is_the_edge():
    """The edge drawn from q* (sigma_w^2 = 1 / E[phi'^2]) against q* found by iterating the map."""
    q_edge = np.array([0.05, 0.3, 1.0])
    sw2, sb2 = mf.critical_line(q_edge)
    q = mf.q_star(sw2, sb2)
    np.testing.assert_allclose(q, q_edge, rtol=1e-4)
    np.testing.assert_allclose(mf.chi_1(sw2, q), 1.0, atol=1e-6)
    assert mf.critical_line(0.0) == (pytest.approx(1.0), pytest.approx(0.0))  # through (1, 0)


def test_critical_sigma_w2_by_bisection_lies_on_the_critical_line():
    """The bisection on chi_1 = 1 against the edge parametrised by q*, and ReLU's closed form 2."""
    sw2, sb2 = mf.critical_line(np.array([0.05, 0.3, 1.0]))
    np.testing.assert_allclose(mf.critical_sigma_w2(sb2), sw2, rtol=1e-5)
    assert float(mf.critical_sigma_w2(0.0)) == pytest.approx(1.0, abs=1e-3)  # tanh'(0)^2 = 1, q* = 0
    assert float(mf.critical_sigma_w2(0.0, "relu")) == pytest.approx(2.0, abs=1e-9)  # chi_1 = sigma_w^2 / 2


def test_finite_width_tolerances_match_a_simulated_relu_walk():
    """A width-n ReLU net at He init (sigma_w^2 = 2), simulated by the factor each layer draws: given
    the layer below, the pre-activations are iid N(0, 2 m), so m_l / m_(l-1) = (2/n) sum_i relu(z_i)^2,
    which is 2/n times a chi-square with Binomial(n, 1/2) degrees of freedom (kappa = 5)."""
    rng = np.random.default_rng(0)
    n, layers, trials = 256, 30, 20000
    factors = 2.0 / n * rng.chisquare(rng.binomial(n, 0.5, size=(trials, layers - 1)))
    ln_m = np.concatenate([np.zeros((trials, 1)), np.cumsum(np.log(factors), axis=1)], axis=1)
    slopes = np.polyfit(np.arange(layers), ln_m.T, 1)[0]
    bias = mf.finite_width_slope_tolerance(layers, n, 1, 5.0, sigmas=0.0)
    std = mf.finite_width_slope_tolerance(layers, n, 1, 5.0, sigmas=1.0) - bias
    assert bias == pytest.approx(5.0 / (2 * n), rel=1e-12)
    # Var ln(1 + e) = Var e (1 + O(1/n)): a few percent at n = 256; the sampling error is 0.5%.
    assert np.std(slopes) == pytest.approx(std, rel=0.05)
    assert np.mean(slopes) == pytest.approx(-bias, rel=0.1)
    # the continuum OLS slope of a random walk: Var = 1.2 sigma^2 / layers (to O(1/layers))
    assert std == pytest.approx(np.sqrt(5.0 / n * 1.2 / layers), rel=0.1)
    end = mf.finite_width_end_tolerance(layers, n, 1, 5.0, sigmas=1.0)
    assert np.std(ln_m[:, -1]) == pytest.approx(end, rel=0.05)
    # seeds average independent walks: the variance falls as 1/seeds
    assert mf.finite_width_end_tolerance(layers, n, 4, 5.0, sigmas=3.0) == pytest.approx(1.5 * end, rel=1e-12)


def test_fitted_correlation_depth_scale_recovers_a_planted_exponential_approach():
    """|c_l - c*| = A exp(-l / xi) planted on a (4,) grid with three seeds around it (+e, -e, 0 at every
    layer): the seed mean is the planted curve, the noise floor 3 e sqrt(2/3) / sqrt(3) ~ 1.4e-4."""
    layers = np.arange(41)
    c_star = np.array([1.0, 0.4, 1.0, 1.0])  # the second chaotic: c_l approaches c* from above
    amplitude = np.array([0.25, 0.25, 0.25, 0.01])[:, None]
    xi = np.array([5.0, 3.0, 0.5, -20.0])  # 0.5: only l = 1, 2, 3 above the floor; -20: moving away from c*
    sign = np.array([1.0, -1.0, 1.0, 1.0])[:, None]
    dev = amplitude * np.exp(-layers / xi[:, None])
    dev[0, 1:3] = 0.5  # beyond dev_max = 0.3 (not yet exponential): left out, or the fit would not give 5
    mean = (1.0 - c_star)[:, None] + sign * dev
    e = 1e-4
    one_minus_c = mean[:, None, :] + np.array([e, -e, 0.0])[None, :, None]  # (grid, seeds, layers)
    fitted = mf.fitted_correlation_depth_scale(one_minus_c, c_star, dev_max=0.3)
    np.testing.assert_allclose(fitted[:2], xi[:2], rtol=1e-6)
    assert np.isnan(fitted[2]) and fitted[3] == np.inf
    where = np.array([True, False, True, True])  # a point left out is NaN, the others as before
    np.testing.assert_array_equal(
        mf.fitted_correlation_depth_scale(one_minus_c, c_star, 0.3, where), [*fitted[:1], np.nan, *fitted[2:]]
    )
