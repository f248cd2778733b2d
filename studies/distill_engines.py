"""The same distillation on two engines: the built-in loop and TRL 1.16's DistillationTrainer.

``vopd distill --engine trl`` (``vopd_analysis.distill.trl_engine``) replaces only TRL's loss
with the registry's; rollouts, optimiser, scheduler and batching are TRL's. Both engines get the
tiny preset's pair, the same per-step prompts and evaluation set for seed s, the same learning
rate, warm-up, AdamW betas, clipping and token counts, but different random streams for the
rollouts (TRL seeds its own generator), so a seed pairs the data, not the samples.

Reported per (engine, estimator) over seeds: the final held-out accuracy and sequence reverse KL
(mean, 95% t-interval, ``distill_tiny.summary``), whether the TRL engine's mean lies inside the
built-in loop's interval, and the difference TRL - builtin on the same seeds (mean, 95%
t-interval, paired t-test p-value). Quick mode (3 seeds, 60 steps) checks the pipeline; full mode
uses distill_tiny's full configuration (10 seeds, 400 steps, lr 1e-3) and its ``work_dir``, so
the built-in runs are shared with distill_tiny and distill_bstar.
"""

from __future__ import annotations

import pandas as pd

from vopd_analysis import stats

from . import common, distill_tiny

NAME = "distill_engines"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
ENGINES = ("builtin", "trl")
DEFAULTS = {
    "quick": {**distill_tiny.DEFAULTS["quick"], "estimators": {"vopd": {}}, "seeds": [0, 1, 2], "steps": 60,
              "eval_every": 30, "num_eval": 100},
    "full": {**distill_tiny.DEFAULTS["full"], "estimators": {"vopd": {}, "opd_bstar": {}}},
}


def compute(config: dict) -> tuple:
    """distill_tiny.compute once per engine; rows labelled ``engine/estimator``."""
    tables, seconds = [], {}
    for engine in ENGINES:
        table, secs = distill_tiny.compute({**config, "engine": engine})
        tables.append(table.assign(estimator=engine + "/" + table["estimator"]))
        seconds.update({f"{engine}/{k}": v for k, v in secs.items()})
    return pd.concat(tables, ignore_index=True), seconds


def engine_contrast(df: pd.DataFrame) -> list:
    """Per estimator and metric: TRL's final mean, the built-in interval, inside or not, and TRL -
    builtin paired by seed (mean, interval, p-value)."""
    last = distill_tiny.final_rows(df)
    out = []
    for label in dict.fromkeys(df["estimator"]):
        engine, name = label.split("/", 1)
        if engine != "trl":
            continue
        ours, theirs = last.loc[f"builtin/{name}"], last.loc[label]
        for metric, (short, _) in distill_tiny.METRICS.items():
            mean, low, high = stats.mean_interval(ours[metric])
            trl_mean = float(theirs[metric].mean())
            d = stats.paired_difference(*distill_tiny.paired_finals(last, label, f"builtin/{name}", metric))
            out.append({"estimator": name, "metric": short, "builtin_mean": mean, "builtin_low": low,
                        "builtin_high": high, "trl_mean": trl_mean, "trl_inside": bool(low <= trl_mean <= high),
                        "trl_minus_builtin": d["mean"], "diff_low": d["low"], "diff_high": d["high"],
                        "diff_p": d["p_value"], "seeds": d["n"]})
    return out


def report(df: pd.DataFrame, config: dict) -> common.Report:
    table = distill_tiny.summary(df, config["kl_threshold"], reference="(none)")
    head = (f"{df['seed'].nunique()} seeds, {df['step'].max()} steps; a seed gives both engines the same prompts and "
            f"evaluation set, not the same samples; steps_to_kl: first evaluation with reverse KL <= "
            f"{config['kl_threshold']} nats")
    if df["seed"].nunique() < 5:
        head += "\nUNDERPOWERED: fewer than 5 paired seeds; a difference is decided only where its interval excludes 0 (mde_*: what 80% power would detect)"
    contrast = engine_contrast(df)
    lines = [f"{c['estimator']} final {c['metric']}: trl {c['trl_mean']:.4g}, builtin {c['builtin_mean']:.4g} "
             f"[{c['builtin_low']:.4g}, {c['builtin_high']:.4g}] ({'inside' if c['trl_inside'] else 'OUTSIDE'}); "
             f"trl - builtin {c['trl_minus_builtin']:.4g} [{c['diff_low']:.4g}, {c['diff_high']:.4g}], "
             f"p = {c['diff_p']:.3g} ({c['seeds']} seeds)" for c in contrast]
    text = head + "\n" + table.to_string(index=False, float_format=lambda x: f"{x:.4g}") + "\n" + "\n".join(lines)
    return common.Report(text=text, extra={"summary": table.to_dict(orient="records"), "summary_note": head,
                                           "engines": contrast})


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return common.run_study(NAME, DEFAULTS, lambda cfg: distill_tiny._with_seconds(*compute(cfg)),
                            distill_tiny.figure, report=report, quick=quick, out_dir=out_dir, config=config,
                            plot=plot)


if __name__ == "__main__":
    common.main(run, __doc__)
