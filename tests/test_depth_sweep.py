"""A3 at the quick width (32), one learning rate: the plain ReLU net's first-layer gradient falls
by 2^(-1/2) per layer (LeCun init, relu' is 1 on half the units), residual + LayerNorm grows
only polynomially; plain stops training at depth 64, residual + LayerNorm trains at every depth."""

import math

import numpy as np
import pytest

from gradlab import api, data

WIDTH, SEEDS, LR = 32, 2, 0.01
DEPTHS = [2, 4, 8, 16, 32, 64]


@pytest.fixture(scope="module")
def outcome(tiny_scale):
    """depth_sweep at its tiny scale: the quick config at one learning rate."""
    return tiny_scale("depth_sweep")[0]


def test_tiny_scale_is_the_size_these_tests_assume():
    spec = api.resolve("depth_sweep", [], "tiny")
    axes = spec.to_dict()["axes"]
    assert axes["model.depth"] == DEPTHS and axes["seed"] == list(range(SEEDS)) and "optim.lr" not in axes
    assert (spec.config.model.width, spec.config.optim.lr) == (WIDTH, LR)


def grad_at_init(ds, residual, norm):
    g = ds["first_grad_norm"].sel({"model.residual": residual, "model.norm": norm}).isel(step=0)
    return g.transpose("seed", "model.depth").values.astype(float)


def test_one_compile_per_norm_covers_every_depth(outcome):
    assert outcome.dataset.attrs["static_groups"] == 2  # depth and residual are vmapped
    assert list(outcome.dataset["model.depth"].values) == DEPTHS


def test_plain_first_layer_gradient_falls_by_one_over_sqrt2_per_layer(outcome):
    g = np.log(grad_at_init(outcome.dataset, False, "none")).mean(axis=0)
    d8, d64 = DEPTHS.index(8), DEPTHS.index(64)
    rate = (g[d64] - g[d8]) / (64 - 8)  # the output is ~0 from depth 8 on, so dL/dout is depth-free
    # Per layer |delta|^2 picks up sigma_w^2 E[relu'^2] = 1/2 times a factor of relative variance 5/n
    # (chi^2_n: 2/n, the Bernoulli(1/2) mask: 3/n), whose log has mean -5/(2n): per layer of ln|g|,
    # -ln(2)/2 - 5/(4n). Tolerance: 4 sigma of the endpoint difference, the two depths' walks taken
    # as independent (variance (8 + 64) 5/(4n) per seed).
    expected = -math.log(2) / 2 - 5 / (4 * WIDTH)
    tol = 4 * math.sqrt((8 + 64) * 5 / (4 * WIDTH) / SEEDS) / (64 - 8)
    assert abs(rate - expected) <= tol
    assert g[d64] - g[0] < math.log(1e-6)  # ~2^-31 from depth 2 to 64: vanished


def test_residual_layernorm_gradient_grows_polynomially_and_residual_alone_explodes(outcome):
    ds = outcome.dataset
    g = np.log(grad_at_init(ds, True, "layernorm")).mean(axis=0)
    power = (g[DEPTHS.index(64)] - g[DEPTHS.index(8)]) / math.log(64 / 8)
    assert 0.5 < power <= 2.0  # mean field: 1 + a/2 = 1.73; geometric growth would give ~ 56 x rate / ln 8
    plain_residual = grad_at_init(ds, True, "none")
    # No norm: Var h grows by (1 + sigma_w^2/2) = 1.5 per block, forward and backward: by 64 blocks
    # 1.5^64 ~ 2e11 in the output alone, and the gradient overflows float32 or is astronomically large.
    assert not np.all(np.isfinite(plain_residual[:, -1])) or np.min(plain_residual[:, -1]) > 1e15
    assert bool(ds["diverged"].sel({"model.residual": True, "model.norm": "none", "model.depth": 64}).all())


def test_plain_stalls_at_depth_64_and_residual_layernorm_trains_at_every_depth(outcome):
    ds = outcome.dataset
    cfg = api.resolve("depth_sweep", [], "quick").config
    y = np.asarray(data.make(cfg.data).y, float)
    constant = float(np.mean((y - y.mean()) ** 2))

    def final(residual, norm):
        loss = ds["loss"].sel({"model.residual": residual, "model.norm": norm}).isel(step=-1)
        return np.median(loss.transpose("seed", "model.depth").values, axis=0) / constant

    assert final(False, "none")[-1] > 0.9  # gradients ~1e-11, below Adam's eps = 1e-8: no step moves it
    assert final(False, "none")[0] < 0.1  # the same net trains at depth 2
    assert np.all(final(True, "layernorm") < 0.1)
    assert len(outcome.checks) == 4
