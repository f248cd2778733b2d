"""``llm_variance`` on the small pair (vocabulary 8,192): ``python -m studies.llm_variance_small [--quick]``.

The same study as ``python -m studies.llm_variance --pair small``, as a module of its own so that
``run_all`` runs it; it writes ``llm_variance_small.*``.
"""

from __future__ import annotations

import pandas as pd

from . import common, llm_variance

READS = ()   # the studies whose outputs this one reads (run_all runs them first)


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return llm_variance.run(quick=quick, out_dir=out_dir, config={"pair": "small", **(config or {})}, plot=plot)


if __name__ == "__main__":
    common.main(run, __doc__)
