"""``llm_variance`` on the pretrained gemma3 pair (vocabulary 262,144): ``python -m studies.llm_variance_gemma3 [--quick]``.

The teacher is the pretrained model from its package, the student the teacher without the layers its card
names (``vopd_analysis.lm.pretrained``). On a 2-core CPU the gradient covers the last two decoder layers
and the final norm; full mode also probes every parameter on two batches (``llm_variance_gemma3_all.*``)
and records in the manifest whether the restricted ratios agree with the full-parameter ones
(``llm_variance.run_pretrained``). Quick mode makes the check too (two all-parameter batches of
the 257M-parameter student took 13 minutes on 2 threads of the 2-core machine). Writes ``llm_variance_gemma3.*``.
"""

from __future__ import annotations

import pandas as pd

from . import common, llm_variance

READS = ()   # the studies whose outputs this one reads (run_all runs them first)


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return llm_variance.run_pretrained("gemma3", quick=quick, out_dir=out_dir, config=config, plot=plot)


if __name__ == "__main__":
    common.main(run, __doc__)
