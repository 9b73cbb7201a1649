"""The engine: vmapped sweeps equal single runs, one trace per group, divergence isolation, resume."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import config, engine, programs, results, trials
from gradlab.config import ExperimentConfig

BASE = """
steps: 6
chunk_steps: 2
model: {depth: 3, width: 16, activation: tanh}
optim: {name: momentum, lr: 0.05}
data: {examples: 32, input_dim: 8}
"""


def spec_of(tmp_path, overrides=(), text=BASE):
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return config.load("exp", ExperimentConfig, list(overrides), path=path)


def sweep(spec, **kw):
    return engine.run_sweep(trials.supervised_mlp, config.plan(spec), progress=False, **kw)


def test_each_vmapped_point_equals_its_own_run(tmp_path):
    spec = spec_of(tmp_path, ["optim.lr=[0.01, 0.1]", "seeds=2", "model.residual=[false, true]"])
    together = sweep(spec)
    assert together.metrics["loss"].shape == (2, 2, 2, 6)  # residual, lr, seed, step
    for i, j, k in [(0, 0, 0), (1, 1, 1), (1, 0, 1)]:
        residual, lr, seed = [False, True][i], [0.01, 0.1][j], k
        alone = sweep(spec_of(tmp_path, [f"optim.lr={lr}", f"seed={seed}", f"model.residual={str(residual).lower()}"]))
        np.testing.assert_allclose(together.metrics["loss"][i, j, k], alone.metrics["loss"], rtol=2e-6)
        np.testing.assert_allclose(together.metrics["grad_norm"][i, j, k], alone.metrics["grad_norm"], rtol=2e-5)


def test_one_trace_per_static_group_and_none_per_chunk(tmp_path):
    spec = spec_of(tmp_path, ["model.norm=[none, layernorm]", "optim.lr=[0.01, 0.02, 0.03]"])

    def counted(cfg):
        trial = trials.supervised_mlp(cfg)
        return trial._replace(step=chex.assert_max_traces(trial.step, n=2))

    chex.clear_trace_counter()
    out = engine.run_sweep(counted, config.plan(spec), progress=False)  # 2 groups x 3 chunks
    assert out.groups == 2
    assert np.all(np.isfinite(out.metrics["loss"]))


class Interrupt(Exception):
    pass


def test_resume_after_an_interruption_is_bit_identical(tmp_path):
    spec = spec_of(tmp_path, ["optim.lr=[0.01, 0.1]"])
    reference = sweep(spec)
    ckpt = results.ensure_dir(tmp_path / "ckpt")
    calls = []

    def stop_after_first_chunk(n):
        calls.append(n)
        if len(calls) == 1:
            raise Interrupt

    trial = trials.supervised_mlp(config.plan(spec).groups[0].config)
    group = config.plan(spec).groups[0]
    with pytest.raises(Interrupt):
        engine.run_group(
            trial, group.hp, 6, 2, jax.local_devices(), ckpt / "group-0000.ckpt.npz", stop_after_first_chunk
        )
    assert int(results.load_checkpoint(ckpt / "group-0000.ckpt.npz")["t"]) == 2
    resumed = sweep(spec, checkpoint_dir=ckpt)
    for name in reference.metrics:
        np.testing.assert_array_equal(resumed.metrics[name], reference.metrics[name])
    assert not list(ckpt.glob(".*.tmp"))


def test_all_finite_sees_one_bad_entry_in_any_leaf():
    tree = {"w": jnp.ones((70, 70)), "b": jnp.zeros(3), "n": jnp.int32(7)}
    assert bool(programs._all_finite(tree))
    for leaf, index, bad in (("w", (69, 3), jnp.nan), ("w", (0, 0), jnp.inf), ("b", 2, -jnp.inf)):
        broken = dict(tree)
        broken[leaf] = tree[leaf].at[index].set(bad)
        assert not bool(programs._all_finite(broken)), (leaf, bad)
    # +inf in one leaf and -inf in another must not cancel
    assert not bool(programs._all_finite({"a": jnp.array([jnp.inf]), "b": jnp.array([-jnp.inf])}))


def test_a_cpu_sweep_that_calls_lapack_is_warned_of_and_one_that_does_not_is_not():
    """jaxlib 0.10's batched LAPACK kernels can deadlock two at a time on XLA:CPU's pool (an LSTM's
    recurrent kernels from flax's orthogonal init hung rnn_bptt). A compiled sweep whose init holds a
    QR gets a LapackOnCpuWarning naming the kernel; gradlab's own orthogonal init gets none."""
    import warnings

    from gradlab import inits
    from gradlab.errors import LapackOnCpuWarning

    def trial_with(orthogonal):
        def init(hp, key):
            return {"w": orthogonal(key, (6, 6)), "t": jnp.int32(0)}

        def step(hp, state):
            w = state["w"] * (1 - hp["lr"])
            return {"w": w, "t": state["t"] + 1}, {"loss": jnp.sum(w * w)}

        return engine.Trial(init, step)

    hp = {"lr": np.array([0.1, 0.2, 0.3, 0.4], np.float32), "seed": np.arange(4)}
    qr = lambda key, shape: jnp.linalg.qr(jax.random.normal(key, shape))[0]  # noqa: E731
    with pytest.warns(LapackOnCpuWarning, match="lapack_sgeqrf"):
        engine.compile_group(trial_with(qr), hp, 2, 2, jax.local_devices()[:1])
    with warnings.catch_warnings():
        warnings.simplefilter("error", LapackOnCpuWarning)
        engine.compile_group(trial_with(inits.orthogonal), hp, 2, 2, jax.local_devices()[:1])
