"""What made a number: package versions, the machine, the git revision, and the JSON manifest that records them.

Every output of a study or of ``vopd probe`` comes with a manifest (``manifest``): the config, the
seed, these versions, the CPU facts that decide float round-off, the git revision (and whether
tracked code differed from it) and the wall time.
"""

from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def git_revision(repo=None) -> dict:
    """{"revision": HEAD sha or None, "dirty": whether tracked files differ from HEAD, or None}.

    Untracked files (a user's runs, scratch notes) and the outputs themselves (``figures/``,
    ``benchmarks/RESULTS.md``, rewritten while ``run_all`` runs) do not make the checkout dirty.

    Args:
      repo: the checkout (default: the one this package is in).
    """
    repo = REPO if repo is None else repo
    try:
        rev = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                     ":(exclude)figures", ":(exclude)benchmarks/RESULTS.md"], cwd=repo,
                                    capture_output=True, text=True, check=True).stdout.strip())
        return {"revision": rev, "dirty": dirty}
    except (OSError, subprocess.CalledProcessError):
        return {"revision": None, "dirty": None}


def versions() -> dict:
    """Python, torch, numpy, scipy and pandas versions."""
    import pandas as pd
    import scipy
    import torch
    return {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
            "scipy": scipy.__version__, "pandas": pd.__version__}


def machine() -> dict:
    """What decides float round-off on a CPU: torch threads, the SIMD kernels torch picked, the CPU model
    and its vector flags, and the Hugging Face versions (real-model manifests)."""
    import tokenizers
    import torch
    import transformers
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


def jsonable(value):
    """``json.dumps``'s ``default``: numpy scalars and arrays as Python numbers and lists, the rest as text."""
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    return str(value)


def manifest(name: str, config: dict, started: float, table, quick: bool, seed=None, extra: Optional[dict] = None,
             repo=None) -> dict:
    """The manifest of one output table: what made it.

    Args:
      name: the study or output name.
      config: the full config.
      started: ``time.perf_counter()`` at the start.
      table: the pandas table written beside it (rows and columns are recorded).
      quick: quick or full mode.
      seed: the seed (default ``config["seed"]``).
      extra: further entries.
      repo: the checkout whose revision is recorded.

    Returns:
      {"study", "mode", "seed", "config", "versions", "git", "wall_time_s", "rows", "columns", **extra}.
    """
    return {"study": name, "mode": "quick" if quick else "full",
            "seed": config.get("seed") if seed is None else seed, "config": config,
            "versions": versions(), "git": git_revision(repo),
            "wall_time_s": round(time.perf_counter() - started, 3), "rows": len(table),
            "columns": list(table.columns), **(extra or {})}


def write_json(path, data: dict) -> None:
    """Write ``data`` as indented JSON (numpy values converted, anything else as text)."""
    Path(path).write_text(json.dumps(data, indent=2, default=jsonable) + "\n")
