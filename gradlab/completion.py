"""Shell completion scripts for `gradlab` (bash and zsh), generated with shtab.

The script is made once (`gradlab completion bash > ~/.local/share/bash-completion/completions/gradlab`)
and completes subcommands, options, experiment names and config files where an experiment is
expected, and `key=` for every config key of the catalog where overrides are expected. The names
and keys are written into the script, so completing starts no Python.
"""

from __future__ import annotations

import argparse

import shtab

SHELLS = ("bash", "zsh")


def _words(items) -> str:
    return " ".join(sorted(set(items)))


def _preamble(names: list[str], keys: list[str]) -> dict[str, str]:
    experiments, overrides = _words(names), _words(f"{k}=" for k in keys)
    bash = (
        "_gradlab_experiments() {\n"
        f'  compgen -W "{experiments}" -- "$1"\n'
        '  compgen -f -X "!*.y*ml" -- "$1"\n'
        "}\n"
        "_gradlab_keys() {\n"
        f'  compgen -W "{overrides}" -- "$1"\n'
        "}\n"
    )
    zsh = (
        "_gradlab_experiments() {\n"
        f"  compadd -- {experiments}\n"
        "  _files -g '*.y(a|)ml'\n"
        "}\n"
        "_gradlab_keys() {\n"
        f"  compadd -S '' -- {overrides}\n"
        "}\n"
    )
    return {"bash": bash, "zsh": zsh}


def script(parser: argparse.ArgumentParser, shell: str, names: list[str], keys: list[str]) -> str:
    """The completion script of `parser` for `shell`: positionals named `experiment` complete
    experiment names and YAML files, those named `overrides` complete `key=` for every key."""
    for action in _actions(parser):
        if action.dest == "experiment":
            action.complete = {"bash": "_gradlab_experiments", "zsh": "_gradlab_experiments"}  # type: ignore[attr-defined]
        elif action.dest == "overrides":
            action.complete = {"bash": "_gradlab_keys", "zsh": "_gradlab_keys"}  # type: ignore[attr-defined]
        elif action.dest in ("run_dir", "out", "config_file"):
            action.complete = shtab.DIRECTORY if action.dest != "config_file" else shtab.FILE  # type: ignore[attr-defined]
    return shtab.complete(parser, shell=shell, preamble=_preamble(names, keys).get(shell, ""))


def _actions(parser: argparse.ArgumentParser):
    for action in parser._actions:  # noqa: SLF001 (argparse has no public walk of its actions)
        yield action
        if isinstance(action, argparse._SubParsersAction):  # noqa: SLF001
            for sub in action.choices.values():
                yield from _actions(sub)
