"""Distilling the tiny addition student with each estimator (vopd_analysis.distill), over paired seeds.

The tiny preset: the committed pair (``vopd_analysis.lm.tiny``), a Qwen2 teacher trained
in-project on 3-digit addition with written carries, and a smaller, briefly trained student.
Each estimator runs the same on-policy loop from the same student; seed s gives every
estimator the same training prompts and the same evaluation set (seeds are paired across
estimators). The held-out greedy accuracy and the exact sequence reverse KL of student
samples are recorded every ``eval_every`` steps.

Reported per estimator, over seeds: the final accuracy and reverse KL (mean, 95% t-interval),
the paired difference to opd on the same seeds (mean, 95% t-interval, paired t-test p-value),
and the number of steps to reach ``kl_threshold`` nats (first evaluation at or below it).
Quick mode (2 seeds, 100 steps) only checks that the pipeline works: it is underpowered and
decides nothing. Full mode: 10 seeds, 400 steps of 16 prompts x 4 rollouts at lr 1e-3 (a pilot at
lr 3e-4 was still far from converged after 500 steps); ``jobs`` runs in parallel processes and
``work_dir`` keeps the runs, so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import json
import multiprocessing
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from vopd_analysis import stats
from vopd_analysis.distill.command import run as distill
from vopd_analysis.distill.config import DistillConfig
from vopd_analysis.lm.presets import PRESETS

from . import common

NAME = "distill_tiny"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
ESTIMATORS = {"opd": {}, "vopd": {}, "vopd_topk": {"k": 4}, "full_kl": {}, "topk_kl": {"k": 4}}
LOOP = {"lr": 3e-4, "prompts_per_step": 32, "rollouts_per_prompt": 4}
DEFAULTS = {
    "quick": {"estimators": ESTIMATORS, "seeds": [0, 1], "steps": 100, "eval_every": 25, "num_eval": 100,
              "kl_threshold": 7.5, "jobs": 1, "work_dir": None, **LOOP},
    "full": {"estimators": ESTIMATORS, "seeds": list(range(10)), "steps": 400, "eval_every": 50, "num_eval": 200,
             "kl_threshold": 4.0, "jobs": 2, "work_dir": "runs/distill_tiny_full", **LOOP,
             "lr": 1e-3, "prompts_per_step": 16},
}
REFERENCE = "opd"
# eval metrics kept in the table: column -> (short name in the summary, axis label)
METRICS = {"eval_accuracy": ("acc", "held-out greedy accuracy"),
           "eval_reverse_kl": ("kl", "sequence reverse KL (nats)")}


def run_config(config: dict, name: str, params: dict, seed: int, work: str) -> DistillConfig:
    """One run's config; ``config["engine"]`` (default builtin) picks the loop, and a non-builtin
    engine's runs get their own folders (``trl-vopd-seed0``)."""
    engine = config.get("engine", "builtin")
    folder = f"{name}-seed{seed}" if engine == "builtin" else f"{engine}-{name}-seed{seed}"
    return DistillConfig(preset=config.get("preset", "tiny"), estimator=name, estimator_params=dict(params), seed=seed,
                         engine=engine,
                         steps=config["steps"], eval_every=config["eval_every"], num_eval=config["num_eval"],
                         lr=config["lr"], prompts_per_step=config["prompts_per_step"],
                         rollouts_per_prompt=config["rollouts_per_prompt"], save_every=config.get("save_every", 50),
                         keep_checkpoints=1, num_threads=1, out_dir=f"{work}/{folder}")


def one_run(cfg: DistillConfig) -> list:
    """The metrics rows of one finished run: read back if ``out_dir/final`` exists, else trained
    (resuming from the run's last checkpoint if it was interrupted)."""
    out = Path(cfg.out_dir)
    if (out / "final").is_dir():
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return distill(cfg, resume=(out / "config.json").exists())["rows"]


def run_table(rows: list, name: str, seed: int, metrics=tuple(METRICS)) -> tuple:
    """(eval rows tagged with estimator and seed, training wall seconds)."""
    rows = pd.DataFrame(rows)
    train = rows[rows["kind"] == "train"]
    evals = rows[rows["kind"] == "eval"][["step", *metrics]]
    seconds = float((train["time_rollout"] + train["time_teacher"] + train["time_student"]).sum())
    return evals.assign(estimator=name, seed=seed), seconds


def compute(config: dict) -> tuple:
    """One distillation run per (estimator, seed): (eval rows, training wall seconds per run).

    Wall times are kept out of the table so that a second run with the same seeds
    writes an identical CSV; they go to the manifest.
    """
    plan = list(itertools.product(config["estimators"].items(), config["seeds"]))
    with tempfile.TemporaryDirectory() as tmp:
        work = config.get("work_dir") or tmp
        cfgs = [run_config(config, name, params, seed, work) for (name, params), seed in plan]
        if config.get("jobs", 1) > 1:
            context = multiprocessing.get_context("spawn")
            with concurrent.futures.ProcessPoolExecutor(config["jobs"], mp_context=context) as pool:
                results = list(pool.map(one_run, cfgs))
        else:
            results = [one_run(cfg) for cfg in cfgs]
    frames, seconds, metrics = [], {}, config.get("metrics", list(METRICS))
    for ((name, _), seed), rows in zip(plan, results):
        evals, seconds[f"{name}/seed{seed}"] = run_table(rows, name, seed, metrics)
        frames.append(evals)
    table = pd.concat(frames, ignore_index=True)[["estimator", "seed", "step", *metrics]]
    return table, seconds


def steps_to_threshold(curve: pd.DataFrame, threshold: float) -> float:
    """First evaluation step whose reverse KL is at or below ``threshold`` (NaN if never)."""
    hit = curve[curve["eval_reverse_kl"] <= threshold]
    return float(hit["step"].min()) if len(hit) else float("nan")


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The evaluations at the last step, indexed by (estimator, seed)."""
    return df[df["step"] == df["step"].max()].set_index(["estimator", "seed"])


def paired_finals(last: pd.DataFrame, name: str, reference: str, metric: str) -> tuple:
    """(``name``'s, ``reference``'s) final ``metric`` on the seeds both have, in the same order (``last``:
    ``final_rows``), for a paired difference ``name`` - ``reference``."""
    seeds = last.loc[name].index.intersection(last.loc[reference].index)
    return last.loc[name].loc[seeds, metric], last.loc[reference].loc[seeds, metric]


def summary(df: pd.DataFrame, threshold: float, reference: str = REFERENCE, metrics: dict = METRICS) -> pd.DataFrame:
    """Per estimator over seeds: start and final value of each metric (mean, 95% t-interval), the paired
    difference of the final values to ``reference`` (mean, interval, p-value), and steps to ``threshold``."""
    metrics = {m: v for m, v in metrics.items() if m in df}
    last = final_rows(df)
    first = df[df["step"] == 0].set_index(["estimator", "seed"])
    reach = {key: steps_to_threshold(g, threshold) for key, g in df.groupby(["estimator", "seed"])}
    out = []
    for name in dict.fromkeys(df["estimator"]):
        row = {"estimator": name, "seeds": int(len(last.loc[name])),
               **{f"{short}_start": float(first.loc[name, m].mean()) for m, (short, _) in metrics.items()}}
        for metric, (short, _) in metrics.items():
            mean, low, high = stats.mean_interval(last.loc[name, metric])
            row.update({f"{short}_end": mean, f"{short}_end_low": low, f"{short}_end_high": high})
            if reference in last.index.get_level_values(0) and name != reference:
                d = stats.paired_difference(*paired_finals(last, name, reference, metric))
                row.update({f"{short}_diff": d["mean"], f"{short}_diff_low": d["low"], f"{short}_diff_high": d["high"],
                            f"{short}_diff_p": d["p_value"]})
        steps = np.array([reach[(name, s)] for s in last.loc[name].index])
        mean, low, high = stats.mean_interval(steps)
        row.update({"reached": int(np.isfinite(steps).sum()), "steps_to_kl": mean, "steps_to_kl_low": low,
                    "steps_to_kl_high": high})
        out.append(row)
    return pd.DataFrame(out)


def detectable_differences(df: pd.DataFrame, reference: str, metrics: dict = METRICS, column="mde_{short}") -> pd.DataFrame:
    """Per estimator other than ``reference``: the smallest paired difference of each final metric to
    ``reference`` that the seeds could detect (``stats.detectable_difference``: 80% power at the 5% level
    for the observed spread of the paired differences), in the columns ``column.format(short=...)``."""
    last = final_rows(df)
    names = [column.format(short=short) for short, _ in metrics.values()]
    rows = []
    for name in dict.fromkeys(df["estimator"]):
        if name == reference:
            continue
        row = {"estimator": name}
        for col, metric in zip(names, metrics):
            mine, theirs = paired_finals(last, name, reference, metric)
            row[col] = stats.detectable_difference(mine - theirs)
        rows.append(row)
    return pd.DataFrame(rows, columns=["estimator", *names])


def differences_to(df: pd.DataFrame, reference: str, metrics: dict = METRICS) -> pd.DataFrame:
    """Per estimator: the paired difference of each final metric to ``reference`` (estimator - reference on
    the same seeds; mean, 95% t-interval, paired t-test p-value) and its detectable size, in the columns
    ``<short>_minus_<reference>``, ``_low``, ``_high``, ``_p`` and ``_mde`` (NaN for the reference)."""
    metrics = {m: v for m, v in metrics.items() if m in df}
    last, rows = final_rows(df), []
    for name in dict.fromkeys(df["estimator"]):
        row = {"estimator": name}
        for metric, (short, _) in metrics.items():
            d = (stats.paired_difference(*paired_finals(last, name, reference, metric)) if name != reference
                 else dict.fromkeys(("mean", "low", "high", "p_value"), float("nan")))
            col = f"{short}_minus_{reference}"
            row.update({col: d["mean"], f"{col}_low": d["low"], f"{col}_high": d["high"], f"{col}_p": d["p_value"]})
        rows.append(row)
    return pd.DataFrame(rows).merge(detectable_differences(df, reference, metrics, f"{{short}}_minus_{reference}_mde"),
                                    on="estimator", how="left")


def report(df: pd.DataFrame, config: dict, metrics: dict = METRICS) -> common.Report:
    table = summary(df, config["kl_threshold"], metrics=metrics)
    head = (f"{df['seed'].nunique()} paired seeds, {df['step'].max()} steps; differences are estimator - {REFERENCE} "
            f"on the same seeds; steps_to_kl: first evaluation with reverse KL <= {config['kl_threshold']} nats")
    if df["seed"].nunique() < 5:
        head += "\nUNDERPOWERED: fewer than 5 paired seeds; a difference is decided only where its interval excludes 0 (mde_*: what 80% power would detect)"
    text = head + "\n" + table.to_string(index=False, float_format=lambda x: f"{x:.4g}")
    return common.Report(text=text, extra={"summary": table.to_dict(orient="records"), "summary_note": head})


def figure(df: pd.DataFrame, metrics: dict = METRICS):
    """Each metric against step: mean over seeds with a 95% bootstrap band."""
    import matplotlib.pyplot as plt
    import seaborn as sns
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (col, (_, label)) in zip(axes, metrics.items()):
        sns.lineplot(df, x="step", y=col, hue="estimator", errorbar=("ci", 95), seed=0, n_boot=200, marker="o", ax=ax)
        ax.set_ylabel(label)
        ax.set_title(f"{label} (mean, 95% interval, {df['seed'].nunique()} seeds)")
    if "eval_reverse_kl" == list(metrics)[1]:
        axes[1].set_yscale("log")
    axes[0].get_legend().remove()
    sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    return fig


def _with_seconds(table: pd.DataFrame, seconds: dict, preset: str = "tiny") -> tuple:
    """compute's (table, seconds) as run_study's (table, manifest entries: the models' hashes, the machine)."""
    student, teacher = PRESETS[preset].sources(None, False)
    return table, {"train_seconds": seconds, "machine": common.machine(),
                   "weights": common.weights_sha256({"student": student, "teacher": teacher})}


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return common.run_study(NAME, DEFAULTS, lambda cfg: _with_seconds(*compute(cfg)), figure,
                            report=report, quick=quick, out_dir=out_dir, config=config,
                            plot=plot)


if __name__ == "__main__":
    common.main(run, __doc__)
