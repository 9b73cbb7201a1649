"""C2 normalization: the (L + 1)^-1/2 law's fitted slope, the config's limits, and the tiny batchnorm
group end to end (the BatchNorm net itself: tests/test_batchnorm_net.py)."""

import numpy as np
import pytest

from gradlab import api
from gradlab.errors import ConfigError
from gradlab.experiments import normalization as N


def test_theory_slope_tends_to_minus_one_half():
    assert abs(N.theory_slope([1000, 2000, 4000]) + 0.5) < 1e-3
    # d/d ln L of -ln(L + 1)/2 is -L / (2 (L + 1)): between depths 2 and 64 it runs from -0.33 to -0.49
    assert -0.49 < N.theory_slope([2, 4, 8, 16, 32, 64]) < -0.40


@pytest.mark.parametrize("override", ["bn_batches=[2, 16]", "probe_depths=[0, 4]"])
def test_bn_batches_larger_than_the_minibatch_and_depths_below_one_are_refused(override):
    with pytest.raises(ConfigError, match=override.split("=")[0] + ": "):
        api.resolve("normalization", ["data.batch_size=8", override], "quick")


@pytest.fixture(scope="module")
def tiny(tiny_scale):
    """The experiment at its tiny scale (gradlab/configs/normalization.yaml): one pre-BN group."""
    return tiny_scale("normalization")[0]


def test_tiny_batchnorm_group_end_to_end(tiny):
    ds = tiny.dataset
    assert ds.attrs["static_groups"] == 1
    assert ds.sizes["bn_batch"] == 3 and ds.sizes["probe_depth"] == 2 and ds.sizes["probe_seed"] == 3
    bn_checks = [c for c in tiny.checks if c.name.startswith("pre-BN")]
    assert len(bn_checks) == 2 and all(c.passed for c in bn_checks), bn_checks
    # The warmup schedule: lr_t = lr min(1, t / 10) with warmup, lr without (constant schedule).
    t = np.arange(30)
    lr = 0.03
    np.testing.assert_allclose(ds["lr"].sel(warmup=True).values.ravel(), lr * np.minimum(1, t / 10), rtol=1e-6)
    np.testing.assert_allclose(ds["lr"].sel(warmup=False).values.ravel(), lr, rtol=1e-6)
    # The probe: layers beyond a probed depth are NaN, the last block and the readout are not.
    g = ds["init_grad_norm"].isel({"step": 0, "warmup": 0}).squeeze().values  # (probe_depth, layer)
    assert np.all(np.isfinite(g[0, :3])) and np.all(np.isnan(g[0, 3:-1])) and np.isfinite(g[0, -1])
    # The standard loss is the net trained on the whole minibatch (the last bn_batch).
    np.testing.assert_array_equal(ds["loss"].values, ds["bn_loss"].isel(bn_batch=-1).values)
    assert [p.name for p in tiny.figures] == [
        "normalization.png",
        "normalization.pdf",
        "normalization_batchnorm.png",
        "normalization_batchnorm.pdf",
    ]
