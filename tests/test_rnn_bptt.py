"""C4 at a tiny size: the experiment's checks on a tiny sweep, the lag-slope fit against a closed
form, the compiled programs' freedom from LAPACK and the no-clipping lane (the model and its gradient
measurement: tests/test_rnn.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import transforms
from gradlab.config import OptimConfig
from gradlab.experiments import rnn_bptt


@pytest.fixture(scope="module")
def tiny(tiny_scale):
    """The `tiny` scale: simple and LSTM cells, T = 6 and 16, hidden 16, 3 steps, 2 seeds."""
    return tiny_scale("rnn_bptt")


def test_every_check_both_figures_and_one_compile_per_cell(tiny):
    outcome, out = tiny
    assert len(outcome.checks) == 4
    assert (out / "figures" / "rnn_bptt_training.png").exists()
    assert outcome.dataset.attrs["static_groups"] == 2  # one compile per cell; length, clip, seed vmapped
    grad = outcome.dataset["grad_x_norm"].sel(seq_len=6).values
    assert np.all(np.isnan(grad[..., 6:])) and np.all(grad[..., :6] > 0)  # lags beyond T - 1 do not exist


@pytest.mark.parametrize("rate", [0.8, 1.15])
def test_fit_slope_is_the_log_rate_and_skips_lag_zero_and_lags_past_the_length(rate):
    """||dl/dx|| = c rate^k over the fitted lags is a line of slope ln(rate) in ln; lag 0 (reached
    through the readout too) and lags >= length (NaN) are left out of the fit."""
    length = 9
    norms = 2.5 * rate ** np.arange(12.0)
    norms[0] = 40.0  # not on the line: must be skipped (FIT_SKIP = 1)
    norms[length:] = np.nan
    assert rnn_bptt.FIT_SKIP == 1
    assert abs(rnn_bptt.fit_slope(norms, length) - np.log(rate)) < 1e-12
    norms[length:] = 1.0  # finite but beyond the sequence: still not fitted
    assert abs(rnn_bptt.fit_slope(norms, length) - np.log(rate)) < 1e-12


def test_the_compiled_sweep_calls_no_lapack():
    """flax's default orthogonal init is a LAPACK QR; four at once (an LSTM's recurrent kernels, batched
    over a sweep) hung jaxlib 0.10.2 on 2 cores, and ||W||_2 by jnp.linalg.norm is a LAPACK SVD. The
    compiled init and chunk programs of both cells hold no custom call (LAPACK's way in) at all."""
    from gradlab import config, engine

    spec = config.load("rnn_bptt", rnn_bptt.Config, [], "tiny")
    groups = config.plan(spec).groups
    assert sorted(g.config.cell for g in groups) == ["lstm", "simple"]
    for group in groups:
        compiled = engine.compile_group(rnn_bptt.trial(group.config), group.hp, 3, 3, jax.local_devices()[:1])
        for program in (compiled.init, compiled.chunk):
            text = program.as_text()
            found = [line for line in text.splitlines() if "custom-call(" in line or "custom_call_target" in line]
            assert not found, (group.config.cell, found[:3])


def test_a_huge_clip_threshold_is_no_clipping():
    """The config's 'no clipping' lane: clip_by_global_norm at 1e30 returns the same updates as no clip."""
    params = {"w": jnp.arange(6.0).reshape(2, 3)}
    grads = {"w": jnp.array([[3.0, -40.0, 5.0], [1e3, 0.5, -2.0]])}
    hp = {
        f"optim.{k}": jnp.float32(v)
        for k, v in dict(
            lr=0.01, momentum=0.9, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0, clip_threshold=1e30
        ).items()
    }
    updates = {}
    for clip in ("global_norm", "none"):
        tx = transforms.build(OptimConfig(name="adam", clip=clip), hp, 10)
        updates[clip] = tx.update(grads, tx.init(params), params)[0]["w"]
    np.testing.assert_array_equal(np.asarray(updates["global_norm"]), np.asarray(updates["none"]))
