"""The abc-parametrization table (SP, NTK, muP; depth-muP, CompleteP) written out by hand against
parametrization.numbers, the init and forward multipliers in models.init/apply, and the per-layer
learning rates against SGD and Adam updates computed by hand in numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import api, config, inits, models, parametrization, transforms
from gradlab.config import OptimConfig
from gradlab.errors import ConfigError
from gradlab.experiments import gradient_flow

# Width 256 at base width 64: m = 4. Tensor Programs V, Tab. 3 (muP) against SP at the base width:
# readout init var 1/fan_in^2 -> std x m^(-1/2); SGD lr x fan_out for the input layer and width-sized
# vectors, x 1/fan_in for the readout; Adam lr x 1/fan_in for hidden and readout. NTK: W = w / sqrt(n).
HAND = {
    "sp": dict(init=(1, 1, 1), mult=(1, 1), sgd=dict.fromkeys(parametrization.KINDS, 1), adam=None),
    "ntk": dict(init=(1, 2, 2), mult=(0.5, 0.5), sgd=dict.fromkeys(parametrization.KINDS, 1), adam=None),
    "mup": dict(
        init=(1, 1, 0.5),
        mult=(1, 1),
        sgd=dict(input=4, hidden=1, output=0.25, vector=4, hidden_vector=4, readout_bias=1),
        adam=dict(input=1, hidden=0.25, output=0.25, vector=1, hidden_vector=1, readout_bias=1),
    ),
}


@pytest.mark.parametrize("name", parametrization.PARAMETRIZATIONS)
@pytest.mark.parametrize("optimizer", ["sgd", "momentum", "adam", "adamw", "lion"])
def test_numbers_are_the_table_by_name_and_by_traced_index(name, optimizer):
    hand = HAND[name]
    lr = hand["sgd"] if optimizer in ("sgd", "momentum") else (hand["adam"] or hand["sgd"])
    got = parametrization.numbers(name, optimizer, 256, 64)
    assert tuple(got.init[k] for k in ("input", "hidden", "output")) == hand["init"]
    assert tuple(got.multiplier[k] for k in ("hidden", "output")) == hand["mult"]
    assert got.lr == lr and got.branch == 1.0
    traced = jax.jit(lambda i: parametrization.numbers(i, optimizer, 256, 64))(
        parametrization.PARAMETRIZATIONS.index(name)
    )
    for field in ("init", "multiplier", "lr"):
        for kind, value in getattr(got, field).items():
            assert float(getattr(traced, field)[kind]) == value, (field, kind)  # powers of 4: exact in float32


def test_standard_parametrization_is_constant_ones_and_leaves_the_optimizer_alone():
    p = parametrization.numbers("sp", "adam", 1024, 64)
    tx = transforms.build(OptimConfig(name="adam"), _hp(), 10)
    assert p.optimizer(tx) is tx  # no transformation added: the default program is unchanged
    hyper = p.hyper(models.MLPHyper(1, False, 2, 0.01, 1.0, 0.0, 0.01))
    assert hyper == models.MLPHyper(1, False, 2, 0.01, 1.0, 0.0, 0.01)  # every new field stays the constant 1.0


@pytest.mark.parametrize(
    "depth_name, depth, branch, sgd, adam",
    [("completep", 4, 1 / 4, 4.0, 1.0), ("depth_mup", 4, 1 / 2, 1.0, 1 / 2), ("completep", 2, 1.0, 1.0, 1.0)],
)
def test_depth_branch_multiplier_and_hidden_lr(depth_name, depth, branch, sgd, adam):
    """Branch x (L/L0)^-alpha; hidden-block lr x (L/L0)^(2 alpha - 1) (SGD), ^(alpha - 1) (Adam).

    L0 = 1, but 2 in the last row: at depth == base_depth nothing changes."""
    base = 2 if depth == 2 else 1
    for optimizer, scale in (("sgd", sgd), ("adam", adam)):
        p = parametrization.numbers("sp", optimizer, 64, 64, depth_name, depth, base)
        assert p.branch == pytest.approx(branch)
        assert p.lr["hidden"] == pytest.approx(scale) and p.lr["hidden_vector"] == pytest.approx(scale)
        assert p.lr["input"] == p.lr["output"] == p.lr["vector"] == 1.0


def _spec(width=32, depth=2):
    return models.MLPSpec(in_dim=5, out_dim=3, depth=depth, width=width, activation="tanh")


def _base_hyper(residual=False):
    return models.MLPHyper(2, residual, inits.scheme_index("lecun_normal"), 0.01, 1.0, 0.1, 0.01)


def test_init_scales_each_layer_kind_and_ntk_is_sp_at_init():
    """Same key: muP's readout is SP's times m^(-1/2), the rest equal; NTK's raw weights are m^(1/2) SP's and
    its multipliers m^(-1/2) undo that, so the function at init is SP's."""
    spec, key = _spec(), jax.random.PRNGKey(0)
    x = jax.random.normal(jax.random.PRNGKey(1), (7, 5))
    sp = models.init(key, spec, _base_hyper())
    mup_hyper = parametrization.numbers("mup", "adam", 32, 8).hyper(_base_hyper())
    mup = models.init(key, spec, mup_hyper)
    np.testing.assert_array_equal(mup["input"]["w"], sp["input"]["w"])
    np.testing.assert_array_equal(mup["hidden"]["w"], sp["hidden"]["w"])
    np.testing.assert_allclose(mup["output"]["w"], sp["output"]["w"] * 0.5, rtol=1e-7)
    np.testing.assert_array_equal(mup["output"]["b"], sp["output"]["b"])
    ntk_hyper = parametrization.numbers("ntk", "sgd", 32, 8).hyper(_base_hyper())
    ntk = models.init(key, spec, ntk_hyper)
    np.testing.assert_allclose(ntk["hidden"]["w"], sp["hidden"]["w"] * 2.0, rtol=1e-7)
    f_sp = models.apply(sp, x, spec, _base_hyper())[0]
    np.testing.assert_allclose(models.apply(ntk, x, spec, ntk_hyper)[0], f_sp, rtol=1e-5, atol=1e-6)


def test_forward_multipliers_against_numpy():
    """A residual net with hidden multiplier a, readout multiplier c and branch multiplier beta, in float64."""
    spec = _spec(width=6, depth=2)
    hyper = _base_hyper(residual=True)._replace(hidden_multiplier=0.7, output_multiplier=0.3, branch_multiplier=0.25)
    params = models.init(jax.random.PRNGKey(2), spec, hyper)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(3), (4, 5)), float)
    p = jax.tree.map(lambda a: np.asarray(a, float), params)
    h = np.tanh(x @ p["input"]["w"] + p["input"]["b"])
    for i in range(2):
        h = h + 0.25 * np.tanh(0.7 * (h @ p["hidden"]["w"][i]) + p["hidden"]["b"][i])
    expected = 0.3 * (h @ p["output"]["w"]) + p["output"]["b"]
    np.testing.assert_allclose(models.apply(params, jnp.asarray(x, jnp.float32), spec, hyper)[0], expected, rtol=1e-5)


def _hp(lr=0.1):
    return {
        "optim.lr": lr,
        "optim.momentum": 0.9,
        "optim.b1": 0.9,
        "optim.b2": 0.999,
        "optim.eps": 1e-8,
        "optim.weight_decay": 0.0,
        "optim.clip_threshold": 1.0,
    }


def _params_and_grads():
    spec = _spec(width=8, depth=2)
    params = models.init(jax.random.PRNGKey(4), spec, _base_hyper())
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(5), 2 * len(leaves))
    grads = [[jax.random.normal(k, leaf.shape) for k, leaf in zip(keys[j * len(leaves) :], leaves)] for j in range(2)]
    return params, [treedef.unflatten(g) for g in grads]


def _by_kind(tree):
    """[(kind, leaf as float64)] in leaf order: the labels have the parameters' structure."""
    kinds = jax.tree.leaves(parametrization.labels(tree))
    return [(kind, np.asarray(leaf, float)) for kind, leaf in zip(kinds, jax.tree.leaves(tree), strict=True)]


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_per_layer_lr_against_hand_computed_updates(optimizer):
    """Two steps of muP at m = 4, in float64: SGD -lr s g; Adam -lr s m_hat / (sqrt(v_hat) + eps) with
    m, v the exponential averages of g and g^2 and their bias corrections; s the table's scale of each kind."""
    lr, (b1, b2, eps) = 0.1, (0.9, 0.999, 1e-8)
    params, grads = _params_and_grads()
    tx = parametrization.numbers("mup", optimizer, 256, 64).optimizer(
        transforms.build(OptimConfig(name=optimizer), _hp(lr), 10)
    )
    state = tx.init(params)
    m = v = [0.0] * len(jax.tree.leaves(params))
    for t, g in enumerate(grads, start=1):
        updates, state = tx.update(g, state, params)
        g_np = [gk for _, gk in _by_kind(g)]
        m = [b1 * a + (1 - b1) * gk for a, gk in zip(m, g_np)]
        v = [b2 * a + (1 - b2) * gk**2 for a, gk in zip(v, g_np)]
        for (kind, u), gk, mk, vk in zip(_by_kind(updates), g_np, m, v, strict=True):
            scale = HAND["mup"][optimizer][kind]
            if optimizer == "sgd":
                expected = -lr * scale * gk
            else:
                expected = -lr * scale * (mk / (1 - b1**t)) / (np.sqrt(vk / (1 - b2**t)) + eps)
            np.testing.assert_allclose(u, expected, rtol=2e-5, atol=1e-9)


def test_labels_cover_every_leaf_with_a_norm_and_a_final_norm():
    spec = models.MLPSpec(in_dim=3, out_dim=2, depth=2, width=4, norm="layernorm", final_norm=True)
    params = models.init(jax.random.PRNGKey(0), spec, _base_hyper())
    kinds = {path: kind for path, kind in jax.tree_util.tree_leaves_with_path(parametrization.labels(params))}
    assert len(kinds) == len(jax.tree.leaves(params))
    names = {jax.tree_util.keystr(k): v for k, v in kinds.items()}
    assert names["['hidden']['scale']"] == "hidden_vector" and names["['final']['scale']"] == "vector"
    assert names["['output']['b']"] == "readout_bias" and names["['input']['b']"] == "vector"


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["model.parametrization=mup", "model.init=xavier_normal"], "model.init"),
        (["model.depth_parametrization=completep", "model.residual=false"], "model.residual"),
        (["model.parametrization=muP"], "model.parametrization"),
        (["model.base_width=0"], "model.base_width"),
    ],
)
def test_config_refuses_what_the_table_cannot_scale(overrides, key):
    with pytest.raises(ConfigError, match=key):
        api.resolve("gradient_flow", overrides)


def test_model_parametrization_reaches_a_supervised_run():
    """model.parametrization=mup through supervised_mlp's default: the readout's init is SP's x m^(-1/2)."""
    over = ["model.width=64", "model.base_width=16", "model.depth=2", "seeds=1", "steps=1", "chunk_steps=1"]
    params = {}
    for name in ("sp", "mup"):
        spec = api.resolve("gradient_flow", [*over, f"model.parametrization={name}", "model.init=lecun_normal"])
        group = config.plan(spec).groups[0]
        hp = {k: v[0].item() for k, v in group.hp.items()}
        params[name] = gradient_flow.trial(group.config).init(hp, jax.random.PRNGKey(0)).params
    np.testing.assert_allclose(params["mup"]["output"]["w"], 0.5 * params["sp"]["output"]["w"], rtol=1e-7)
    np.testing.assert_array_equal(params["mup"]["hidden"]["w"], params["sp"]["hidden"]["w"])
