"""`gradlab` on the command line: parses, dispatches, prints. Holds no math.

Every error a user can cause is one line on stderr and exit code 2; Ctrl-C exits 130.
"""

from __future__ import annotations

import sys
import time

from gradlab import runtime
from gradlab.cli_parser import UsageError, build_parser, overrides_first

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM
CLAIM_WIDTH = 60  # `gradlab list` prints the claims in full


def _memory(args) -> int | None:
    if args.max_memory is None:
        return None
    if not args.max_memory > 0 or args.max_memory == float("inf"):
        raise UsageError(f"gradlab: error: --max-memory must be a positive number of GiB, got {args.max_memory}")
    return int(args.max_memory * 2**30)


def _distributed(args) -> None:
    """Join a jax.distributed cluster when --coordinator is given (before jax touches a device)."""
    runtime.distributed(args.coordinator, args.num_processes, args.process_id)


def _table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])


def check_table(checks) -> str:
    rows = [[c.name, f"{c.measured:.4g}", c.expected, c.result] for c in checks]
    return _table(rows, ["check", "measured", "expected", "result"])


def _dry_run(args, memory: int | None) -> int:
    from gradlab import api

    report = api.dry_run(args.experiment, args.overrides, args.scale, config_file=args.config_file, memory=memory)
    print(report)
    return 0


def _stop_on_ctrl_c():
    """Ctrl-C asks the sweep to stop after its next checkpoint; a second Ctrl-C stops at once."""
    import signal

    asked = []

    def handler(signum, frame):
        if asked:
            raise KeyboardInterrupt
        asked.append(signum)

    def terminate(signum, frame):
        from gradlab.errors import Terminated

        raise Terminated

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, terminate)  # checkpoints are written atomically: stopping anywhere is safe
    return lambda: bool(asked)


def _run(args) -> int:
    memory = _memory(args)
    runtime.setup(args.devices, cache=not args.dry_run)  # a dry run measures compiles: no cache
    _distributed(args)
    if args.dry_run:
        return _dry_run(args, memory)
    import jax

    from gradlab import api

    start = time.perf_counter()
    outcome = api.execute(
        args.experiment,
        args.overrides,
        args.scale,
        out=args.out,
        fresh=args.fresh,
        progress=not args.quiet,
        draw=not args.no_figure,
        config_file=args.config_file,
        stop=_stop_on_ctrl_c(),
        memory=memory,
        on_note=lambda note: print(f"note: {note}", flush=True),
    )
    if jax.process_index() != 0:
        print(
            f"process {jax.process_index()} of {jax.process_count()}: done in {time.perf_counter() - start:.1f} s; "
            "process 0 writes the results"
        )
        return 0
    ds = outcome.dataset
    print(
        f"{outcome.dataset.attrs['experiment']}: {'reused stored results' if outcome.cached else 'ran'}"
        f" in {time.perf_counter() - start:.1f} s"
        f" ({ds.attrs['static_groups']} compiled groups, compile {ds.attrs['compile_seconds']:.1f} s,"
        f" run {ds.attrs['run_seconds']:.1f} s on {ds.attrs['device_count']} x {ds.attrs['device_kind']})"
    )
    diverged = int(ds["diverged"].sum())
    if diverged:
        print(f"diverged points: {diverged} of {ds['diverged'].size} (marked in the results and figures)")
    if outcome.checks:
        print(check_table(outcome.checks))
    print(f"results: {outcome.run_dir / 'results.nc'}")
    for path in outcome.figures:
        print(f"figure:  {path}")
    failed = [c for c in outcome.checks if not c.passed]
    return 1 if (args.check and failed) else 0


def reproduce_table(rows) -> str:
    """One row per check; the experiment, its claim and its time on its first row."""
    table = []
    for r in rows:
        claim = r.claim if len(r.claim) <= CLAIM_WIDTH else r.claim[: CLAIM_WIDTH - 3] + "..."
        head = [r.experiment, claim, f"{r.seconds:.0f} s" + (" (stored)" if r.cached else "")]
        if r.error:
            table.append([head[0], head[1], "error: " + r.error, "", "", "FAIL", head[2]])
        for k, c in enumerate(r.checks):
            first = head if k == 0 else ["", "", ""]
            table.append([first[0], first[1], c.name, f"{c.measured:.4g}", c.expected, c.result, first[2]])
    return _table(table, ["experiment", "claim", "check", "measured", "expected", "result", "time"])


def _reproduce(args) -> int:
    memory = _memory(args)
    runtime.setup(args.devices)
    _distributed(args)
    from gradlab import api

    start = time.perf_counter()

    def started(i, n, name):
        print(f"[{i + 1}/{n}] {name} ...", flush=True)

    def finished(i, n, row):
        state = "error" if row.error else ("pass" if row.passed else "FAIL")
        how = "stored results" if row.cached else "ran"
        print(f"[{i + 1}/{n}] {row.experiment}: {state} ({how}, {row.seconds:.0f} s)", flush=True)

    rows = api.reproduce(
        args.scale,
        args.only,
        out=args.out,
        progress=not args.quiet,
        stop=_stop_on_ctrl_c(),
        on_start=started,
        on_done=finished,
        memory=memory,
    )
    print(reproduce_table(rows))
    failed = [r.experiment for r in rows if not r.passed]
    print(
        f"{len(rows) - len(failed)} of {len(rows)} experiments pass all checks in {time.perf_counter() - start:.0f} s"
        + (f"; failing: {', '.join(failed)}" if failed else "")
    )
    return 1 if (args.check and failed) else 0


def _completion(args) -> int:
    from gradlab import completion, config, experiments

    names = experiments.names()
    keys = [key for name in names for key in config.field_info(experiments.get(name).Config)]
    print(completion.script(build_parser(), args.shell, names, keys))
    return 0


def _list(args) -> int:
    from gradlab import experiments

    rows = [[name, experiments.get(name).CLAIM] for name in experiments.names()]
    print(_table(rows, ["experiment", "claim"]))
    return 0


def _show(args) -> int:
    from gradlab import api, config, experiments

    spec = api.resolve(args.experiment, args.overrides, args.scale, args.config_file)
    if not args.doc:
        print(config.runnable_yaml(spec), end="")
        return 0
    print(f"# {spec.experiment}: every key, its type and value here (a list is a sweep axis), how a sweep over it")
    print("# runs, what it means and what is allowed")
    for d in config.describe(experiments.get(spec.experiment).Config):
        print(f"{d.key} ({d.type}) = {_value(spec, d.key)}    [{d.sweep}]")
        print(f"    {d.meaning or '-'}" + (f"; allowed: {d.allowed}" if d.allowed else ""))
    return 0


def _value(spec, key: str):
    axis = spec.axis(key)
    if axis is not None:
        return (
            list(axis.values)
            if len(axis.values) <= 6
            else f"[{axis.values[0]} .. {axis.values[-1]}] ({len(axis.values)})"
        )
    from gradlab import config

    return config.get_path(spec.config, key)


def _plot(args) -> int:
    from pathlib import Path

    from gradlab import api

    ds = api.load(args.run_dir)
    for path in api.save_figures(ds.attrs["experiment"], ds, Path(args.out) / "figures", style=args.style):
        print(f"figure:  {path}")
    return 0


def _report(args) -> int:
    from gradlab import report

    path = report.write(args.runs, args.output, every=args.all, root=args.root)
    print(f"report:  {path}")
    return 0


def _one_line_warnings() -> None:
    """gradlab's own warnings print as one line, like its errors; others keep Python's format."""
    import warnings

    from gradlab.errors import LapackOnCpuWarning

    default = warnings.formatwarning

    def one_line(message, category, *rest, **kw):
        if issubclass(category, LapackOnCpuWarning):
            return f"gradlab: warning: {message}\n"
        return default(message, category, *rest, **kw)

    warnings.formatwarning = one_line


def main(argv: list[str] | None = None) -> int:
    from gradlab.errors import GradlabError, Terminated

    _one_line_warnings()
    try:
        parser = build_parser()
        args = parser.parse_args(overrides_first(list(sys.argv[1:] if argv is None else argv), parser))
        commands = {
            "run": _run,
            "reproduce": _reproduce,
            "list": _list,
            "show": _show,
            "plot": _plot,
            "report": _report,
            "completion": _completion,
        }
        code = commands[args.command](args)
        sys.stdout.flush()  # a full disk or a closed pipe on stdout is met here, not at exit
        return code
    except (GradlabError, UsageError) as e:
        print(f"gradlab: error: {e}" if isinstance(e, GradlabError) else f"{e}", file=sys.stderr)
        return EXIT_USAGE
    except Terminated:
        print("\ngradlab: terminated; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("\ngradlab: interrupted; rerun the same command to resume from the last checkpoint", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `gradlab list | head`: the reader left; say nothing more
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # what the OS refuses (a full disk, a name too long, no permission, a read-only disk)
        return _os_error(e)


def _os_error(e: OSError) -> int:
    """One line for an OSError; every file gradlab writes is replaced atomically, so earlier ones are intact."""
    import os

    try:
        sys.stdout.flush()
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # stdout itself failed: drop what is left
    where = f"{e.filename}: " if e.filename else "writing the output: "
    print(
        f"gradlab: error: {where}{e.strerror or e}; files written before are intact (every write is atomic)",
        file=sys.stderr,
    )
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
