"""B2 at a tiny size: the curvature at init against a dense Hessian, the traced warmup and clip
switches against the static optax chain, the LR-sensitivity definition, and the checks."""

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gradlab import api, data, models, trials
from gradlab.config import DataConfig, ExperimentConfig, ModelConfig
from gradlab.experiments import lr_sweep

NET = [
    "model.width=8",
    "model.depth=1",
    "model.activation=relu",
    "model.init=he_normal",
    "data.examples=32",
    "data.input_dim=4",
    "telemetry=loss",
]


@pytest.fixture(scope="module")
def tiny(tiny_scale):
    """lr_sweep at its tiny scale (the NET, sgd without a norm, 16 rates, 40 steps): (Outcome, out folder)."""
    return tiny_scale("lr_sweep")


def test_sharpness_at_init_is_the_top_eigenvalue_of_the_dense_hessian(tiny):
    """Power iteration in the trial against numpy's eigvalsh of jax.hessian on the flat params."""
    outcome, _ = tiny
    cfg = ExperimentConfig(
        model=ModelConfig(depth=1, width=8, activation="relu", init="he_normal"),
        data=DataConfig(examples=32, input_dim=4),
    )
    spec = trials.mlp_spec(cfg)
    hyper = models.MLPHyper.from_config(cfg.model)
    k_params, _ = jax.random.split(jax.random.PRNGKey(0))  # supervised_mlp's split of the seed's key
    params = models.init(k_params, spec, hyper)
    flat, unravel = ravel_pytree(params)
    xy = data.make(cfg.data)

    def loss(v):
        return data.loss(cfg.data, models.apply(unravel(v), xy.x, spec, hyper)[0], xy.y)

    eig = np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(loss))(flat), np.float64))
    measured = outcome.dataset["sharpness_init"].isel(step=0).values
    assert eig[-1] > abs(eig[0])  # the top of the spectrum is its largest magnitude: power iteration finds it
    # A Rayleigh quotient never exceeds lambda_max; 40 iterations close the gap to well under 1%.
    np.testing.assert_allclose(measured, eig[-1], rtol=1e-2)
    assert np.all(measured <= eig[-1] * (1 + 1e-4))


def reference_losses(tmp_path, lr, **optim):
    """The same net trained by the plain supervised_mlp (gradient_flow's trial) with a static chain."""
    over = (
        NET
        + [
            "steps=40",
            "chunk_steps=40",
            "seeds=1",
            "model.residual=false",
            "model.norm=none",
            "optim.name=sgd",
            f"optim.lr={lr!r}",
        ]
        + [f"optim.{k}={v}" for k, v in optim.items()]
    )
    return api.execute("gradient_flow", over, out=tmp_path, progress=False, draw=False).dataset["loss"].values


def test_traced_switches_equal_the_static_warmup_and_clipping(tiny, tmp_path):
    ds = tiny[0].dataset
    lr = float(ds["optim.lr"].values[5])
    lane = lambda w, c: ds["loss"].sel({"optim.lr": lr, "warmup": w, "clip": c}).values  # noqa: E731
    plain = reference_losses(tmp_path, lr)
    np.testing.assert_allclose(lane(0, False), plain, rtol=1e-6)
    np.testing.assert_allclose(lane(10, False), reference_losses(tmp_path, lr, warmup_steps=10), rtol=1e-5)
    np.testing.assert_allclose(lane(0, True), reference_losses(tmp_path, lr, clip="global_norm"), rtol=1e-5)
    assert not np.allclose(lane(0, True), plain, rtol=1e-3)  # clipping at 1.0 does act here
    assert lane(10, False)[1] == lane(10, False)[0]  # warmup starts at lr 0: the first step does not move


def test_lr_sensitivity_is_the_capped_mean_excess_over_the_best():
    """S = mean(min(L, L0) - L*) / L0 with a diverged run counted as L0 (Wortsman et al. 2023)."""
    lrs = np.logspace(-3, 1, 5)
    final = np.array([0.9, 0.2, 0.05, 3.0, np.inf])  # 3.0 > L0 is capped, inf (diverged) counts as L0
    c = lr_sweep.Curve("sgd", "none", 0, False, lrs, final, ~np.isfinite(final), 2.0, np.array([1.0]), np.array([1.0]))
    assert c.sensitivity() == pytest.approx(np.mean([0.85, 0.15, 0.0, 1.95, 1.95]) / 2.0)
    assert c.edge() == pytest.approx(lrs[3])  # first rate past the best that ends above L0


def test_every_check_is_made_and_the_sweep_reaches_divergence(tiny):
    outcome, _ = tiny
    ds = outcome.dataset
    names = [c.name.split(":")[0] for c in outcome.checks]
    assert names == ["plain GD", "clipping", "warmup (no norm)"], names
    assert ds["diverged"].any()  # the sweep reaches divergence; those points stay in the results
    assert (ds["first_bad_step"].values[ds["diverged"].values] >= 0).all()
    # Plain GD below 2/lambda0 never raises its loss; every rate of the sweep is one compiled group per norm.
    gd = ds.sel({"warmup": 0, "clip": False})
    lam = float(gd["sharpness_init"].isel(step=0).max())
    below = gd["loss"].sel({"optim.lr": gd["optim.lr"].values[gd["optim.lr"].values < 2 / lam]})
    assert below.sizes["optim.lr"] >= 3
    assert bool((below.isel(step=slice(1, None)).max("step") <= below.isel(step=0)).all())
    assert ds.attrs["static_groups"] == 1  # 16 rates x warmup x clip in one compiled program
