"""`gradlab report`: the page in a real browser (headless Chromium) draws every plot and logs no
JavaScript error, shows what the stored results hold, and is readable offline."""

import json
import re
import shutil
import subprocess

import matplotlib.image
import numpy as np
import pytest

from gradlab import api, report
from gradlab.cli import main

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    outcome = api.execute("quadratic", scale="tiny", out=out, progress=False, draw=False)
    path = report.write([outcome.run_dir], out / "report.html")
    return outcome, path


def runs_in(html: str) -> list[dict]:
    start = html.index("const GRADLAB_RUNS=") + len("const GRADLAB_RUNS=")
    return json.loads(html[start : html.index(";</script>", start)])


def test_the_page_holds_the_runs_numbers_and_works_offline(page):
    outcome, path = page
    html = path.read_text()
    assert not re.search(r"<script[^>]+src=|<link[^>]+href=\"http", html)  # nothing fetched: no CDN
    assert "Plotly" in html and outcome.dataset.attrs["experiment"] in html
    for c in outcome.checks:  # every check, its result as the table prints it
        assert c.name.replace("<", "&lt;").replace(">", "&gt;") in html
    assert html.count("<figure><img") == len(api.figures(outcome.dataset))
    (run,) = runs_in(html)
    ds = outcome.dataset
    loss = run["variables"]["loss"]
    assert loss["dims"] == [str(d) for d in ds["loss"].dims]
    kept = loss["step"]
    expected = ds["loss"].isel(step=kept).values
    got = np.array([np.nan if v is None else v for v in loss["data"]], float).reshape(loss["shape"])
    finite = np.isfinite(expected)
    np.testing.assert_array_equal(np.isfinite(got), finite)  # NaN and inf as null
    np.testing.assert_allclose(got[finite], expected[finite], rtol=1e-3)  # 4 significant digits
    assert sum(run["diverged"]["data"]) == int(ds["diverged"].sum()) > 0
    assert ds.attrs["version_jax"] in html and ds.attrs["device_kind"] in html


def test_thinning_keeps_the_ends_and_at_most_the_budget():
    kept = report._thin(1001, 200)
    assert kept[0] == 0 and kept[-1] == 1000 and len(kept) <= 200
    np.testing.assert_array_equal(report._thin(50, 200), np.arange(50))


def test_cli_report_all_finds_the_newest_run_and_refuses_an_empty_folder(page, tmp_path, capsys):
    outcome, _ = page
    root = outcome.run_dir.parent.parent
    assert main(["report", "--all", "--root", str(root), "-o", str(tmp_path / "r.html")]) == 0
    assert (tmp_path / "r.html").stat().st_size > 1_000_000  # plotly.js inline
    assert main(["report", "--all", "--root", str(tmp_path), "-o", str(tmp_path / "none.html")]) == 2
    assert "no runs under" in capsys.readouterr().err


def chromium(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    if CHROMIUM is None:
        print("chromium not found on PATH (Debian: apt-get install -y chromium): the browser test is skipped")
        pytest.skip("chromium not found on PATH (Debian: apt-get install -y chromium)")
    return subprocess.run([CHROMIUM, *FLAGS, *args], capture_output=True, text=True, timeout=timeout)


def test_chromium_draws_every_plot_without_a_javascript_error(page):
    _, path = page
    done = chromium("--virtual-time-budget=20000", "--enable-logging=stderr", "--dump-dom", path.as_uri())
    dom = done.stdout
    status = re.search(r'id="report-status"[^>]*data-rendered="(\d+)"[^>]*data-errors="(\d+)"[^>]*>([^<]*)', dom)
    assert status, dom[-2000:]
    rendered, errors, messages = int(status[1]), int(status[2]), status[3]
    assert (rendered, errors) == (1, 0), messages
    assert dom.count('class="main-svg"') >= 1  # plotly drew its SVG
    assert re.search(r'class="scatterlayer[^"]*"><g class="trace scatter', dom)  # with traces in it
    console_errors = [line for line in done.stderr.splitlines() if "CONSOLE" in line and "Uncaught" in line]
    assert not console_errors, console_errors


def test_screenshot_is_not_blank(page, tmp_path):
    _, path = page
    shot = tmp_path / "shot.png"
    chromium("--virtual-time-budget=20000", "--window-size=1200,1800", f"--screenshot={shot}", path.as_uri())
    pixels = matplotlib.image.imread(shot)[..., :3]
    assert pixels.shape[:2] == (1800, 1200)
    assert pixels.std() > 0.05  # a blank (all white) page would be 0
    dark = (pixels.mean(axis=-1) < 0.5).mean()
    assert 0.005 < dark < 0.5  # text and lines, not an error screen or an empty page
