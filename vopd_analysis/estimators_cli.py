"""``vopd estimators [--json]``: the estimator registry with its metadata, as a table or as JSON."""

from __future__ import annotations

import json

from .cli import Parser, parse_command


def build_parser() -> Parser:
    parser = Parser(prog="vopd estimators")
    parser.add_argument("--json", action="store_true")
    return parser


def print_registry(as_json: bool) -> None:
    """One row per estimator: name, target, teacher signal, parameters and description (aligned columns)."""
    from .estimators import describe
    rows = describe()
    if as_json:
        print(json.dumps(rows, indent=1))
        return
    table = [("name", "unbiased for", "teacher", "params", "description")] + [
        (r["name"], r["unbiased_for"], r["teacher_signal"], ", ".join(f"{k}={v}" for k, v in r["params"].items()),
         r["description"]) for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(4)]
    for row in table:
        print(" ".join(f"{cell:{w}s}" for cell, w in zip(row, widths)) + " " + row[4])


def main(argv=None) -> int:
    print_registry(parse_command(build_parser(), argv or []).json)
    return 0
