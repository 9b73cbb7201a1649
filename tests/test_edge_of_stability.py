"""edge_of_stability at a tiny size: the tracked sharpness against eigh of the dense Hessian (and of
P^-1/2 H P^-1/2 for Adam), the thresholds' closed forms, and the edge/catapult measures."""

import dataclasses

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from gradlab import curvature, data, models, trials
from gradlab.config import DataConfig, ModelConfig
from gradlab.experiments import edge_of_stability as eos


def config(variant):
    return eos.Config(
        variant=variant,
        model=ModelConfig(depth=1, width=6, activation="tanh"),
        data=DataConfig(examples=16, input_dim=3, noise=0.5),
        steps=20,
        sharpness_every=2,
        power_iterations=60,
    )


def hp_of(cfg):
    hp = {"seed": 0, "lr_index": 1, **{f"optim.{k}": getattr(cfg.optim, k) for k in ("lr", "momentum", "b1", "b2")}}
    hp.update({"optim.eps": cfg.optim.eps, "optim.weight_decay": 0.0, "optim.clip_threshold": 1.0})
    return hp | {f"model.{k}": v for k, v in models.MLPHyper.from_config(cfg.model)._asdict().items()}


def dense_hessian(cfg, params, xy):
    spec = trials.mlp_spec(cfg)
    flat, unravel = ravel_pytree(params)
    hyper = models.MLPHyper.from_config(cfg.model)
    loss = lambda v: data.loss(cfg.data, models.apply(unravel(v), xy.x, spec, hyper)[0], xy.y)  # noqa: E731
    return np.asarray(jax.hessian(loss)(flat), np.float64)


@pytest.mark.parametrize("variant", ["gd", "adam"])
def test_tracked_sharpness_is_the_top_eigenvalue(variant):
    cfg = config(variant)
    trial = eos.trial(cfg)
    hp = hp_of(cfg)
    state = trial.init(hp, jax.random.PRNGKey(0))
    new, metrics = trial.step(hp, state)  # step 0 is measured
    h = dense_hessian(cfg, state.train.params, state.train.data)
    if variant == "adam":
        s = 1 / np.sqrt(np.asarray(curvature.adam_preconditioner(new.train.opt_state, 0.999, 1e-8), np.float64))
        h = s[:, None] * h * s[None, :]
    assert float(metrics["sharpness"]) == pytest.approx(np.linalg.eigvalsh(h)[-1], rel=2e-3)
    assert float(metrics["lr"]) == pytest.approx(cfg.adam_lrs[1] if variant == "adam" else cfg.gd_lrs[1])
    _, skipped = trial.step(hp, new)  # step 1: not measured
    assert np.isnan(skipped["sharpness"])


def test_catapult_rate_is_its_factor_over_lambda_0():
    cfg = dataclasses.replace(config("catapult"), catapult_factors=(1.5, 2.5))
    state = eos.trial(cfg).init(hp_of(cfg), jax.random.PRNGKey(0))
    relu = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, activation="relu", init="he_normal"))
    top = np.linalg.eigvalsh(dense_hessian(relu, state.train.params, state.train.data))[-1]
    assert float(state.lr) == pytest.approx(2.5 * 2 / top, rel=2e-3)


def test_each_variant_has_its_optimizers_threshold():
    """gd and the catapult run plain GD (2), momentum heavy ball (2 + 2 beta), adam (2 + 2 b1)/(1 - b1)."""
    got = {v: curvature.stability_threshold(eos.OPTIMIZER[v], momentum=0.5, b1=0.9) for v in eos.VARIANTS}
    assert got == pytest.approx({"gd": 2.0, "momentum": 3.0, "adam": 38.0, "catapult": 2.0})


def test_edge_median_reads_the_last_half():
    steps = np.arange(0, 100, 5)
    sharp = np.minimum(5.0 + 0.4 * steps, 20.0)  # eta = 0.1: 2/eta = 20, reached at step 37.5
    lane = eos.Lane("gd", 0.1, 2.0, np.ones(100), steps, sharp, False)
    assert lane.reached(100) and lane.edge_median(100) == pytest.approx(1.0)
    slow = lane._replace(sharpness=np.linspace(5, 19, len(steps)))  # eta lambda / 2 < 0.9 in the first half
    assert slow.edge_median(100) < 1.0
    assert not slow.reached(100)
