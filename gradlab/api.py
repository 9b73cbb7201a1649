"""The Python API: what `gradlab run` does, as plain calls that return data."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import xarray as xr

from gradlab import config, engine, experiments, plotting, results
from gradlab.errors import GradlabError
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
    if fresh and writer:  # the old results stay until the new ones replace them, so a failed run loses nothing
        results.clear_checkpoints(run)
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
    if not cached:
        ckpt = run / "ckpt"
        if writer:
            results.ensure_dir(run)
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
        )
        reference = module.reference(spec.config) if hasattr(module, "reference") else None
        ds = results.build_dataset(sweep, spec.to_dict(), spec.hash, reference=reference)
        if writer:
            results.save(ds, results_path)
            results.clear_checkpoints(run)
    measured, found = experiments.evaluate(module, ds)
    figures = []
    if draw and writer:
        figures = save_figures(experiment, ds, Path(out) / "figures", measured)
    return Outcome(ds, run, found, figures, cached, measured)


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
    return "\n".join(lines)


def run(
    experiment: str, scale: str | None = None, *, overrides=(), out=".", fresh=False, progress=True, **kwargs
) -> xr.Dataset:
    """Run an experiment and return its labelled results; draws nothing.

    Keyword arguments are overrides, `__` standing for a dot:
    `gradlab.run("gradient_flow", seeds=8, model__depth=32)`.
    """
    items = list(overrides) + [(key.replace("__", "."), value) for key, value in kwargs.items()]
    return execute(experiment, items, scale, out=out, fresh=fresh, progress=progress, draw=False).dataset


def load(run_dir) -> xr.Dataset:
    """The stored results of a run folder."""
    return results.load(run_dir)


def figures(ds: xr.Dataset, measured=None) -> dict:
    """Every figure of a result set, by suffix ("" is the main one)."""
    module = experiments.get(ds.attrs["experiment"])
    if measured is None:
        measured, _ = experiments.evaluate(module, ds)
    return experiments.draw(module, ds, measured)


def plot(ds: xr.Dataset):
    """The main figure of a result set, as a matplotlib Figure."""
    return figures(ds)[""]


def save_figures(experiment: str, ds: xr.Dataset, folder: Path, measured=None) -> list[Path]:
    folder = results.ensure_dir(Path(folder))
    paths = []
    for suffix, fig in figures(ds, measured).items():
        stem = folder / (f"{experiment}_{suffix}" if suffix else experiment)
        paths += plotting.save(fig, stem)
    return paths


def measure(ds: xr.Dataset):
    """The experiment's measured numbers (its `Measured`) from a result set."""
    return experiments.evaluate(experiments.get(ds.attrs["experiment"]), ds)[0]


def checks(ds: xr.Dataset) -> list[Check]:
    """The experiment's checks on a result set."""
    return experiments.evaluate(experiments.get(ds.attrs["experiment"]), ds)[1]


@dataclass
class Reproduced:
    """One experiment of `reproduce`: its checks (or the error that stopped it) and its time."""

    experiment: str
    claim: str
    checks: list[Check]
    seconds: float
    cached: bool
    error: str = ""

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
    running one checkpoints after every chunk.
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
            row = Reproduced(name, module.CLAIM, outcome.checks, time.perf_counter() - start, outcome.cached)
        except GradlabError as e:
            row = Reproduced(name, module.CLAIM, [], time.perf_counter() - start, False, error=str(e))
        done.append(row)
        if on_done is not None:
            on_done(i, len(names), row)
    return done
