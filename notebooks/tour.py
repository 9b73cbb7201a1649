# %% [markdown]
# # A tour of gradlab from a notebook
#
# Open this file in Jupyter (with jupytext) or VS Code as a notebook, or run it as a script:
# `python notebooks/tour.py`. It runs at quick scale on a CPU in about a minute. A test executes
# it, so it stays in step with the code.

# %%
import os
import tempfile
from pathlib import Path

import numpy as np

import gradlab

# Runs and figures go to a scratch folder here; pass out="." to keep them beside your work.
OUT = Path(os.environ.get("GRADLAB_TOUR_OUT") or tempfile.mkdtemp(prefix="gradlab-tour-"))

# %% [markdown]
# ## 1. Run an experiment, get labelled results
# `gradlab.run` returns an `xarray.Dataset`: one dimension per sweep axis, then `step` and
# `layer`. Keyword arguments are config overrides, with `__` for a dot. Here the gradient
# at initialisation of a deep tanh/ReLU/sigmoid net, plain and residual, with 2 seeds.

# %%
ds = gradlab.run(
    "gradient_flow",
    out=OUT,
    progress=False,
    seeds=2,
    model__width=64,
    model__norm="none",
    model__activation=["tanh", "sigmoid"],
)
print(ds["grad_norm"].dims, dict(ds["grad_norm"].sizes))

# %% [markdown]
# Select with labels, not positions: the per-layer gradient norm of the plain sigmoid net.

# %%
sigmoid = ds["grad_norm"].sel({"model.activation": "sigmoid", "model.residual": False}).isel(step=0)
per_layer = sigmoid.mean("seed").values
print("first / last layer gradient:", per_layer[0] / per_layer[-2])

# %% [markdown]
# ## 2. The checks that prove the claim, and the figure

# %%
for check in gradlab.checks(ds):
    print(f"{'pass' if check.passed else 'FAIL'}  {check.name}: {check.measured:.3g} ({check.expected})")

fig = gradlab.plot(ds)  # a matplotlib Figure; in a notebook it displays itself
fig.savefig(OUT / "gradient_flow.png", dpi=80)

# %% [markdown]
# ## 3. A sweep of your own over a built-in experiment
# A learning-rate axis is vmapped: one compiled program for every rate. Diverged points are
# marked, not fatal.

# %%
SWEEP = dict(
    surface="bowl",
    steps=400,
    chunk_steps=400,
    optim__name="sgd",
    optim__weight_decay=0.0,
    optim__lr=[0.05, 0.1, 0.2, 0.3],
)  # GD on w0^2 + 4 w1^2 diverges past lr = 2/8
ds = gradlab.run("quadratic", out=OUT, progress=False, **SWEEP)
print("diverged per lr:", dict(zip(ds["optim.lr"].values.round(3).tolist(), ds["diverged"].values.ravel().tolist())))
assert bool(ds["diverged"].sel({"optim.lr": 0.3}).any()) and not bool(ds["diverged"].sel({"optim.lr": 0.1}).any())

# %% [markdown]
# ## 4. Stored results are reused
# The same config has the same hash, so a second call loads instead of running.

# %%
again = gradlab.run("quadratic", out=OUT, progress=False, **SWEEP)
assert np.array_equal(again["loss"].values, ds["loss"].values, equal_nan=True)
print("reloaded from", OUT / "runs")
