"""The Python API: what `gradlab run` does, as plain calls that return data."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr

from gradlab import config, engine, experiments, plotting, results
from gradlab.errors import ArgumentError, FigureError, GradlabError, ResultsError
from gradlab.experiments import Check


@dataclass
class Outcome:
    """A finished (or cached) run: its data, where it lives, its checks and figures."""

    dataset: xr.Dataset
    run_dir: Path
    checks: list[Check]
    figures: list[Path]
    cached: bool
    measured: Any = None  # the experiment's measure(ds): every number its checks and figures read


def target(experiment: str, config_file=None) -> tuple[str, str | os.PathLike | None]:
    """(experiment name, user config file) for what a command names: an experiment, or a config
    file that names one in its `experiment:` key (then `config_file` must not be given too)."""
    path = Path(experiment)
    if experiment in experiments.names() or not (path.suffix in (".yaml", ".yml") or path.is_file()):
        return experiment, config_file
    if config_file is not None:
        raise GradlabError(f"{experiment}: give one config file, not also --config {config_file}")
    return config.experiment_of(path), path


def resolve(experiment: str, overrides=(), scale: str | None = None, config_file=None) -> config.RunSpec:
    """The resolved config of an experiment or a config file (what `gradlab show` prints)."""
    name, config_file = target(experiment, config_file)
    module = experiments.get(name)
    return config.load(name, module.Config, list(overrides), scale, config_file)


def execute(
    experiment: str,
    overrides=(),
    scale: str | None = None,
    *,
    out: str | os.PathLike = ".",
    fresh: bool = False,
    progress: bool = True,
    draw: bool = True,
    config_file=None,
    devices=None,
    stop=None,
    memory: int | None = None,
    on_note=None,
) -> Outcome:
    """Run (or reuse) an experiment, store its results, draw its figures, evaluate its checks.

    With several processes (jax.distributed) every process runs the sweep and only process 0
    writes: the run folder, the results file and the figures.
    """
    import jax

    from gradlab import runtime

    runtime.setup()  # XLA flags and host devices unless jax's backend has started; compilation cache
    spec = resolve(experiment, overrides, scale, config_file)
    experiment, module = spec.experiment, experiments.get(spec.experiment)
    run = results.run_dir(out, experiment, spec.hash)
    results_path = run / results.RESULTS_FILE
    writer = jax.process_index() == 0
    cached = results_path.exists() and not fresh
    if cached:
        try:
            ds = results.load(run)
        except results.OtherFormatError as e:  # older results cannot be read: make them again
            cached = False
            if on_note is not None and writer:
                on_note(f"{e}; running it again")
        else:
            note = results.version_note(ds)
            if note and on_note is not None and writer:
                on_note(note)
    with contextlib.ExitStack() as held:
        if not cached and writer:  # one writer per run folder (an OS lock, released however the process ends)
            held.enter_context(results.RunLock(results.ensure_dir(run)))
            if fresh:  # the old results stay until the new ones replace them, so a failed run loses nothing
                results.clear_checkpoints(run)
        if writer:
            results.remove_orphaned_checkpoints(out)
        if not cached:
            ds = _run_and_store(spec, module, run, writer, progress, devices, stop, memory, on_note)
    measured, found = _evaluate(module, ds, str(results_path))
    figures = []
    if draw and writer:
        try:
            figures = save_figures(experiment, ds, Path(out) / "figures", measured)
        except FigureError as e:  # a narrowed sweep: the results and checks stand without a figure
            if on_note is not None:
                on_note(f"no figure: {e}")
    return Outcome(ds, run, found, figures, cached, measured)


def _run_and_store(spec, module, run: Path, writer: bool, progress, devices, stop, memory, on_note) -> xr.Dataset:
    """Run a sweep (resuming from its checkpoints), store its results, clear its checkpoints."""
    ckpt = run / "ckpt"
    if writer:
        results.ensure_dir(ckpt)
        results.remove_stale_temporaries(run)
        results.write_text(run / "config.yaml", config.runnable_yaml(spec))
    sweep = engine.run_sweep(
        module.trial,
        config.plan(spec),
        checkpoint_dir=ckpt,
        progress=progress and writer,
        devices=devices,
        stop=stop,
        memory=memory,
        on_note=on_note if writer else None,
        tag=spec.hash,
    )
    reference = module.reference(spec.config) if hasattr(module, "reference") else None
    ds = results.build_dataset(sweep, spec.to_dict(), spec.hash, reference=reference)
    if writer:
        results.save(ds, run / results.RESULTS_FILE)
        results.clear_checkpoints(run)
    return ds


def dry_run(
    experiment: str,
    overrides=(),
    scale: str | None = None,
    *,
    config_file=None,
    devices=None,
    memory: int | None = None,
) -> str:
    """Compile every static group without running a step; a table of the sweep's cost."""
    import jax

    spec = resolve(experiment, overrides, scale, config_file)
    experiment, module = spec.experiment, experiments.get(spec.experiment)
    plan = config.plan(spec)
    devices = list(devices) if devices is not None else jax.devices()
    steps, chunk = spec.config.steps, min(spec.config.chunk_steps, spec.config.steps)
    chunks = -(-steps // chunk)
    lines = [
        f"{experiment} (hash {spec.hash}): {plan.points} points in {len(plan.groups)} static groups "
        f"(one compile each), {steps} steps in chunks of {chunk}, on {len(devices)} x {devices[0].device_kind}"
    ]
    for axis in plan.static_axes + plan.traced_axes:
        lines.append(
            f"  axis {axis.path} ({'compiled per value' if axis.mode == 'static' else 'vmapped'}): "
            f"{len(axis.values)} values"
        )
    header = f"  {'group':<40} {'points':>6} {'per device':>10} {'GFLOP':>10} {'memory/device':>14} {'compile s':>9}"
    lines.append(header)
    for group in plan.groups:
        label = ", ".join(f"{a.path}={a.values[i]}" for a, i in zip(plan.static_axes, group.index)) or "(all)"
        compiled = engine.fit_group(module.trial(group.config), group.hp, steps, chunk, devices, memory)
        cost = compiled.chunk.cost_analysis() or {}
        cost = cost[0] if isinstance(cost, list) else cost
        flops = float(cost.get("flops", 0.0)) * chunks * compiled.batches
        width = -(-group.points // len(devices))
        lines.append(
            f"  {label[:40]:<40} {group.points:>6} {width:>10} {flops / 1e9:>10.2f} "
            f"{engine.group_bytes(compiled) / 2**20:>11.1f} MiB {compiled.compile_seconds:>9.1f}"
        )
        if compiled.batches > 1:
            lines.append(f"    {engine.split_note(compiled)}")
    if hasattr(module, "cost"):  # an experiment's own cost beyond the table (e.g. HVPs per measurement)
        lines.append(f"  {module.cost(spec.config)}")
    return "\n".join(lines)


def run(
    experiment: str, scale: str | None = None, *, overrides=(), out=".", fresh=False, progress=True, **kwargs
) -> xr.Dataset:
    """Run an experiment and return its labelled results; draws nothing.

    Keyword arguments are overrides, `__` standing for a dot:
    `gradlab.run("gradient_flow", seeds=8, model__depth=32)`.
    """
    if not isinstance(experiment, (str, os.PathLike)):
        raise ArgumentError(f"gradlab.run: experiment must be a name or a config file path, got {experiment!r}")
    if isinstance(overrides, (str, bytes)) or not all(isinstance(o, (str, tuple, list)) for o in overrides):
        raise ArgumentError(
            f"gradlab.run: overrides must be a list of 'key=value' strings or (key, value) pairs, got {overrides!r} "
            "(a single one goes in a list: overrides=['steps=5'], or as a keyword: steps=5)"
        )
    if scale is not None and not isinstance(scale, str):
        raise ArgumentError(f"gradlab.run: scale must be a preset name such as 'quick', got {scale!r}")
    items = [config.parse_override(o) if isinstance(o, str) else tuple(o) for o in overrides]
    items += [(key.replace("__", "."), value) for key, value in kwargs.items()]
    return execute(experiment, items, scale, out=out, fresh=fresh, progress=progress, draw=False).dataset


def load(run_dir) -> xr.Dataset:
    """The stored results of a run folder (or results file), checked against its experiment."""
    if not isinstance(run_dir, (str, os.PathLike)):
        raise ArgumentError(f"gradlab.load: run_dir must be a run folder or results file path, got {run_dir!r}")
    ds = results.load(run_dir)
    path = Path(run_dir)
    folder = (path if path.is_dir() else path.parent).name
    named, names = folder.rsplit("-", 1)[0], experiments.names()
    if named in names and ds.attrs.get("experiment") in names and named != ds.attrs["experiment"]:
        raise ResultsError(f"{path}: the file is for {ds.attrs['experiment']!r} but its run folder is {named!r}")
    _module_of(ds, str(path))
    return ds


def _module_of(ds, where: str = "the results"):
    """The experiment module of a result set, after checking the set names one and holds its axes."""
    if not isinstance(ds, xr.Dataset):
        raise ArgumentError(f"expected a run's Dataset (from gradlab.load(path) or gradlab.run), got {ds!r:.80}")
    name = ds.attrs.get("experiment")
    if not isinstance(name, str) or name not in experiments.names():
        raise ResultsError(f"{where}: names no known experiment (experiment attribute: {name!r})")
    module = experiments.get(name)
    try:
        cfg = results.run_config(ds)
    except (KeyError, TypeError, ValueError):
        raise ResultsError(f"{where}: its config attribute is missing or unreadable") from None
    missing = [a for a in module.AXES if a not in ds.dims and not _has_key(cfg, a)]
    missing += [v for v in ("diverged", "first_bad_step") if v not in ds.data_vars]
    if missing:
        raise ResultsError(f"{where}: these {name} results lack {', '.join(missing)}")
    return module


def _has_key(cfg, dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(cfg, dict) or part not in cfg:
            return False
        cfg = cfg[part]
    return True


def _evaluate(module, ds, where: str = "the results"):
    """experiments.evaluate, with a KeyError (a variable or axis value the results lack) as one line."""
    try:
        return experiments.evaluate(module, ds)
    except KeyError as e:
        raise ResultsError(f"{where}: {module.NAME} cannot read these results ({_missing(e)})") from None


def _missing(e: KeyError) -> str:
    """A KeyError's first sentence: what was missing (xarray's messages go on to suggest options)."""
    text = str(e.args[0] if e.args else e).split(". ")[0]
    return text[1:-1] if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"" else text


def figures(ds: xr.Dataset, measured=None, style: str = "screen") -> dict:
    """Every figure of a result set, by suffix ("" is the main one); `style` is `screen` or `paper`
    (one or two journal columns wide, 8 pt)."""
    module = _module_of(ds)
    if measured is None:
        measured, _ = _evaluate(module, ds)
    try:
        return experiments.draw(module, ds, measured, style)
    except KeyError as e:
        why = _missing(e)
        raise FigureError(f"{module.NAME}: its figure cannot be drawn from this narrowed sweep ({why})") from None


def plot(ds: xr.Dataset, style: str = "screen"):
    """The main figure of a result set, as a matplotlib Figure."""
    return figures(ds, style=style)[""]


def save_figures(experiment: str, ds: xr.Dataset, folder: Path, measured=None, style: str = "screen") -> list[Path]:
    folder = results.ensure_dir(Path(folder))
    paths = []
    for suffix, fig in figures(ds, measured, style).items():
        stem = folder / (f"{experiment}_{suffix}" if suffix else experiment)
        paths += plotting.save(fig, stem)
    return paths


def measure(ds: xr.Dataset):
    """The experiment's measured numbers (its `Measured`) from a result set."""
    return _evaluate(_module_of(ds), ds)[0]


def checks(ds: xr.Dataset) -> list[Check]:
    """The experiment's checks on a result set."""
    return _evaluate(_module_of(ds), ds)[1]


@dataclass
class Reproduced:
    """One experiment of `reproduce`: its checks (or the error that stopped it) and its time."""

    experiment: str
    claim: str
    checks: list[Check]
    seconds: float
    cached: bool
    error: str = ""
    run_dir: Path | None = None  # where its results are stored (None when it failed)

    @property
    def passed(self) -> bool:
        return not self.error and all(c.passed for c in self.checks)


def reproduce(
    scale: str | None = None,
    only=None,
    *,
    out: str | os.PathLike = ".",
    progress: bool = True,
    stop=None,
    on_start: Callable[[int, int, str], None] | None = None,
    on_done: Callable[[int, int, Reproduced], None] | None = None,
    memory: int | None = None,
) -> list[Reproduced]:
    """Run every experiment of the catalog (or `only` those: names or config files), reusing stored results of the same
    config hash, redraw every figure into OUT/figures and evaluate every check.

    An experiment that fails with a gradlab error is reported as failed and the others go on; an
    interrupted reproduce resumes where it stopped, since finished experiments are stored and the
    running one checkpoints after every chunk. OUT/figures/report.html shows them all (`gradlab report`).
    """
    from gradlab import runtime

    runtime.setup()
    names = list(dict.fromkeys(only)) if only else experiments.names()
    for name in names:
        resolve(name, (), scale)  # an unknown name or preset fails before anything runs
    done = []
    for i, name in enumerate(names):
        if on_start is not None:
            on_start(i, len(names), name)
        start = time.perf_counter()
        module = experiments.get(target(name)[0])
        try:
            outcome = execute(name, (), scale, out=out, progress=progress, stop=stop, memory=memory)
            row = Reproduced(
                name, module.CLAIM, outcome.checks, time.perf_counter() - start, outcome.cached, run_dir=outcome.run_dir
            )
        except GradlabError as e:
            row = Reproduced(name, module.CLAIM, [], time.perf_counter() - start, False, error=str(e))
        done.append(row)
        if on_done is not None:
            on_done(i, len(names), row)
    stored = [row.run_dir for row in done if row.run_dir is not None]
    if stored and jax_writer():
        from gradlab import report

        report.write(stored, Path(out) / "figures" / "report.html")
    return done


def jax_writer() -> bool:
    """Whether this process writes (process 0 of a jax.distributed cluster, or the only one)."""
    import jax

    return jax.process_index() == 0
