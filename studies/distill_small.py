"""Distilling the small Python-documentation student (vocabulary 8,192) with each estimator, paired seeds.

The small preset (``vopd_analysis.lm.small``): the committed teacher/student pair with a byte-level
BPE vocabulary of 8,192 tokens; prompts are prefixes of held-out documents and the student
continues them for 32 tokens. Same design as ``distill_tiny`` (seed s gives every estimator the
same prompts; final values with 95% t-intervals; paired differences to opd with p-values; steps
to ``kl_threshold`` nats), with the teacher's log-likelihood of the student's samples (nats per
token, higher is better) in place of accuracy, which text continuation does not have.

Each step costs about 20x a tiny-pair step on a CPU (a 1.5M-parameter student, a 8,192-way
softmax, 32-token responses), so the comparison is short: the power it gives is reported as
the smallest paired difference it could detect (the ``mde_*`` columns: (t_{0.975} + t_{0.8})
sd(d) / sqrt(n), ``distill_tiny.detectable_differences``: 80% power at the 5% level for the observed spread).

    python -m studies.distill_small [--quick]
"""

from __future__ import annotations

import pandas as pd

from . import common, distill_tiny

NAME = "distill_small"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
ESTIMATORS = {"opd": {}, "vopd": {}, "vopd_topk": {"k": 16}, "full_kl": {}}
METRICS = {"eval_reverse_kl": ("kl", "sequence reverse KL (nats)"),
           "eval_teacher_logprob": ("tlogp", "teacher log-prob of student samples (nats/token)")}
LOOP = {"preset": "small", "metrics": list(METRICS), "lr": 1e-3, "prompts_per_step": 8, "rollouts_per_prompt": 4}
DEFAULTS = {
    "quick": {"estimators": {"opd": {}, "vopd": {}}, "seeds": [0], "steps": 4, "eval_every": 2, "num_eval": 8,
              "kl_threshold": 25.0, "jobs": 1, "work_dir": None, **LOOP},
    "full": {"estimators": ESTIMATORS, "seeds": [0, 1, 2, 3], "steps": 40, "eval_every": 20, "num_eval": 32,
             "kl_threshold": 25.0, "jobs": 2, "work_dir": "runs/distill_small_full", **LOOP},
}


def report(df: pd.DataFrame, config: dict) -> common.Report:
    """``distill_tiny.report`` with the detectable differences to opd (``mde_*``) and, for each estimator
    of ``config["also_against"]`` present (default none), the paired differences to it
    (``distill_tiny.differences_to``: columns ``<short>_minus_<reference>``)."""
    said = distill_tiny.report(df, config, METRICS)
    table = pd.DataFrame(said.extra["summary"]).merge(distill_tiny.detectable_differences(df, distill_tiny.REFERENCE, METRICS),
                                                               on="estimator", how="left")
    for ref in (r for r in config.get("also_against", ()) if r in set(df["estimator"])):
        table = table.merge(distill_tiny.differences_to(df, ref, METRICS), on="estimator")
    text = said.extra["summary_note"] + "\n" + table.to_string(index=False, float_format=lambda x: f"{x:.4g}")
    return common.Report(text=text, extra={"summary": table.to_dict(orient="records"),
                                           "summary_note": said.extra["summary_note"]})


def run_text_preset(name: str, defaults: dict, quick: bool = True, out_dir="figures", config: dict | None = None,
                    plot: bool = True) -> pd.DataFrame:
    """A paired distillation study on a preset without a verifier (``METRICS``: reverse KL and the teacher's
    log-likelihood, with the power columns): the body of this study and of ``distill_smollm2``."""
    preset = defaults["quick"]["preset"]
    return common.run_study(name, defaults, lambda cfg: distill_tiny._with_seconds(*distill_tiny.compute(cfg), preset),
                            lambda df: distill_tiny.figure(df, METRICS), report=report, quick=quick,
                            out_dir=out_dir, config=config, plot=plot)


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return run_text_preset(NAME, DEFAULTS, quick, out_dir, config, plot)


if __name__ == "__main__":
    common.main(run, __doc__)
