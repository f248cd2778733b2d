"""``vopd study NAME [--quick] [--out DIR]``: one study, as ``python -m studies.NAME`` runs it."""

from __future__ import annotations

import argparse
import importlib

from vopd_analysis import records
from vopd_analysis.cli import Parser, parse_command
from vopd_analysis.errors import InputError

from . import common
from .run_all import STUDIES


class _StudyHelp(argparse.Action):
    """``vopd study --help``: the usage with the list of studies."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        parser.epilog = "studies: " + ", ".join(STUDIES)
        parser.print_help()
        parser.exit()


def build_parser() -> Parser:
    parser = Parser(prog="vopd study", add_help=False)
    parser.add_argument("-h", "--help", action=_StudyHelp, help="show this help message and the studies, and exit")
    parser.add_argument("name", help="the study (listed below)")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", help="folder for the table, manifest and figure (default: figures with --quick, "
                        "figures/full without, as python -m studies.NAME)")
    return parser


def main(argv=None) -> int:
    args = parse_command(build_parser(), argv or [])
    if args.name not in STUDIES:
        raise InputError(f"no study named '{args.name}'; known studies: {', '.join(STUDIES)}")
    out = records.check_output(common.default_out(args.quick) if args.out is None else args.out, "--out", folder=True)
    module = importlib.import_module(f"studies.{args.name}")
    module.run(quick=args.quick, out_dir=str(out))
    return 0
