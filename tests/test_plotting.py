"""The figure style: atomic png/pdf, the min..max band, the legend and notes; no jax behind it."""

import os
import subprocess
import sys

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PolyCollection

from gradlab import plotting


@pytest.fixture
def panel():
    fig, axes = plotting.figure(1, 2)
    yield fig, axes[0, 0]
    plt.close(fig)


def test_figure_is_a_grid_in_the_style():
    fig, axes = plotting.figure(2, 3, width=2.0, height=1.5)
    try:
        assert axes.shape == (2, 3)
        np.testing.assert_allclose(fig.get_size_inches(), [6.0, 3.0])
        assert not axes[1, 2].spines["top"].get_visible() and axes[1, 2].spines["left"].get_visible()
    finally:
        plt.close(fig)


def test_save_writes_png_and_pdf_and_closes_the_figure(tmp_path, panel):
    fig, ax = panel
    ax.plot([0, 1, 2], [1, 3, 2], label="a line")
    paths = plotting.save(fig, tmp_path / "figure")
    assert paths == [tmp_path / "figure.png", tmp_path / "figure.pdf"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pdf = paths[1].read_bytes()
    assert pdf[:5] == b"%PDF-" and pdf.rstrip().endswith(b"%%EOF")
    assert sorted(os.listdir(tmp_path)) == ["figure.pdf", "figure.png"]  # no temporary left
    assert not plt.fignum_exists(fig.number)


def test_a_failed_save_keeps_the_previous_figure_whole(tmp_path, panel):
    fig, ax = panel
    ax.plot([0, 1], [0, 1])
    old = tmp_path / "figure.png"
    old.write_bytes(b"the previous figure")

    def half_then_fail(path, **kw):
        with open(path, "wb") as f:
            f.write(b"\x89PNG half")
        raise RuntimeError("renderer died")

    fig.savefig = half_then_fail
    with pytest.raises(RuntimeError, match="renderer died"):
        plotting.save(fig, tmp_path / "figure")
    assert old.read_bytes() == b"the previous figure"
    assert os.listdir(tmp_path) == ["figure.png"]


def vertices_by_x(ax):
    """{x: the y values of the band's outline at x}, over every polygon of its fill."""
    (band,) = [c for c in ax.collections if isinstance(c, PolyCollection)]
    points = np.concatenate([path.vertices for path in band.get_paths()])
    found = {}
    for x, y in points:
        found.setdefault(float(x), []).append(float(y))
    return found


def test_band_spans_min_to_max_around_the_median(panel):
    _, ax = panel
    rng = np.random.default_rng(1)
    x = np.arange(1.0, 13.0)
    samples = np.exp(rng.standard_normal((7, 12)))
    line = plotting.band(ax, x, samples, "seeds")
    np.testing.assert_allclose(line.get_ydata(), np.median(samples, axis=0))
    assert line.get_label() == "seeds"
    outline = vertices_by_x(ax)
    assert sorted(outline) == list(x)
    for i, xi in enumerate(x):
        assert min(outline[xi]) == pytest.approx(np.min(samples[:, i]), rel=1e-12)
        assert max(outline[xi]) == pytest.approx(np.max(samples[:, i]), rel=1e-12)


def test_band_on_a_log_scale_skips_non_positive_samples_and_leaves_a_gap(panel):
    """Zero and negative values have no place on a log axis: a column keeps its positive samples,
    and one with none (every seed diverged) leaves a gap in line and band, without a warning."""
    _, ax = panel
    x = np.arange(5.0)
    samples = np.array([[1.0, 2.0, -1.0, 4.0, 5.0], [3.0, 0.0, 0.0, 8.0, np.inf], [2.0, 6.0, -3.0, np.nan, 7.0]])
    line = plotting.band(ax, x, samples, "runs")
    mid = np.asarray(line.get_ydata(), float)
    np.testing.assert_allclose(mid[[0, 1, 3]], [2.0, 4.0, 6.0])
    assert np.isnan(mid[2])
    outline = vertices_by_x(ax)
    assert 2.0 not in outline
    expected = {0.0: (1.0, 3.0), 1.0: (2.0, 6.0), 3.0: (4.0, 8.0)}
    for xi, (lo, hi) in expected.items():
        assert (min(outline[xi]), max(outline[xi])) == (lo, hi)


def test_band_without_log_keeps_negative_samples(panel):
    _, ax = panel
    samples = np.array([[-2.0, 1.0], [0.0, -5.0], [4.0, 3.0]])
    plotting.band(ax, [0.0, 1.0], samples, "linear", log=False)
    outline = vertices_by_x(ax)
    assert (min(outline[0.0]), max(outline[0.0])) == (-2.0, 4.0)
    assert (min(outline[1.0]), max(outline[1.0])) == (-5.0, 3.0)


def test_legend_outside_and_note_draw(tmp_path, panel):
    fig, ax = panel
    ax.plot([0, 1], [0, 1], label="first")
    ax.plot([0, 1], [1, 0], label="second")
    plotting.legend_outside(fig, ax)
    plotting.note(ax, "slope -0.50 +- 0.01", loc="lower right")
    plotting.note(ax, "top left")
    (legend,) = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["first", "second"]
    low, top = ax.texts[-2], ax.texts[-1]
    assert low.get_text() == "slope -0.50 +- 0.01" and (low.get_ha(), low.get_va()) == ("right", "bottom")
    assert top.get_position() == (0.03, 0.97) and (top.get_ha(), top.get_va()) == ("left", "top")
    (png, _) = plotting.save(fig, tmp_path / "annotated")  # drawing the layout raises nothing
    assert png.stat().st_size > 1000


def test_importing_plotting_does_not_import_jax():
    code = "import sys, gradlab.plotting; print(sorted(m for m in sys.modules if m == 'jax' or m.startswith('jax.')))"
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"},
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    assert (
        "matplotlib"
        in subprocess.run(
            [sys.executable, "-c", "import sys, gradlab.plotting; print(*sys.modules)"],
            capture_output=True,
            text=True,
            timeout=120,
        ).stdout
    )  # the probe sees imports at all
