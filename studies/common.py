"""Shared plumbing for the studies: config merging, CSV/JSON/figure writing, the CLI.

Every study is ``python -m studies.<name> [--quick] [--out figures]`` with a
``run(quick=True, out_dir="figures", config=None, plot=True) -> DataFrame``,
most of them a call to ``run_study`` (config, compute, print the study's
``Report``, write the outputs). ``finish`` writes ``<out>/<name>.csv`` (rounded
to 10 significant digits so a second run with the same seed gives the same bytes), ``<out>/<name>.json``
(config, seed, package versions, git revision, wall time) and the figure
(``.png``; ``.pdf`` too in full mode).
"""

from __future__ import annotations

import argparse
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from vopd_analysis import provenance  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
FLOAT_FORMAT = "%.10g"


def make_config(defaults: dict, quick: bool, overrides: Optional[dict]) -> dict:
    """The study's config: ``defaults["quick"|"full"]`` updated with ``overrides``."""
    config = dict(defaults["quick" if quick else "full"])
    config.update(overrides or {})
    return config


def start(defaults: dict, quick: bool, overrides: Optional[dict]) -> tuple:
    """(config, start time): ``defaults["quick"|"full"]`` updated with ``overrides``.

    Also runs torch single-threaded: the studies' tensors are small, and on a
    busy 2-core machine intra-op threads made the exact engine ~15x slower.
    """
    import torch
    torch.set_num_threads(1)
    return make_config(defaults, quick, overrides), time.perf_counter()


def git_revision() -> dict:
    """``provenance.git_revision`` of this checkout (``REPO``)."""
    return provenance.git_revision(REPO)


versions = provenance.versions
machine = provenance.machine


def weights_sha256(models: dict) -> dict:
    """{role: {file: sha256}} of the weight files of each local model source in ``models`` ({role: source}:
    a folder's ``*.safetensors``/``*.bin``, or a GGUF file); None for a hub id."""
    from vopd_analysis.lm import loading
    return {role: loading.weights_sha256(source, role) for role, source in models.items()}


def style() -> None:
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)


def finish(name: str, df: pd.DataFrame, config: dict, out_dir, quick: bool, started: float,
           figure: Optional[Callable[[pd.DataFrame], "plt.Figure"]] = None, extra: Optional[dict] = None,
           seed: Optional[int] = None) -> pd.DataFrame:
    """Write the CSV, the manifest and (if ``figure``) the figure; return ``df``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / f"{name}.csv", index=False, float_format=FLOAT_FORMAT)
    if figure is not None:
        style()
        fig = figure(df)
        fig.savefig(out / f"{name}.png", dpi=130, bbox_inches="tight")
        if not quick:
            fig.savefig(out / f"{name}.pdf", bbox_inches="tight")
        plt.close(fig)
    provenance.write_json(out / f"{name}.json", provenance.manifest(name, config, started, df, quick, seed, extra, REPO))
    return df


@dataclass
class Report:
    """What a study says about its table besides the CSV (see ``run_study``)."""

    text: Optional[str] = None                 # printed after the computation
    extra: dict = field(default_factory=dict)  # added to the manifest
    figure_args: tuple = ()                    # passed to the figure after the table
    markdown: Optional[str] = None             # written to <out>/<name>.md


def summary_report(summary: Callable[[pd.DataFrame], pd.DataFrame], digits: int) -> Callable:
    """A ``report`` that prints ``summary(df)`` to ``digits`` significant digits and keeps it in the manifest."""
    def report(df: pd.DataFrame, config: dict) -> Report:
        table = summary(df)
        return Report(text=table.to_string(index=False, float_format=lambda x: f"{x:.{digits}g}"),
                      extra={"summary": table.to_dict(orient="records")})
    return report


def run_study(name: str, defaults: dict, compute: Callable, figure: Optional[Callable] = None, *,
              report: Optional[Callable[[pd.DataFrame, dict], Report]] = None, quick: bool = True,
              out_dir="figures", config: Optional[dict] = None, plot: bool = True,
              seed: str = "seeds") -> pd.DataFrame:
    """The body of a study's ``run``: config, ``compute``, ``report``, outputs; returns the table.

    ``compute(config)`` returns the table, or (table, dict of manifest entries);
    ``report(table, config)`` returns the ``Report``; ``figure(table, *report.figure_args)``
    draws the figure (skipped unless ``plot``); the manifest's seed is ``config[seed]``.
    """
    cfg, started = start(defaults, quick, config)
    df, extra = compute(cfg), {}
    if isinstance(df, tuple):
        df, extra = df
    said = report(df, cfg) if report is not None else Report()
    if said.text is not None:
        print(said.text)
    draw = (lambda d: figure(d, *said.figure_args)) if plot and figure is not None else None
    finish(name, df, cfg, out_dir, quick, started, draw, extra={**said.extra, **extra}, seed=cfg.get(seed))
    if said.markdown is not None:
        (Path(out_dir) / f"{name}.md").write_text(said.markdown)
    return df


def markdown_table(df: pd.DataFrame) -> str:
    """A plain GitHub markdown table (no tabulate dependency)."""
    cols = list(df.columns)
    lines = ["| " + " | ".join(map(str, cols)) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(str(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def default_out(quick: bool) -> str:
    """Where a study writes by default: ``figures`` in quick mode, ``figures/full`` in full mode (so a full
    run never overwrites the committed quick outputs, nor the reverse)."""
    return "figures" if quick else "figures/full"


def main(run: Callable, description: str) -> None:
    """The command line of a study: --quick, --out."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="small sweep, minutes on a laptop CPU")
    parser.add_argument("--out", help="output folder (default: figures with --quick, figures/full without)")
    args = parser.parse_args()
    args.out = args.out or default_out(args.quick)
    started = time.perf_counter()
    df = run(quick=args.quick, out_dir=args.out)
    print(f"{len(df)} rows -> {os.path.join(args.out, '')}; {time.perf_counter() - started:.1f} s")
