"""A1 at a small size: the catalog's checks hold, derived from sigmoid' <= 1/4."""

import numpy as np

from gradlab import api

SMALL = [
    "model.width=64",
    "model.depth=12",
    "seeds=2",
    "data.examples=64",
    "model.activation=[sigmoid, relu]",
    "model.norm=[none, layernorm]",
]


def test_checks_pass_and_vanishing_matches_the_sigmoid_bound(tmp_path):
    outcome = api.execute("gradient_flow", SMALL, out=tmp_path, progress=False, draw=True)
    ds = outcome.dataset
    assert {c.name for c in outcome.checks} == {"plain sigmoid |g_1|/|g_10|", "residual+layernorm max/min |g_l|"}
    assert all(c.passed for c in outcome.checks), outcome.checks
    # Per-layer decay of the plain sigmoid net's gradient: at most 1/4 per layer (sigmoid' <= 1/4,
    # LeCun weights preserve the back-propagated norm in expectation), and well above 0.
    g = ds["grad_norm"].sel({"model.activation": "sigmoid", "model.residual": False, "model.norm": "none"})
    g = g.isel(step=0).median("seed").values
    per_layer = np.exp(np.mean(np.diff(np.log(g[1:12]))))  # growth toward the output
    assert 1 / per_layer <= 0.25 * 1.15
    assert 1 / per_layer > 0.05
    assert (tmp_path / "figures" / "gradient_flow.png").exists()
    assert int(ds["diverged"].sum()) == 0


def test_notebook_api_returns_data_and_figures(tmp_path):
    import matplotlib.figure

    import gradlab

    tiny = dict(
        model__width=8,
        model__depth=2,
        seeds=1,
        data__examples=16,
        data__input_dim=4,
        model__activation="tanh",
        model__norm="none",
        model__residual=False,
    )
    ds = gradlab.run("gradient_flow", out=tmp_path, progress=False, **tiny)
    assert ds["grad_norm"].dims == ("step", "layer")  # no swept axis left: dims are step and layer
    assert ds.attrs["experiment"] == "gradient_flow" and len(ds.attrs["config_hash"]) == 12
    assert isinstance(gradlab.plot(ds), matplotlib.figure.Figure)
    assert not (tmp_path / "figures").exists()  # the API draws nothing unless asked
    (run_dir,) = list((tmp_path / "runs").iterdir())
    stored = gradlab.load(run_dir)
    np.testing.assert_array_equal(stored["grad_norm"].values, ds["grad_norm"].values)
