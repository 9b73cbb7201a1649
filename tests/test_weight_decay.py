"""B3 at a tiny size: the decay-only weights of each form against formulas written here, and
relations between grid points that hold whatever the formulas' code says."""

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from gradlab import api, transforms
from gradlab.config import OptimConfig
from gradlab.errors import ConfigError
from gradlab.experiments import weight_decay


@pytest.fixture(scope="module")
def tiny(tiny_scale):
    """The experiment at its tiny scale (gradlab/configs/weight_decay.yaml)."""
    return tiny_scale("weight_decay")


def test_every_check_is_made(tiny):
    outcome, _ = tiny
    assert len(outcome.checks) == 5
    assert outcome.dataset.attrs["static_groups"] == 3  # one compile per form; lr x wd vmapped


def norm_path(ds, name, lr, wd):
    return ds["dead_norm"].sel({"optim.name": name, "optim.lr": lr, "optim.weight_decay": wd}).values.astype(float)


def test_optax_adamw_decay_depends_on_lr_times_wd_and_the_papers_on_wd_alone(tiny):
    """lr 1e-3 x wd 1 and lr 1e-2 x wd 0.1 decay the zero-gradient rows alike under optax's AdamW;
    under the paper's form the decay ignores the lr, and its per-step factor is 1 - wd eta_t."""
    ds = tiny[0].dataset
    np.testing.assert_allclose(norm_path(ds, "adamw", 0.001, 1.0), norm_path(ds, "adamw", 0.01, 0.1), rtol=1e-5)
    np.testing.assert_allclose(
        norm_path(ds, "adamw_decoupled", 0.001, 0.1), norm_path(ds, "adamw_decoupled", 0.01, 0.1), rtol=1e-5
    )
    steps = ds.sizes["step"]
    eta = 0.5 * (1 + np.cos(np.pi * np.arange(steps) / steps))  # optax cosine_decay_schedule(1, steps)
    path = norm_path(ds, "adamw_decoupled", 0.01, 0.1)
    np.testing.assert_allclose(path[1:] / path[:-1], 1 - 0.1 * eta[:-1], rtol=1e-5)
    path = norm_path(ds, "adamw", 0.01, 1.0)
    np.testing.assert_allclose(path[1:] / path[:-1], 1 - 0.01 * 1.0 * eta[:-1], rtol=1e-5)


def test_adam_l2_moves_decay_only_weights_the_same_at_every_decay(tiny):
    """Adam's step is invariant to the scale of its gradient wd w: wd 1e-4 and wd 1 give the same path
    (up to eps / (wd |w|) ~ 1e-8 / (1e-4 x 0.3)); with wd = 0 nothing moves."""
    ds = tiny[0].dataset
    adam = ds["dead_max"].sel({"optim.name": "adam", "optim.lr": 0.01})
    top = lambda wd: adam.sel({"optim.weight_decay": wd}).values  # noqa: E731
    np.testing.assert_allclose(top(0.0001), top(1.0), rtol=1e-3)
    assert np.all(top(0.0) == top(0.0)[0])
    fall = top(1.0)[0] - top(1.0)[10]
    assert 0.5 * 0.01 * 10 * 0.9 < fall <= 0.01 * 10  # ~ lr per step (cosine eta > 0.9 over the first 10)


def test_scalar_recursion_equals_optax_adam_with_l2_on_one_weight():
    """The checks' float64 recursion against the optimizer the experiment runs, on a lone weight."""
    wd, steps = 0.3, 25
    lr_t = 0.02 * (0.5 + 0.5 * np.cos(np.pi * np.arange(steps) / steps))
    sim = weight_decay.scalar_adam_l2(0.7, lr_t, wd, 0.9, 0.999, 1e-8)
    cfg = OptimConfig(name="adam", schedule="cosine")
    hp = {
        f"optim.{k}": jnp.float32(v)
        for k, v in dict(lr=0.02, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8, weight_decay=wd, clip_threshold=1.0).items()
    }
    tx = transforms.build(cfg, hp, steps)
    w = {"w": jnp.full((1, 1), 0.7)}
    state, path = tx.init(w), []
    for _ in range(steps):
        path.append(float(w["w"][0, 0]))
        u, state = tx.update({"w": jnp.zeros((1, 1))}, state, w)
        w = optax.apply_updates(w, u)
    np.testing.assert_allclose(path, sim, rtol=1e-5)


def test_held_out_set_is_fresh_examples_with_the_dead_features_zeroed():
    cfg = weight_decay.Config()
    train, test = weight_decay.split(cfg)
    assert train.x.shape == (cfg.data.examples, cfg.data.input_dim) and test.x.shape[0] == cfg.held_out
    assert float(jnp.max(jnp.abs(train.x[:, -cfg.dead_inputs :]))) == 0.0
    assert float(jnp.max(jnp.abs(test.x[:, -cfg.dead_inputs :]))) == 0.0
    assert not np.any(np.all(np.isclose(np.asarray(test.x)[:, None], np.asarray(train.x)[None]), axis=-1))


def test_as_many_dead_inputs_as_features_is_a_config_error():
    with pytest.raises(ConfigError, match="dead_inputs: must be below data.input_dim=20"):
        api.resolve("weight_decay", ["dead_inputs=20"])
