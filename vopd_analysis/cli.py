"""The ``vopd`` command: a table of sub-commands, each a module with its own parser and ``main``.

    vopd estimators [--json]                      the registry with its metadata
    vopd exact --tables F.npz --horizon H [--param NAME=VALUE ...] [--k K] [--json]
    vopd exact --vocab V --horizon H [--coupling ...] [--markov] [--method dp|enumerate]
               [--estimators a,b] [--param NAME=VALUE ...] [--json]
    vopd mc --vocab V --horizon H --estimator NAME [--param NAME=VALUE ...] [--samples N] [--alpha A] [--json]
    vopd study NAME [--quick] [--out DIR]         one study script (python -m studies.NAME)
    vopd distill ...                              the distillation loop (vopd distill --help)
    vopd sweep --estimators opd,vopd --seeds 0,1 --out DIR ...   distill runs, estimators x seeds
    vopd compare RUN_DIR... [--reference NAME]    final evals over seeds, paired differences, curves
    vopd probe --preset NAME | --student S --teacher T --prompts F [--estimators ...] --out DIR
                                                  gradient variance per estimator on a real pair

``COMMANDS`` names, per sub-command, the function ``main(argv) -> exit status`` that runs it
(``module:function``, imported only when that sub-command runs): ``vopd_analysis.estimators_cli``,
``vopd_analysis.tabular.cli`` (exact, mc), ``studies.cli`` (study), ``vopd_analysis.distill.command``,
``.sweep``, ``.compare`` and ``vopd_analysis.lm.probe``. A sub-command module builds its parser with
``Parser`` (and ``DefaultsFormatter``) and parses with ``parse_command``.

Bad input prints one line ``error: ...`` naming the problem and exits with status 2, argparse's
own complaints (a missing or malformed option) included. A Ctrl-C prints ``interrupted`` and exits
with status 130, also while torch is still importing (the package imports it only inside ``main``).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys

from .errors import InputError, interrupt_exits_at_once


@dataclasses.dataclass(frozen=True)
class Command:
    """One sub-command: ``target`` is ``module:function``, the function taking the arguments after the
    sub-command's name and returning the exit status (None: 0); ``help`` is its line in ``vopd --help``;
    ``missing`` is the error (``{err}``: the ImportError) when its module cannot be imported."""

    target: str
    help: str
    missing: str = ""

    def load(self):
        """The sub-command's ``main``, imported now."""
        module, function = self.target.split(":")
        try:
            return getattr(importlib.import_module(module), function)
        except ImportError as err:
            if not self.missing:
                raise
            raise InputError(self.missing.format(err=err)) from None


COMMANDS = {
    "estimators": Command("vopd_analysis.estimators_cli:main", "list the estimator registry"),
    "exact": Command("vopd_analysis.tabular.cli:main_exact",
                     "exact bias and variance of every estimator on a prefix tree"),
    "mc": Command("vopd_analysis.tabular.cli:main_mc", "Monte Carlo draws of one estimator and the unbiasedness test"),
    "study": Command("studies.cli:main", "run one study script",
                     missing="cannot list the studies: {err} (run from the repository root)"),
    "distill": Command("vopd_analysis.distill.command:main", "the distillation loop (vopd distill --help)"),
    "sweep": Command("vopd_analysis.distill.sweep:main",
                     "distill runs for estimators x seeds in one folder (vopd sweep --help)"),
    "compare": Command("vopd_analysis.distill.compare:main", "compare distill runs over seeds (vopd compare --help)"),
    "probe": Command("vopd_analysis.lm.probe:main", "gradient variance of estimators on a real pair (vopd probe --help)"),
}


class Parser(argparse.ArgumentParser):
    """argparse with its errors raised as ``InputError``, so they print as one line like every other."""

    def error(self, message):
        raise InputError(f"{self.prog}: {message} (see {self.prog} --help)")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to every option's help, except where the default is None (the help
    text then says what leaving it out means)."""

    def _get_help_string(self, action):
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def parse_command(parser: argparse.ArgumentParser, argv: list) -> argparse.Namespace:
    """``parser.parse_args(argv)`` for a sub-command's ``Parser``, except that arguments it does not know are
    refused by ``vopd`` itself, as argparse reports them for sub-commands: ``vopd: unrecognized arguments: ...``."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        build_parser().error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def build_parser() -> argparse.ArgumentParser:
    """``vopd`` itself: the sub-commands and their help lines (each sub-command parses its own options)."""
    parser = Parser(prog="vopd", description="OPD gradient estimators: bias, variance, baselines")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, command in COMMANDS.items():
        sub.add_parser(name, help=command.help, add_help=False)
    return parser


def _silence_broken_pipe() -> int:
    """After stdout's reader went away (``vopd estimators | head -3``): point stdout at /dev/null so
    that the interpreter's final flush cannot raise again, and return 141 (128 + SIGPIPE), the
    status of a process killed by the broken pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):   # stdout without a file descriptor (captured)
        pass
    return 141


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        name = argv[0] if argv and argv[0] in COMMANDS else build_parser().parse_args(argv).command
        with interrupt_exits_at_once():          # torch imports for seconds: a Ctrl-C then ends it at once
            run = COMMANDS[name].load()
        status = run(argv[1:]) or 0
        sys.stdout.flush()
    except InputError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return _silence_broken_pipe()
    except KeyboardInterrupt as err:   # a run saves its checkpoint and says how to resume before this
        print("interrupted", file=sys.stderr)
        return getattr(err, "status", 130)   # 143 after a SIGTERM (distill.stopping.Interrupted)
    return status


if __name__ == "__main__":
    sys.exit(main())
