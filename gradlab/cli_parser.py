"""The `gradlab` command line's parser: subcommands, options, help texts and examples.

Kept apart from cli.py, which dispatches and prints; neither holds any math.
"""

from __future__ import annotations

import argparse

from gradlab import runtime


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        raise UsageError(f"{self.prog}: error: {message} (see `{self.prog} --help`)")


class UsageError(Exception):
    pass


SWEEP_EXAMPLES = """\
examples:
  gradlab run gradient_flow                              the experiment's default (quick) scale
  gradlab run gradient_flow --scale paper                a preset of its config
  gradlab run gradient_flow model.depth=32 seeds=8       key=value overrides (values read as YAML)
  gradlab run gradient_flow 'model.activation=[tanh, relu]'        a list: a sweep axis
  gradlab run lr_sweep 'optim.lr={logspace: [-4, -1, 16]}'         16 rates 1e-4..1e-1, one compile
  gradlab run lr_sweep 'optim.lr={linspace: [0.01, 0.1, 10]}'      10 evenly spaced
  gradlab run mine.yaml optim.lr=3e-4                    a config file of your own (see configs/)
  gradlab show gradient_flow > mine.yaml                 a file that runs again unchanged
  gradlab show gradient_flow --doc                       every key: type, default, allowed, meaning

Values that only change numbers (rates, gains, init scheme, depth under a mask, seeds) are vmapped
in one compiled program; values that change shapes or code (width, activation, norm, optimizer)
compile once each."""


def environment_help() -> str:
    width = max(len(name) for name, _ in runtime.ENVIRONMENT)
    lines = [f"  {name:<{width}}  {meaning}" for name, meaning in runtime.ENVIRONMENT]
    return "environment variables:\n" + "\n".join(lines)


def version_line() -> str:
    from importlib.metadata import PackageNotFoundError, version

    def of(dist):
        try:
            return version(dist)
        except PackageNotFoundError:
            return "not installed"

    from gradlab import __version__

    return f"gradlab {__version__} (jax {of('jax')}, jaxlib {of('jaxlib')}, optax {of('optax')}, flax {of('flax')})"


def build_parser() -> argparse.ArgumentParser:
    from gradlab import experiments

    raw = argparse.RawDescriptionHelpFormatter
    p = Parser(
        prog="gradlab",
        description="Experiments on training dynamics, in JAX and Optax.",
        epilog=f"{SWEEP_EXAMPLES}\n\n{environment_help()}",
        formatter_class=raw,
    )
    p.add_argument("--version", action="version", version=version_line())
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)

    catalog = "experiments: " + ", ".join(experiments.names())
    r = sub.add_parser(
        "run",
        help="run an experiment: results, figure, checks",
        formatter_class=raw,
        description="Run an experiment or a config file, store its results, draw its figures and "
        f"print its checks.\n\n{catalog}",
        epilog=f"{SWEEP_EXAMPLES}\n\n{environment_help()}",
    )
    r.add_argument(
        "experiment",
        metavar="EXPERIMENT|FILE",
        help="an experiment's name (`gradlab list`) or a config file naming one (`experiment: NAME`)",
    )
    r.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="config overrides, e.g. model.depth=32 seeds=8; a list or {logspace: [lo, hi, n]} sweeps",
    )
    r.add_argument("--scale", help="a preset of the config (quick, paper)")
    r.add_argument("--config", dest="config_file", help=argparse.SUPPRESS)  # the same as `gradlab run FILE`
    r.add_argument("--out", default=".", help="folder for runs/ and figures/ (default: .)")
    r.add_argument(
        "--fresh",
        action="store_true",
        help="recompute, ignoring stored results and checkpoints (old results are kept until the new ones land)",
    )
    r.add_argument("--no-figure", action="store_true", help="store results only")
    r.add_argument("--check", action="store_true", help="exit 1 if a check fails")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.add_argument(
        "--dry-run",
        action="store_true",
        help="compile only: print sweep size, compiles, FLOPs and memory per device, then exit",
    )
    r.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="CPU only: split the host into N devices to shard the sweep over "
        f"(default {runtime.DEFAULT_HOST_DEVICES})",
    )
    scale_options(r)

    rp = sub.add_parser(
        "reproduce", help="run every experiment (stored results reused), redraw every figure, print one table of checks"
    )
    rp.add_argument("--scale", help="a preset every config defines (quick, paper)")
    rp.add_argument("--only", nargs="+", metavar="NAME|FILE", help="these experiments (or config files) only")
    rp.add_argument("--out", default=".", help="folder for runs/ and figures/ (default: .)")
    rp.add_argument("--check", action="store_true", help="exit 1 if any check fails")
    rp.add_argument("--quiet", action="store_true", help="no progress bars")
    rp.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help=f"CPU only: split the host into N devices (default {runtime.DEFAULT_HOST_DEVICES})",
    )
    scale_options(rp)

    sub.add_parser("list", help="the experiments and their claims")

    c = sub.add_parser(
        "completion",
        help="print a shell completion script (bash or zsh)",
        description="Print a completion script: experiments, config files and config keys.\n"
        "  bash: gradlab completion bash > ~/.local/share/bash-completion/completions/gradlab\n"
        "  zsh:  gradlab completion zsh > ~/.zfunc/_gradlab   (with ~/.zfunc on fpath)",
        formatter_class=raw,
    )
    c.add_argument("shell", choices=("bash", "zsh"))

    s = sub.add_parser(
        "show",
        help="print the resolved config, as a file `gradlab run` takes",
        description=f"Print the resolved config as a config file that runs again unchanged.\n\n{catalog}",
        formatter_class=raw,
    )
    s.add_argument("experiment", metavar="EXPERIMENT|FILE")
    s.add_argument("overrides", nargs="*", metavar="key=value")
    s.add_argument("--scale", help="a preset of the config (quick, paper, tiny)")
    s.add_argument("--config", dest="config_file", help=argparse.SUPPRESS)
    s.add_argument(
        "--doc", action="store_true", help="every key instead: its type, default, allowed values or bounds and meaning"
    )

    pl = sub.add_parser("plot", help="redraw the figures of a stored run")
    pl.add_argument("run_dir")
    pl.add_argument("--out", default=".", help="figures go to OUT/figures (default: .)")
    pl.add_argument(
        "--style",
        choices=("screen", "paper"),
        default="screen",
        help="screen (default) or paper: one or two journal columns (3.3 / 7.0 in) wide, 8 pt, TrueType fonts",
    )

    rep = sub.add_parser(
        "report",
        help="one offline HTML page of runs: claims, figures, checks, how to reproduce, a data explorer",
        description="Write one self-contained HTML file (it works offline) showing, for every run: its claim, "
        "figures, checks, the command and config that reproduce it, its provenance, and an explorer of its "
        "results (metric, x axis, series, the other axes fixed by sliders, log axes, diverged points marked).",
    )
    rep.add_argument("runs", nargs="*", metavar="RUN", help="run folders (holding results.nc)")
    rep.add_argument("--all", action="store_true", help="every run under --root (newest per experiment)")
    rep.add_argument("--root", default=".", help="with --all: the folder holding runs/ (default: .)")
    rep.add_argument("-o", "--output", default="report.html", help="the HTML file to write (default: report.html)")
    return p


def scale_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-memory",
        type=float,
        metavar="GIB",
        help="GiB per device a sweep may use (default: what is free); a larger sweep runs in batches",
    )
    hosts = p.add_argument_group("several hosts (jax.distributed; run the same command on every host)")
    hosts.add_argument("--coordinator", metavar="HOST:PORT", help="address of process 0, the same on every host")
    hosts.add_argument("--num-processes", type=int, metavar="N", help="how many processes take part")
    hosts.add_argument(
        "--process-id", type=int, metavar="I", help="this process, 0 to N-1; process 0 writes the results"
    )


def overrides_first(argv: list[str], parser: argparse.ArgumentParser) -> list[str]:
    """`gradlab run NAME --out DIR key=value` means the same as `gradlab run NAME key=value --out DIR`."""
    if len(argv) < 2 or argv[0] not in ("run", "show"):
        return argv
    # argparse has no public way to a subcommand's parser: its one _SubParsersAction holds them.
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))  # noqa: SLF001
    sub = subcommands.choices[argv[0]]
    takes_value = {s for a in sub._actions for s in a.option_strings if a.nargs is None}
    head, overrides, options = [argv[0]], [], []
    rest = iter(argv[1:])
    for token in rest:
        if token.startswith("-"):
            options.append(token)
            value = next(rest, None) if token in takes_value else None
            if value is not None:
                options.append(value)
        elif "=" in token:
            overrides.append(token)
        elif len(head) == 1:
            head.append(token)
        else:
            options.append(token)
    return head + overrides + options
