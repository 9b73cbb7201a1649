"""hessian_spectrum at its tiny size: the SLQ recorded in the sweep against eigh of the trained
variants' dense Hessians, and the moment check's ability to fail."""

import numpy as np
import pytest

from gradlab import api, curvature
from gradlab.experiments import hessian_spectrum as hs


@pytest.fixture(scope="module")
def tiny(tiny_scale):
    return tiny_scale("hessian_spectrum")[0]


def test_recorded_only_at_the_first_and_last_step(tiny):
    alpha = tiny.dataset["slq_alpha"].isel({"model.norm": 0, "model.residual": 0}).values
    finite = np.all(np.isfinite(alpha), axis=(1, 2))
    assert finite[0] and finite[-1] and not finite[1:-1].any()


def test_checks_and_the_moment_check_fails_beyond_2m_minus_1(tiny):
    m = api.measure(tiny.dataset)
    assert m.lambda_error < hs.LAMBDA_TOL and m.moment_error < hs.MOMENT_TOL
    assert m.moment_error_beyond > 100 * m.moment_error  # k = 2m + 1 is beyond the quadrature's exactness
    eigs = m.check_eigs
    nodes, weights = m.check_nodes
    # The SLQ's trace estimate tr(H)/n agrees with eigh's in expectation: within a few probe std errors.
    assert curvature.moments(nodes, weights, [1])[0] == pytest.approx(np.mean(eigs), abs=5 * float(np.std(eigs)))
