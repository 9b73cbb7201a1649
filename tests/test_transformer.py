"""The transformer against a numpy loop written per position and head, causal masking, the depth
mask, the losses, and the qk-layernorm bound on attention logits."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import transformer as tf

SPEC = tf.TransformerSpec(vocab=7, seq_len=5, depth=3, width=8, heads=2, mlp_ratio=2)


def hyper(**kw):
    values = dict(depth=SPEC.depth, init=tf.inits.scheme_index("lecun_normal"), init_gain=1.0, embed_std=1.0)
    return tf.TransformerHyper(**{**values, "z_loss": 0.0, "softcap": 0.0, **kw})


def params_for(spec, key=0, gain=1.0):
    p = tf.init(jax.random.PRNGKey(key), spec, hyper(init_gain=gain))
    # Non-trivial norm parameters and biases, so the reference has to apply each one.
    leaves, tree = jax.tree.flatten(p)
    keys = jax.random.split(jax.random.PRNGKey(key + 100), len(leaves))
    noisy = [a + 0.1 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]
    return jax.tree.unflatten(tree, noisy)


def np_norm(kind, x, p, eps):
    x = np.asarray(x, np.float64)
    if kind == "layernorm":
        mu = sum(x) / len(x)
        var = sum((xi - mu) ** 2 for xi in x) / len(x)
        return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])
    return x / np.sqrt(sum(xi**2 for xi in x) / len(x) + eps) * np.asarray(p["scale"])


def reference(params, tokens, spec, softcap=0.0):
    """Logits (batch, seq, vocab) by loops: every query position and head attends over keys 0..t."""
    eps = 1e-5 if spec.norm == "layernorm" else 1e-6
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    norm = lambda x, q: np_norm(spec.norm, x, q, eps)  # noqa: E731
    gelu = lambda x: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))  # noqa: E731
    out = np.zeros(tokens.shape + (spec.vocab,))
    e = spec.head_dim
    for b in range(tokens.shape[0]):
        h = [p["embed"][tokens[b, t]] + p["pos"][t] for t in range(tokens.shape[1])]
        for layer in range(spec.depth):
            lp = jax.tree.map(lambda a: a[layer], p["blocks"])

            def attend(xs):
                q = [x @ lp["wq"] for x in xs]
                k = [x @ lp["wk"] for x in xs]
                v = [x @ lp["wv"] for x in xs]
                outs = []
                for t in range(len(xs)):
                    heads = []
                    for head in range(spec.heads):
                        part = slice(head * e, (head + 1) * e)
                        qh = q[t][part]
                        if spec.qk_layernorm:
                            qh = norm(qh, lp["q_norm"])
                        scores = []
                        for s in range(t + 1):
                            kh = k[s][part]
                            if spec.qk_layernorm:
                                kh = norm(kh, lp["k_norm"])
                            scores.append(float(qh @ kh) / np.sqrt(e))
                        w = np.exp(np.array(scores) - max(scores))
                        w /= w.sum()
                        heads.append(sum(w[s] * v[s][part] for s in range(t + 1)))
                    outs.append(np.concatenate(heads) @ lp["wo"])
                return outs

            mlp = lambda x: gelu(x @ lp["w1"] + lp["b1"]) @ lp["w2"] + lp["b2"]  # noqa: E731
            if spec.norm_position == "pre":
                a = attend([norm(x, lp["norm1"]) for x in h])
                h = [x + y for x, y in zip(h, a)]
                h = [x + mlp(norm(x, lp["norm2"])) for x in h]
            else:
                a = attend(h)
                h = [norm(x + y, lp["norm1"]) for x, y in zip(h, a)]
                h = [norm(x + mlp(x), lp["norm2"]) for x in h]
        for t, x in enumerate(h):
            if spec.norm_position == "pre":
                x = norm(x, p["final_norm"])
            logits = x @ (p["embed"].T if spec.tied else p["unembed"])
            out[b, t] = softcap * np.tanh(logits / softcap) if softcap else logits
    return out


VARIANTS = [
    {},
    {"norm_position": "post"},
    {"norm": "rmsnorm", "qk_layernorm": True},
    {"qk_layernorm": True, "tied": True, "norm_position": "post"},
]


@pytest.mark.parametrize("change", VARIANTS, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()) or "pre-LN")
def test_forward_pass_equals_a_per_position_loop(change):
    spec = dataclasses.replace(SPEC, **change)
    params = params_for(spec)
    tokens = np.array([[1, 4, 0, 6, 2], [3, 3, 5, 1, 0]])
    logits, _ = tf.apply(params, jnp.asarray(tokens), spec, hyper())
    np.testing.assert_allclose(np.asarray(logits), reference(params, tokens, spec), rtol=2e-4, atol=2e-4)


def test_soft_capping_bounds_the_logits_and_matches_the_loop():
    params = params_for(SPEC, gain=4.0)
    tokens = np.array([[1, 4, 0, 6, 2]])
    logits, _ = tf.apply(params, jnp.asarray(tokens), SPEC, hyper(softcap=2.0))
    np.testing.assert_allclose(np.asarray(logits), reference(params, tokens, SPEC, softcap=2.0), rtol=2e-4, atol=2e-4)
    assert np.max(np.abs(logits)) < 2.0


@pytest.mark.parametrize("position", ["pre", "post"])
def test_changing_a_later_token_never_changes_an_earlier_output(position):
    spec = dataclasses.replace(SPEC, norm_position=position)
    params = params_for(spec)
    tokens = np.array([[1, 4, 0, 6, 2]])
    base, _ = tf.apply(params, jnp.asarray(tokens), spec, hyper())
    for j in range(1, spec.seq_len):
        changed = tokens.copy()
        changed[0, j] = (changed[0, j] + 3) % spec.vocab
        out, _ = tf.apply(params, jnp.asarray(changed), spec, hyper())
        np.testing.assert_array_equal(np.asarray(out[:, :j]), np.asarray(base[:, :j]))
        assert not np.allclose(out[:, j], base[:, j])  # the changed position itself does see it


def test_blocks_past_the_traced_depth_pass_the_stream_through():
    params = params_for(SPEC)
    tokens = jnp.asarray([[1, 4, 0, 6, 2]])
    shallow = dataclasses.replace(SPEC, depth=2)
    cut = {**params, "blocks": jax.tree.map(lambda a: a[:2], params["blocks"])}
    masked, taps = tf.apply(params, tokens, SPEC, hyper(depth=2))
    np.testing.assert_allclose(masked, tf.apply(cut, tokens, shallow, hyper(depth=2))[0], rtol=1e-6, atol=1e-6)

    def loss(p):
        logits, _ = tf.apply(p, tokens, SPEC, hyper(depth=2))
        return tf.losses(logits, tokens, jnp.ones(5), 0.0)[0]

    norms = tf.block_grad_norms(jax.grad(loss)(params))
    assert norms[2] == 0 and np.all(norms[:2] > 0)


def test_attention_taps_against_numpy():
    params = params_for(SPEC)
    tokens = jnp.asarray([[1, 4, 0, 6, 2]])
    lp = jax.tree.map(lambda a: a[0], params["blocks"])
    x = np.asarray(params["embed"][tokens] + params["pos"][None])
    x_n = np.stack([[np_norm("layernorm", v, lp["norm1"], 1e-5) for v in row] for row in x])
    _, taps = tf.attention(jnp.asarray(x_n, jnp.float32), lp, SPEC)
    q = (x_n @ np.asarray(lp["wq"])).reshape(1, 5, 2, 4)
    k = (x_n @ np.asarray(lp["wk"])).reshape(1, 5, 2, 4)
    scores = np.einsum("bqhe,bkhe->bhqk", q, k) / 2.0
    causal = np.tril(np.ones((5, 5), bool))
    valid = scores[:, :, causal]
    np.testing.assert_allclose(taps["attn_logit_max"], valid.max(), rtol=1e-4)
    np.testing.assert_allclose(taps["attn_logit_rms"], np.sqrt(np.mean(valid**2)), rtol=1e-4)
    entropy = np.zeros(2)
    for head in range(2):
        for t in range(5):
            w = np.exp(scores[0, head, t, : t + 1] - scores[0, head, t, : t + 1].max())
            w /= w.sum()
            entropy[head] += -np.sum(w * np.log(w)) / 5
    np.testing.assert_allclose(taps["attn_entropy"], entropy, rtol=1e-4)


def test_qk_layernorm_bounds_the_logits_by_sqrt_head_dim():
    """|LN(q) . LN(k)| / sqrt(e) <= |LN(q)| |LN(k)| / sqrt(e) = sqrt(e) (unit scale, zero bias)."""
    spec = dataclasses.replace(SPEC, qk_layernorm=True)
    params = tf.init(jax.random.PRNGKey(0), spec, hyper(init_gain=50.0))
    _, taps = tf.apply(params, jnp.asarray([[1, 4, 0, 6, 2]]), spec, hyper(init_gain=50.0))
    _, loose = tf.apply(
        tf.init(jax.random.PRNGKey(0), SPEC, hyper(init_gain=50.0)), jnp.asarray([[1, 4, 0, 6, 2]]), SPEC, hyper()
    )
    assert np.max(taps["attn_logit_max"]) <= np.sqrt(spec.head_dim) * (1 + 1e-5)
    assert np.max(loose["attn_logit_max"]) > 10 * np.sqrt(spec.head_dim)  # without it, the logits are not bounded


def test_losses_cross_entropy_and_z_loss_against_numpy():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(2, 5, 7)) * 3
    targets = rng.integers(0, 7, size=(2, 5))
    weights = np.array([0, 1, 1, 1, 1], np.float32)
    objective, ce = tf.losses(jnp.asarray(logits, jnp.float32), jnp.asarray(targets), jnp.asarray(weights), 0.01)
    log_z = np.log(np.sum(np.exp(logits), axis=-1))
    nll = log_z - np.take_along_axis(logits, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(ce, nll[:, 1:].mean(), rtol=1e-5)
    np.testing.assert_allclose(objective, nll[:, 1:].mean() + 0.01 * np.mean(log_z[:, 1:] ** 2), rtol=1e-5)


def test_width_must_be_a_multiple_of_heads():
    with pytest.raises(tf.ConfigError, match="model.width=10"):
        tf.TransformerConfig(width=10, heads=4).validate()
