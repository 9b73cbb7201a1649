"""The real datasets against their published descriptions, and gradlab's own sweep against the
published MNIST-1D accuracies (Greydanus & Kobak 2024: logistic regression 32 %, MLP 68 %)."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from gradlab import api, config, data, datasets, engine, trials
from gradlab.config import DataConfig, ExperimentConfig, ModelConfig, OptimConfig
from gradlab.config.schema import Axis, RunSpec
from gradlab.errors import ConfigError, SetupError

# UCI optical digits as scikit-learn ships them: examples per class 0..9 (1797 in all).
DIGITS_PER_CLASS = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.mark.parametrize("name", datasets.NAMES)
def test_shapes_dtypes_and_split_sizes(name):
    shape, split = datasets.SHAPES[name], datasets.load(name)
    assert split.x_train.shape == (shape.train, shape.input_dim) and split.x_test.shape == (shape.test, shape.input_dim)
    assert split.x_train.dtype == split.x_test.dtype == np.float32
    if shape.kind == "classification":
        assert split.y_train.shape == (shape.train,) and split.y_train.dtype == np.int32
        assert set(np.unique(split.y_train)) == set(range(shape.output_dim))
    else:
        assert split.y_train.shape == (shape.train, 1) and split.y_train.dtype == np.float32
    assert not split.x_train.flags.writeable  # one cached copy per process: nobody may change it


def test_mnist1d_is_the_published_set():
    """4000 / 1000 signals of 40 samples, 10 classes; the generator makes 500 of each digit and
    shuffles before splitting, so a class's train count is hypergeometric around 400 (std 8.5)."""
    split = datasets.load("mnist1d")
    assert (len(split.y_train), len(split.y_test), split.x_train.shape[1]) == (4000, 1000, 40)
    total = np.bincount(split.y_train, minlength=10) + np.bincount(split.y_test, minlength=10)
    np.testing.assert_array_equal(total, np.full(10, 500))
    assert np.all(np.abs(np.bincount(split.y_train) - 400) <= 26)  # 3 sigma


def test_mnist1d_is_the_package_generator_standardised_per_feature():
    """Labels equal the package's; each feature is an increasing affine map of the package's
    (correlation 1), with the train split's mean and std; numpy's global generator is left alone."""
    from mnist1d.data import make_dataset

    state = np.random.get_state()
    datasets._load.cache_clear()
    split = datasets.load("mnist1d")
    after = np.random.get_state()
    assert state[0] == after[0] and np.array_equal(state[1], after[1]) and state[2:] == after[2:]
    ref = make_dataset()
    np.testing.assert_array_equal(split.y_train, ref["y"])
    np.testing.assert_array_equal(split.y_test, ref["y_test"])
    mean, std = ref["x"].mean(axis=0), ref["x"].std(axis=0)
    np.testing.assert_allclose(split.x_test, (ref["x_test"] - mean) / std, atol=1e-5)


@pytest.mark.parametrize("name", datasets.NAMES)
def test_standardised_with_the_train_statistics(name):
    split = datasets.load(name)
    std = split.x_train.std(axis=0)
    varying = std > 0
    np.testing.assert_allclose(split.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(std[varying], 1.0, rtol=1e-4)
    np.testing.assert_array_equal(split.x_train[:, ~varying], 0.0)  # constant pixels: centred only
    if datasets.SHAPES[name].kind == "regression":
        assert abs(split.y_train.mean()) < 1e-5 and split.y_train.std() == pytest.approx(1.0, rel=1e-4)
    # the test split is standardised with the train split's numbers, so it is only near 0 / 1
    assert np.all(np.abs(split.x_test.mean(axis=0)) < 0.5)


def test_digits_is_the_uci_set_split_without_overlap():
    split = datasets.load("digits")
    assert len(split.y_train) + len(split.y_test) == 1797 and split.x_train.shape[1] == 64
    counts = np.bincount(split.y_train, minlength=10) + np.bincount(split.y_test, minlength=10)
    np.testing.assert_array_equal(counts, DIGITS_PER_CLASS)
    rows = {r.tobytes() for r in np.round(split.x_train, 4)}
    assert sum(r.tobytes() in rows for r in np.round(split.x_test, 4)) <= 5  # digits has a few duplicate images


def test_diabetes_shape():
    split = datasets.load("diabetes")
    assert len(split.y_train) + len(split.y_test) == 442 and split.x_train.shape[1] == 10
    assert len(split.y_test) == round(0.2 * 442)


def test_loading_twice_gives_the_same_arrays():
    for name in datasets.NAMES:
        first = datasets.load(name)
        datasets._load.cache_clear()
        second = datasets.load(name)
        for a, b in zip(first, second):
            np.testing.assert_array_equal(a, b)


def test_config_takes_the_dataset_dims_and_refuses_noise():
    spec = api.resolve("init_schemes", ["data.task=mnist1d", "data.input_dim=3", "data.examples=7"], "tiny")
    assert (spec.config.data.examples, spec.config.data.input_dim, spec.config.data.output_dim) == (4000, 40, 10)
    assert data.kind(spec.config.data) == "classification" and data.kind(DataConfig(task="diabetes")) == "regression"
    with pytest.raises(ConfigError, match="data.noise"):
        api.resolve("init_schemes", ["data.task=digits", "data.noise=0.1"], "tiny")


def test_eval_slices_cover_the_test_split():
    n, size = 1000, 64
    test = data.Data(jnp.arange(n, dtype=jnp.float32)[:, None], jnp.arange(n))
    seen = np.concatenate([np.asarray(data.eval_slice(test, size, jnp.int32(t)).y) for t in range(-(-n // size))])
    assert len(seen) == 16 * size and set(seen.tolist()) == set(range(n))
    assert data.eval_slice(test, 2000, 0) is test


def test_a_missing_package_names_the_extra(monkeypatch):
    real = datasets.importlib.import_module

    def missing(name):
        if name.partition(".")[0] == "sklearn":
            raise ImportError(f"No module named {name!r}")
        return real(name)

    monkeypatch.setattr(datasets.importlib, "import_module", missing)
    with pytest.raises(SetupError) as e:
        api.resolve("init_schemes", ["data.task=digits"], "tiny")
    assert str(e.value) == "data.task=digits needs the sklearn package: pip install 'gradlab-jax[data]'"


def test_cli_without_the_extra_prints_one_line_and_exits_2(tmp_path):
    """A blocked import (sys.modules[name] = None) stands for an environment without mnist1d."""
    code = (
        "import sys; sys.modules['mnist1d'] = None; from gradlab.cli import main; "
        f"sys.exit(main(['run', 'init_schemes', 'data.task=mnist1d', '--scale', 'tiny', '--out', {str(tmp_path)!r}]))"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert "pip install 'gradlab-jax[data]'" in lines[0] and "mnist1d" in lines[0]
    assert not any(tmp_path.iterdir())  # refused before anything was written


# ----------------------------------------------------------------------------- published accuracies


def sweep(activation_axis, *, steps, batch_size, seeds):
    """gradlab's engine on MNIST-1D: a net of two hidden layers of 100 (Greydanus & Kobak's MLP; with
    linear units the net computes a linear map, logistic regression), Adam lr 0.01; activation is a
    static axis. Returns {activation: final test accuracy per seed}, the final one being the mean
    over the last ceil(1000 / batch) steps, whose test slices cover the test split once."""
    cfg = ExperimentConfig(
        steps=steps,
        chunk_steps=steps,
        telemetry="loss",
        model=ModelConfig(depth=1, width=100, activation=activation_axis[0], init="he_normal"),
        optim=OptimConfig(name="adam", lr=0.01),
        data=DataConfig(task="mnist1d", batch_size=batch_size),
    )
    axes = (Axis("model.activation", tuple(activation_axis), "static"), Axis("seed", tuple(range(seeds)), "traced"))
    result = engine.run_sweep(
        trials.supervised_mlp, config.plan(RunSpec("mnist1d", cfg, axes, "test", "")), progress=False
    )
    last = -(-1000 // batch_size) if batch_size else 1
    accuracy = result.metrics["test_accuracy"][..., -last:].mean(axis=-1)
    assert np.all(np.isfinite(result.metrics["test_loss"]))
    return dict(zip(activation_axis, accuracy))


@pytest.fixture(scope="module")
def full_batch():
    """300 full-batch steps: logistic regression converges; the MLP fits the training set."""
    return sweep(["linear", "relu"], steps=300, batch_size=0, seeds=2)


def test_logistic_regression_reaches_the_published_32_percent(full_batch):
    assert np.all(np.abs(full_batch["linear"] - 0.32) <= 0.03), full_batch["linear"]


def test_mlp_beats_logistic_regression_by_far(full_batch):
    """Full-batch training overfits (the published 68 % needs minibatches, below), but the MLP's
    nonlinearity is worth more than 20 points over the linear model (36 published)."""
    assert np.all(full_batch["relu"] - full_batch["linear"].max() >= 0.20), full_batch


@pytest.mark.slow
def test_mlp_reaches_the_published_68_percent():
    """Greydanus & Kobak's recipe: batch 100, Adam lr 0.01, 6000 steps; seed mean within 5 points."""
    accuracy = sweep(["relu"], steps=6000, batch_size=100, seeds=4)["relu"]
    assert abs(accuracy.mean() - 0.68) <= 0.05, accuracy


def test_every_figure_drawn_from_a_real_dataset_names_it(tmp_path):
    import matplotlib.pyplot as plt

    outcome = api.execute("lr_sweep", ["data.task=digits"], scale="tiny", out=tmp_path, progress=False, draw=False)
    for fig in api.figures(outcome.dataset).values():
        texts = [t.get_text() for t in fig.findobj(lambda a: hasattr(a, "get_text"))]
        assert any(datasets.title("digits") in text for text in texts), texts
    plt.close("all")
