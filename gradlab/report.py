"""`gradlab report`: one self-contained HTML page of stored runs, readable offline.

For every run: its claim, its figures (inline PNG), its checks with pass/fail, the command and
config that reproduce it, its provenance (versions, device, XLA flags, time), and an explorer of
its results Dataset drawn with plotly.js, which the page carries inline (no CDN): pick a metric,
the x axis (step, layer or a sweep axis), the series (another axis), fix the other axes with
sliders, switch to log axes; diverged sweep points are marked. Reads stored results only.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import json
import os
from importlib import resources
from pathlib import Path

import numpy as np
import xarray as xr

from gradlab import api, experiments, results
from gradlab.errors import GradlabError, ResultsError

MAX_POINTS = 200  # steps per curve in the page at most (evenly spaced, ends kept) ...
MIN_POINTS = 25  # ... and at least, where a variable has many curves
MAX_VALUES = 40_000  # numbers per variable: its steps are thinned to fit, or it is left out (named)
RUN_VALUES = 250_000  # numbers per run in the page; variables past it are left out (named)
PROVENANCE = (
    "version_gradlab",
    "version_jax",
    "version_jaxlib",
    "version_optax",
    "python",
    "device_kind",
    "device_count",
    "process_count",
    "xla_flags",
    "deterministic_ops",
    "git_commit",
    "compile_seconds",
    "run_seconds",
    "static_groups",
    "command",
)


def plotly_js() -> str:
    """plotly.js as the plotly package ships it (the report's one dependency)."""
    try:
        from plotly.offline import get_plotlyjs
    except ImportError:
        raise GradlabError("gradlab report needs plotly: pip install 'gradlab-jax[report]'") from None
    return get_plotlyjs()


def find_runs(root: str | os.PathLike) -> list[Path]:
    """The newest run folder of each experiment under ROOT/runs, by experiment name."""
    newest: dict[str, Path] = {}
    for path in sorted(Path(root).glob(f"runs/*/{results.RESULTS_FILE}")):
        name = path.parent.name.rsplit("-", 1)[0]
        if name not in newest or path.stat().st_mtime > (newest[name] / results.RESULTS_FILE).stat().st_mtime:
            newest[name] = path.parent
    return [newest[name] for name in sorted(newest)]


def write(runs, output: str | os.PathLike = "report.html", *, every: bool = False, root=".") -> Path:
    """Write the report of `runs` (run folders), or with `every` of each experiment's newest run under root."""
    folders = [Path(r) for r in runs]
    if every:
        folders += [f for f in find_runs(root) if f not in folders]
    if not folders:
        where = f"under {Path(root) / 'runs'}" if every else "given"
        raise ResultsError(f"no runs {where}: name run folders, or --all with --root holding runs/")
    page = render([results.load(f) for f in folders], [f for f in folders])
    output = Path(output)
    if output.parent != Path(""):
        results.ensure_dir(output.parent)
    results.write_text(output, page)
    return output


def render(datasets: list[xr.Dataset], folders: list[Path] | None = None) -> str:
    """The whole page as one string."""
    folders = folders or [Path(".")] * len(datasets)
    sections, payload = [], []
    for i, (ds, folder) in enumerate(zip(datasets, folders)):
        sections.append(_section(i, ds, folder))
        payload.append(explorer_data(ds))
    css = resources.files("gradlab").joinpath("report_assets/report.css").read_text()
    js = resources.files("gradlab").joinpath("report_assets/explorer.js").read_text()
    toc = "".join(
        f'<li><a href="#run-{i}">{html.escape(ds.attrs["experiment"])}</a> {_verdict(ds)}</li>'
        for i, ds in enumerate(datasets)
    )
    data = json.dumps(payload, separators=(",", ":"), allow_nan=False).replace("</", "<\\/")
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>gradlab report</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<script>window.gradlabErrors=[];window.addEventListener("error",function(e){{window.gradlabErrors.push(String(e.message))}});</script>
<style>{css}</style></head>
<body><h1>gradlab report</h1>
<p class="meta">{len(datasets)} runs, written {_now()}. Every number below is read from the stored results.</p>
<ul class="toc">{toc}</ul>
{"".join(sections)}
<div id="report-status" data-explorers="{len(datasets)}" data-rendered="0" data-errors="0"></div>
<script>{plotly_js()}</script>
<script>const GRADLAB_RUNS={data};</script>
<script>{js}</script>
</body></html>
"""


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _verdict(ds: xr.Dataset) -> str:
    found = api.checks(ds)
    failed = sum(not c.passed for c in found)
    if not found:
        return '<span class="muted">no checks</span>'
    return f'<span class="fail">{failed} of {len(found)} failed</span>' if failed else '<span class="pass">pass</span>'


def _section(i: int, ds: xr.Dataset, folder: Path) -> str:
    name = ds.attrs["experiment"]
    module = experiments.get(name)
    esc = html.escape
    rows = "".join(
        f"<tr><td>{esc(c.name)}</td><td>{c.measured:.4g}</td><td>{esc(c.expected)}</td>"
        f'<td class="{"pass" if c.passed else "fail"}">{"pass" if c.passed else "FAIL"}</td></tr>'
        for c in api.checks(ds)
    )
    figures = "".join(
        f'<figure><img alt="{esc(name)} {esc(suffix or "main")} figure" src="data:image/png;base64,{png}"></figure>'
        for suffix, png in _figures_png(ds).items()
    )
    config_yaml = _config_yaml(ds, folder)
    written = _written(folder)
    prov = "".join(
        f"<tr><th>{esc(key.removeprefix('version_'))}</th><td>{esc(str(ds.attrs.get(key, '')))}</td></tr>"
        for key in PROVENANCE
    )
    return f"""<section id="run-{i}"><h2>{esc(name)} <span class="muted">({esc(str(ds.attrs.get("scale", "")))},
 {esc(str(ds.attrs.get("config_hash", "")))})</span></h2>
<p class="claim">{esc(module.CLAIM)}</p>
<div class="figures">{figures}</div>
<h3>Checks</h3><table class="checks"><tr><th>check</th><th>measured</th><th>expected</th><th>result</th></tr>
{rows}</table>
<h3>Explore the results</h3><div class="explorer" data-run="{i}"></div>
<details><summary>Reproduce</summary>
<p>Save the config below as <code>{esc(name)}.yaml</code> and run:</p>
<pre>gradlab run {esc(name)}.yaml</pre>
<p>or, unchanged from its preset: <code>gradlab run {esc(name)} --scale {esc(str(ds.attrs.get("scale", "")))}</code></p>
<pre>{esc(config_yaml)}</pre></details>
<details><summary>Provenance</summary><table class="prov">
<tr><th>results written</th><td>{esc(written)}</td></tr><tr><th>run folder</th><td>{esc(str(folder))}</td></tr>
{prov}</table></details>
</section>
"""


def _figures_png(ds: xr.Dataset) -> dict[str, str]:
    drawn = api.figures(ds)
    found = {}
    for suffix, fig in drawn.items():
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=110)
        found[suffix] = base64.b64encode(buffer.getvalue()).decode("ascii")
    return found


def _config_yaml(ds: xr.Dataset, folder: Path) -> str:
    stored = folder / "config.yaml"
    if stored.is_file():
        return stored.read_text()
    import yaml

    return yaml.safe_dump({"experiment": ds.attrs["experiment"], **results.run_config(ds)}, sort_keys=False)


def _written(folder: Path) -> str:
    path = folder / results.RESULTS_FILE
    if not path.exists():
        return "unknown"
    stamp = datetime.datetime.fromtimestamp(path.stat().st_mtime, datetime.UTC)
    return stamp.strftime("%Y-%m-%d %H:%M:%S UTC")


def _thin(n: int, points: int) -> np.ndarray:
    """Indices of at most `points` evenly spaced points of an axis of length n, ends included."""
    if n <= points:
        return np.arange(n)
    return np.unique(np.linspace(0, n - 1, points).round().astype(int))


def _numbers(values: np.ndarray) -> str:
    """A flat JSON array of 4-significant-digit numbers; NaN and infinities as null."""
    flat = np.asarray(values, float).ravel()
    text = np.char.mod("%.4g", flat).astype(object)
    text[~np.isfinite(flat)] = "null"
    return "[" + ",".join(text) + "]"


def _coord(values: np.ndarray) -> list:
    values = np.asarray(values)
    if values.dtype.kind in "fc":
        return [float(f"{v:.6g}") for v in np.real(values)]
    if values.dtype.kind in "iub":
        return values.tolist()
    return [str(v) for v in values]


def explorer_data(ds: xr.Dataset) -> dict:
    """What the explorer needs of a Dataset: numeric variables over the sweep axes, their steps
    thinned to fit the page (each variable carries the steps it kept), their coordinates and which
    sweep points diverged. A variable past the page's budget is left out and named."""
    sweep_axes = [str(a) for a in ds["diverged"].dims]
    variables, left_out, total = {}, [], 0
    names = sorted(ds.data_vars, key=lambda n: (n not in ("loss", "train_loss"), str(n)))
    for name in names:
        var, name = ds[name], str(name)
        if name.startswith("ref.") or var.dtype.kind not in "fiub" or name == "diverged" or not var.dims:
            continue
        entry: dict = {"dims": [str(d) for d in var.dims]}
        if "step" in var.dims:
            others = max(1, var.size // ds.sizes["step"])
            keep = _thin(ds.sizes["step"], max(MIN_POINTS, min(MAX_POINTS, MAX_VALUES // others)))
            var = var.isel(step=keep)
            entry["step"] = ds["step"].values[keep].tolist()
        if var.size > MAX_VALUES or total + var.size > RUN_VALUES:
            left_out.append(name)
            continue
        total += var.size
        entry["shape"] = list(var.shape)
        entry["data"] = json.loads(_numbers(var.values))
        variables[name] = entry
    used = {d for v in variables.values() for d in v["dims"]} | set(sweep_axes)
    coords = {d: _coord(ds[d].values) if d in ds.coords else list(range(ds.sizes[d])) for d in sorted(used)}
    return {
        "experiment": ds.attrs["experiment"],
        "variables": variables,
        "coords": coords,
        "sweep_axes": sweep_axes,
        "diverged": {"dims": sweep_axes, "data": ds["diverged"].values.astype(int).ravel().tolist()},
        "left_out": left_out,
    }
