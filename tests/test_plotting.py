"""The figure style: atomic png/pdf, the min..max band, the legend and notes; no jax behind it."""

import os
import shutil
import subprocess
import sys

import matplotlib
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


def pdf_fonts(pdf: bytes) -> set[str]:
    """The /Subtype of every font dictionary of a PDF (matplotlib writes them uncompressed)."""
    import re

    return set(
        re.findall(rb"/Type\s*/Font\b[^>]*?/Subtype\s*/(\w+)", pdf)
        + re.findall(rb"/Subtype\s*/(\w+)\s*/Type\s*/Font\b", pdf)
    )


@pytest.mark.parametrize("name", plotting.STYLES)
def test_pdf_embeds_truetype_fonts_not_type3(tmp_path, name):
    with plotting.style(name):
        fig, axes = plotting.figure(1, 2)
        axes[0, 0].plot([1, 2, 3], [3, 1, 2], label="a line")
        axes[0, 0].set(xlabel="step", ylabel=r"loss $\|w\|^2$", title="title")
        plotting.finish(fig)
    (_, pdf) = plotting.save(fig, tmp_path / "fonts")
    subtypes = pdf_fonts(pdf.read_bytes())
    assert subtypes and b"Type3" not in subtypes, subtypes
    assert subtypes & {b"TrueType", b"Type0", b"CIDFontType2"}, subtypes
    if shutil.which("pdffonts"):  # poppler's own reading of the same file
        table = subprocess.run(["pdffonts", str(pdf)], capture_output=True, text=True, timeout=60).stdout
        rows = table.splitlines()[2:]
        assert rows and not any("Type 3" in row for row in rows), table


def test_the_default_matplotlib_pdf_would_have_type3_fonts(tmp_path):
    """The probe above can fail: matplotlib's own default (fonttype 3) is caught by it."""
    import matplotlib

    with matplotlib.rc_context({"pdf.fonttype": 3}):
        fig = matplotlib.figure.Figure()
        fig.add_subplot().set_title("title")
        fig.savefig(tmp_path / "t3.pdf")
    assert b"Type3" in pdf_fonts((tmp_path / "t3.pdf").read_bytes())


def test_a_styled_figure_saves_truetype_outside_the_style_too(tmp_path):
    with plotting.style("paper"):
        fig, axes = plotting.figure(1, 1)
        axes[0, 0].set_title("saved later by a user")
    fig.savefig(tmp_path / "later.pdf")  # outside the context: the figure keeps its style
    assert b"Type3" not in pdf_fonts((tmp_path / "later.pdf").read_bytes())


def test_paper_sizes_are_journal_columns_and_fonts_eight_points():
    with plotting.style("paper"):
        one, _ = plotting.figure(2, 1, width=3.4, height=2.7)
        two, axes = plotting.figure(1, 3, width=3.8, height=3.0)
        label = axes[0, 0].set_xlabel("x")
    np.testing.assert_allclose(one.get_size_inches(), [3.3, 3.3 / 3.4 * 5.4])
    np.testing.assert_allclose(two.get_size_inches(), [7.0, max(7.0 / 11.4 * 3.0, plotting.PAPER_MIN_ROW)])
    assert label.get_fontsize() == 8
    with plotting.style("screen"):
        fig, axes = plotting.figure(1, 3, width=3.8, height=3.0)
    np.testing.assert_allclose(fig.get_size_inches(), [11.4, 3.0])
    with pytest.raises(ValueError, match="unknown figure style 'poster'"):
        plotting.rc("poster")


def test_paper_floors_small_text():
    with plotting.style("paper"):
        fig, axes = plotting.figure(1, 2)
        text = axes[0, 0].text(0, 0, "tiny", fontsize=5)
        plotting.finish(fig)
    assert text.get_fontsize() == plotting.PAPER_MIN_FONT


def test_palette_colours_are_paired_with_markers_and_no_two_alike():
    assert len(set(plotting.COLORS)) == len(set(plotting.MARKERS)) == len(plotting.COLORS)
    with plotting.style("screen"):
        fig, axes = plotting.figure(1, 1)
        ax = axes[0, 0]
        x = np.arange(50.0)
        lines = [ax.plot(x, x * k, label=f"series {k}")[0] for k in range(len(plotting.COLORS))]
        ref = ax.plot(x, x, color=plotting.COLORS[1], ls="--", label="a fit")[0]
        grey = ax.plot(x, x, color="0.5")[0]
        ax.legend()
        plotting.finish(fig)
    for i, line in enumerate(lines):  # the cycle's i-th colour (no colour given) carries marker i
        assert matplotlib.colors.to_hex(line.get_color()) == plotting.COLORS[i]
        assert line.get_marker() == plotting.MARKERS[i]
    assert ref.get_marker() in ("None", None) and grey.get_marker() in ("None", None)  # dashed fits, greys: as drawn
    handles = ax.get_legend().legend_handles
    assert [h.get_marker() for h in handles[: len(lines)]] == plotting.MARKERS
    # colour, marker and dash of series(i): distinct on each cue alone
    styles = [plotting.series(i) for i in range(8)]
    for key in ("color", "marker", "linestyle"):
        assert len({str(s[key]) for s in styles}) == 8, key


def test_dense_meshes_are_rasterised_in_vector_output(tmp_path):
    with plotting.style("screen"):
        fig, axes = plotting.figure(1, 1)
        z = np.random.default_rng(0).standard_normal((200, 200))
        mesh = axes[0, 0].pcolormesh(z)
        plotting.finish(fig)
    assert mesh.get_rasterized()
    (_, pdf) = plotting.save(fig, tmp_path / "mesh")
    assert pdf.stat().st_size < 300_000  # 40,000 vector quads would be megabytes
    assert b"/Subtype /Image" in pdf.read_bytes()


def test_importing_gradlab_leaves_the_backend_and_rcparams_alone():
    code = (
        "import matplotlib; matplotlib.use('svg'); before = dict(matplotlib.rcParams);"
        "import gradlab, gradlab.plotting, gradlab.api, gradlab.report;"
        "after = dict(matplotlib.rcParams); changed = [k for k in before if str(before[k]) != str(after[k])];"
        "print(matplotlib.get_backend(), changed)"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "MPLBACKEND")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["svg", "[]"]


def test_a_user_backend_still_draws_and_gradlab_figures_save_without_pyplot(tmp_path):
    """gradlab's figures are pyplot-free: drawing one registers nothing with the user's pyplot."""
    before = plt.get_fignums()
    with plotting.style("screen"):
        fig, axes = plotting.figure(1, 1)
        axes[0, 0].plot([0, 1], [0, 1])
    assert plt.get_fignums() == before
    plotting.save(fig, tmp_path / "free")
    assert (tmp_path / "free.png").stat().st_size > 1000
