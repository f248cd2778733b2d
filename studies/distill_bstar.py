"""Does b* train the tiny student better than vOPD's baseline? opd, vopd and opd_bstar over paired seeds.

The same loop, pair, prompts and evaluation as ``distill_tiny`` (its functions are reused),
with three estimators that differ only in the baseline subtracted from the sampled-token
log-ratio: none (opd), KL_t (vopd), and the logit-space variance-optimal b*(s_t) (opd_bstar).
All three are unbiased for the token-level gradient, so any difference in training comes from
their variance. Reported per estimator over seeds: the final held-out accuracy and sequence
reverse KL (mean, 95% t-interval), the paired difference to opd on the same seeds (interval,
paired t-test p-value) and steps to ``kl_threshold`` nats; the manifest adds the paired
differences opd_bstar - vopd.

Full mode uses distill_tiny's full configuration (10 seeds, 400 steps, lr 1e-3) and its
``work_dir``, so the opd and vopd runs of one study are reused by the other. Quick mode (one
seed, 50 steps) only checks the pipeline and decides nothing.
"""

from __future__ import annotations

import pandas as pd

from vopd_analysis import stats

from . import common, distill_tiny

NAME = "distill_bstar"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
ESTIMATORS = {"opd": {}, "vopd": {}, "opd_bstar": {}}
DEFAULTS = {
    "quick": {**distill_tiny.DEFAULTS["quick"], "estimators": ESTIMATORS, "seeds": [0], "steps": 50,
              "eval_every": 25, "num_eval": 50},
    "full": {**distill_tiny.DEFAULTS["full"], "estimators": ESTIMATORS},
}


def bstar_minus_vopd(df: pd.DataFrame) -> dict:
    """Paired differences opd_bstar - vopd of the final accuracy and reverse KL (mean, interval, p-value)."""
    last = distill_tiny.final_rows(df)
    out = {}
    for metric, (short, _) in distill_tiny.METRICS.items():
        d = stats.paired_difference(*distill_tiny.paired_finals(last, "opd_bstar", "vopd", metric))
        out[short] = {k: d[k] for k in ("mean", "low", "high", "p_value", "n")}
    return out


def report(df: pd.DataFrame, config: dict) -> common.Report:
    said = distill_tiny.report(df, config)
    contrast = bstar_minus_vopd(df)
    lines = [f"opd_bstar - vopd, final {short}: {c['mean']:.4g} [{c['low']:.4g}, {c['high']:.4g}], "
             f"p = {c['p_value']:.3g} ({c['n']} paired seeds)" for short, c in contrast.items()]
    return common.Report(text=said.text + "\n" + "\n".join(lines),
                         extra={**said.extra, "bstar_minus_vopd": contrast})


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return common.run_study(NAME, DEFAULTS, lambda cfg: distill_tiny._with_seconds(*distill_tiny.compute(cfg)),
                            distill_tiny.figure, report=report, quick=quick, out_dir=out_dir, config=config,
                            plot=plot)


if __name__ == "__main__":
    common.main(run, __doc__)
