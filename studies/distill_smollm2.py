"""Distilling a pretrained teacher: SmolLM2-135M-Instruct to its layer-pruned student, paired seeds.

The smollm2 preset (``vopd_analysis.lm.pretrained``): the teacher is SmolLM2-135M-Instruct as shipped
(GGUF, dequantised to float32, vocabulary 49,152), the student the teacher without the 6 decoder
layers whose removal hurt least (held-out perplexity 2.2x the teacher's); prompts alternate
Python-documentation prefixes and short chat instructions, responses are 32 tokens. Same design as
``distill_small`` (seed s gives every estimator the same prompts; final values with 95% t-intervals;
paired differences to opd with p-values; the smallest paired difference 80% power would detect at the
5% level, ``mde_*``), with opd, vopd, opd_bstar and full_kl. Metrics: the held-out sequence reverse KL
and the teacher's log-likelihood of the student's samples (nats per token).

A step of a 113M-parameter student on 2 CPU cores costs seconds, so the comparison covers the first
steps of training only: the number of steps is what fits in about an hour of two processes.

    python -m studies.distill_smollm2 [--quick]
"""

from __future__ import annotations

import pandas as pd

from . import common, distill_small

NAME = "distill_smollm2"
ESTIMATORS = {"opd": {}, "vopd": {}, "opd_bstar": {}, "full_kl": {}}
METRICS = distill_small.METRICS
LOOP = {"preset": "smollm2", "metrics": list(METRICS), "lr": 1e-5, "prompts_per_step": 4, "rollouts_per_prompt": 4}
DEFAULTS = {
    "quick": {"estimators": {"opd": {}, "vopd": {}}, "seeds": [0], "steps": 2, "eval_every": 2, "num_eval": 4,
              "kl_threshold": 30.0, "jobs": 1, "work_dir": None, "save_every": 0, **LOOP},
    "full": {"estimators": ESTIMATORS, "seeds": [0, 1, 2, 3], "steps": 30, "eval_every": 10, "num_eval": 16,
             "kl_threshold": 30.0, "jobs": 2, "work_dir": "runs/distill_smollm2_full", "save_every": 10, **LOOP},
}


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return distill_small.run_text_preset(NAME, DEFAULTS, quick, out_dir, config, plot)


if __name__ == "__main__":
    common.main(run, __doc__)
