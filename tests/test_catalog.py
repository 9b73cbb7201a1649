"""Every experiment of the catalog at its `tiny` scale: its checks pass, its figures are drawn from
stored results alone, and it compiles once per static group of its plan."""

import matplotlib.pyplot as plt
import pytest

from gradlab import api, config, experiments

NAMES = experiments.names()


@pytest.mark.parametrize("name", NAMES)
def test_tiny_scale_passes_its_checks_and_draws_its_figures(name, tiny_scale):
    spec = api.resolve(name, scale="tiny")
    outcome, out = tiny_scale(name)  # the run tests/test_NAME.py reads too, made once
    failed = [c for c in outcome.checks if not c.passed]
    assert outcome.checks and not failed, failed
    assert outcome.dataset.attrs["static_groups"] == len(config.plan(spec).groups)
    assert (out / "figures" / f"{name}.png").exists()
    plt.close("all")

    # Redrawn from the stored file alone, the checks are the same numbers.
    stored = api.load(outcome.run_dir)
    assert [(c.name, c.measured, c.passed) for c in api.checks(stored)] == [
        (c.name, c.measured, c.passed) for c in outcome.checks
    ]


def test_every_experiment_follows_the_contract():
    for name in NAMES:
        module = experiments.get(name)
        for attr in ("NAME", "CLAIM", "Config", "AXES", "trial", "measure", "checks", "figures"):
            assert hasattr(module, attr), f"{name} lacks {attr}"
        assert module.NAME == name
        assert issubclass(module.Config, config.ExperimentConfig)
