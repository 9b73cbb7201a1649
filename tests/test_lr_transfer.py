"""lr_transfer at its tiny scale: the parametrizations coincide at the base width, a traced
parametrization lane equals the same net under model.parametrization, and the best-rate measure."""

import numpy as np
import pytest

from gradlab import api
from gradlab.errors import ConfigError
from gradlab.experiments import lr_transfer


@pytest.fixture(scope="module")
def tiny(tiny_scale):
    """Widths 32 (the base width) and 256, Adam, 7 rates x 3 parametrizations, 300 steps."""
    return tiny_scale("lr_transfer")[0]


def test_one_compile_per_width_and_every_check(tiny):
    ds = tiny.dataset
    assert ds.attrs["static_groups"] == 2  # the rates, the parametrizations and the seeds are vmapped
    names = [c.name.split(":")[0] for c in tiny.checks]
    assert names == ["adam, SP", "adam, muP", "adam, width 256"], names


def test_every_parametrization_is_sp_at_the_base_width(tiny):
    """m = 1: every multiplier is 1 ** e = 1 exactly, so the three lanes are one net, bit for bit."""
    loss = tiny.dataset["loss"].sel({"model.width": 32})
    sp = loss.sel(parametrization="sp").values
    assert np.isfinite(sp).any()
    for name in ("mup", "ntk"):
        np.testing.assert_array_equal(loss.sel(parametrization=name).values, sp)
    wide = tiny.dataset["loss"].sel({"model.width": 256})
    assert not np.allclose(wide.sel(parametrization="mup").values, wide.sel(parametrization="sp").values)


def test_traced_mup_lane_equals_the_static_model_parametrization(tiny, tmp_path):
    """The mup lane at width 256 against supervised_mlp under model.parametrization=mup (gradient_flow's trial)."""
    ds = tiny.dataset
    lr = float(ds["optim.lr"].values[4])
    over = [
        "model.width=256",
        "model.base_width=32",
        "model.depth=1",
        "model.activation=tanh",
        "model.init=lecun_normal",
        "model.residual=false",
        "model.norm=none",
        "model.parametrization=mup",
        "optim.name=adam",
        f"optim.lr={lr!r}",
        "data.examples=4096",
        "data.batch_size=128",
        "data.input_dim=32",
        "data.task=classification",
        "data.output_dim=10",
        "data.noise=1.0",
        "telemetry=loss",
        "steps=300",
        "chunk_steps=300",
        "seeds=1",
    ]
    reference = api.execute("gradient_flow", over, out=tmp_path, progress=False, draw=False).dataset["loss"].values
    lane = ds["loss"].sel({"model.width": 256, "parametrization": "mup", "optim.lr": lr}).values
    np.testing.assert_allclose(lane.ravel(), reference.ravel(), rtol=1e-5)


def test_best_rate_and_shift_by_hand():
    lrs = 2.0 ** np.arange(-8, 0)
    final = np.array([[5, 4, 3, 2, 1, 2, np.inf, np.inf], [5, 3, 1, 2, 3, 4, np.inf, np.inf]], float)
    best = lrs[np.argmin(final, axis=1)]
    c = lr_transfer.Curves("adam", "sp", np.array([32, 256]), lrs, final, best, final.min(axis=1))
    assert c.best[0] == 2.0**-4 and c.best[1] == 2.0**-6 and c.shift == -2.0
    checks = lr_transfer.checks(lr_transfer.Measured([c]))
    assert [(x.measured, x.passed) for x in checks] == [(2.0, True)]  # SP moved 4x: exactly the bound


def test_model_parametrization_is_refused_here():
    with pytest.raises(ConfigError, match="model.parametrization"):
        api.resolve("lr_transfer", ["model.parametrization=mup"])
