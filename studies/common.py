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
import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

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
    """{"revision": HEAD sha or None, "dirty": whether tracked files differ from HEAD, or None}.

    Untracked files (a user's runs, scratch notes) and the outputs themselves (``figures/``,
    ``benchmarks/RESULTS.md``, rewritten while ``run_all`` runs) do not make the checkout dirty."""
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     ":(exclude)figures", ":(exclude)benchmarks/RESULTS.md"], cwd=REPO,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return {"revision": rev, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"revision": None, "dirty": None}


def versions() -> dict:
    import scipy
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "pandas": pd.__version__}


def machine() -> dict:
    """What decides float round-off on a CPU: torch threads, the SIMD kernels torch picked, the CPU model
    and its vector flags, and the Hugging Face versions (real-model manifests)."""
    import torch
    import transformers
    import tokenizers
    info = {"torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "machine": platform.machine(), "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__, "cpu_model": None, "cpu_flags": None}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    info["cpu_model"] = fields.get("model name")
    vector = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512", "amx", "asimd", "sve")
    info["cpu_flags"] = sorted(f for f in fields.get("flags", fields.get("Features", "")).split()
                               if f.startswith(vector))
    return info


def weights_sha256(models: dict) -> dict:
    """{role: {file: sha256}} of the weight files (``*.safetensors``, ``*.bin``) of each local model
    directory in ``models`` ({role: path}); None for a hub id that is not a local directory."""
    from vopd_analysis.lm.tiny import file_sha256
    out = {}
    for role, path in models.items():
        root = Path(str(path))
        out[role] = ({p.name: file_sha256(p) for p in sorted(root.iterdir()) if p.suffix in (".safetensors", ".bin")}
                     if root.is_dir() else None)
    return out


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
    manifest = {"study": name, "mode": "quick" if quick else "full",
                "seed": config.get("seed") if seed is None else seed, "config": config,
                "versions": versions(), "git": git_revision(),
                "wall_time_s": round(time.perf_counter() - started, 3), "rows": len(df),
                "columns": list(df.columns), **(extra or {})}
    (out / f"{name}.json").write_text(json.dumps(manifest, indent=2, default=_jsonable) + "\n")
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


def _jsonable(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


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
