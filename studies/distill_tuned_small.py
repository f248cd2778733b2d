"""``distill_tuned`` on the small Python-documentation pair (vocabulary 8,192): each estimator at its own
learning rate.

The protocol of ``distill_tuned`` (selection on seeds 100, 101 with the rule fixed before running: the
learning rate with the lowest mean final held-out reverse KL, ties to the smaller one, the grid extended
by ``ladder_step`` when the choice sits at its edge; confirmation on fresh paired seeds 0..5 at the
chosen learning rates) with the small preset's loop (8 prompts x 4 rollouts of 32 tokens per step, as in
``distill_small``) and its metrics: the held-out sequence reverse KL and the teacher's log-likelihood of
the student's samples (no verifier). The summary adds each paired difference's detectable size
(``*_mde``: 80% power at the 5% level for the observed spread), the power of the comparison.

Budget, sized to about an hour of both cores (a small-pair step costs 1.3 s for opd to 2.5 s for full_kl
on one core, ``distill_small``'s manifest): estimators opd, vopd, opd_bstar, full_kl (vopd_topk left out:
on the tiny pair it equalled vopd, and each estimator costs a quarter of the budget); grid 3e-4, 1e-3,
3e-3 (10x) with at most one extension per estimator; selection 40 steps x 2 seeds; confirmation 200
steps x 6 seeds, evaluated every 20 steps on 32 held-out prompts. So 24 selection runs (960 steps), at
most 8 more (320), and 24 confirmation runs (4,800 steps). The confirmation first ran for 80 steps,
where every curve but opd's was still falling; ``steps`` was raised to 200 and the kept runs continued
from their step-80 checkpoints (the first 80 steps of each run are unchanged). A short selection budget
can favour larger learning rates, which the confirmation's tail slopes show.

Quick mode (opd and vopd, 2 learning rates, 1 selection seed, 2 confirmation seeds, 2 steps) only checks
the pipeline and decides nothing.

    python -m studies.distill_tuned_small [--quick]
"""

from __future__ import annotations

import pandas as pd

from . import common, distill_small, distill_tuned

NAME = "distill_tuned_small"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
ESTIMATORS = {"opd": {}, "vopd": {}, "opd_bstar": {}, "full_kl": {}}
LOOP = {"preset": "small", "metrics": list(distill_small.METRICS), "prompts_per_step": 8, "rollouts_per_prompt": 4,
        "slope_fraction": 0.2, "kl_threshold": 25.0}
DEFAULTS = {
    "quick": {"estimators": {"opd": {}, "vopd": {}}, "lrs": [3e-4, 1e-3], "selection_seeds": [100],
              "selection_steps": 2, "max_extensions": 1, "seeds": [0, 1], "steps": 2, "eval_every": 1,
              "num_eval": 4, "jobs": 1, "work_dir": None, "note": distill_tuned.QUICK_NOTE, **LOOP},
    "full": {"estimators": ESTIMATORS, "lrs": [3e-4, 1e-3, 3e-3], "selection_seeds": [100, 101],
             "selection_steps": 40, "max_extensions": 1, "seeds": list(range(6)), "steps": 200, "eval_every": 20,
             "num_eval": 32, "jobs": 2, "work_dir": "runs/distill_tuned_small_full", "note": None, **LOOP},
}


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return distill_tuned.run_tuned(NAME, DEFAULTS, quick, out_dir, config, plot)


if __name__ == "__main__":
    common.main(run, __doc__)
