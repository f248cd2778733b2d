"""Distilling the tiny addition student with each estimator (vopd_analysis.distill).

The tiny preset (``vopd_analysis.tiny``): a Qwen2 teacher trained in-project to ~100%
on 3-digit addition with written carries, and a smaller, briefly trained student. Each
estimator runs the same on-policy loop (same rollout seeds per seed, same learning rate)
for a few seeds; the held-out greedy accuracy and the exact sequence reverse KL of
student samples are recorded over steps. The figure shows mean +- sd across seeds.
"""

from __future__ import annotations

import itertools
import tempfile

import pandas as pd

from vopd_analysis.distill.loop import DistillConfig, run as distill

from . import common

NAME = "distill_tiny"
ESTIMATORS = {"opd": {}, "vopd": {}, "vopd_topk": {"k": 4}, "full_kl": {}, "topk_kl": {"k": 4}}
LOOP = {"lr": 3e-4, "prompts_per_step": 32, "rollouts_per_prompt": 4}
DEFAULTS = {
    "quick": {"estimators": ESTIMATORS, "seeds": [0, 1], "steps": 100, "eval_every": 25, "num_eval": 100, **LOOP},
    "full": {"estimators": ESTIMATORS, "seeds": [0, 1, 2, 3, 4], "steps": 500, "eval_every": 50, "num_eval": 500,
             **LOOP},
}


def compute(config: dict) -> tuple:
    """One distillation run per (estimator, seed): (eval rows, training wall seconds per run).

    Wall times are kept out of the table so that a second run with the same seeds
    writes an identical CSV; they go to the manifest.
    """
    frames, seconds = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for (name, params), seed in itertools.product(config["estimators"].items(), config["seeds"]):
            cfg = DistillConfig(preset="tiny", estimator=name, estimator_params=dict(params), seed=seed,
                                steps=config["steps"], eval_every=config["eval_every"], num_eval=config["num_eval"],
                                lr=config["lr"], prompts_per_step=config["prompts_per_step"],
                                rollouts_per_prompt=config["rollouts_per_prompt"], save_every=0,
                                out_dir=f"{tmp}/{name}-{seed}")
            rows = pd.DataFrame(distill(cfg)["rows"])
            train = rows[rows["kind"] == "train"]
            evals = rows[rows["kind"] == "eval"][["step", "eval_accuracy", "eval_reverse_kl"]]
            frames.append(evals.assign(estimator=name, seed=seed))
            seconds[f"{name}/seed{seed}"] = float((train["time_rollout"] + train["time_teacher"]
                                                   + train["time_student"]).sum())
    table = pd.concat(frames, ignore_index=True)[["estimator", "seed", "step", "eval_accuracy", "eval_reverse_kl"]]
    return table, seconds


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per estimator: accuracy and reverse KL at step 0 and at the last step (mean, sd over seeds)."""
    first, last = df[df["step"] == 0], df[df["step"] == df["step"].max()]
    out = []
    for name, g in last.groupby("estimator", sort=False):
        f = first[first["estimator"] == name]
        out.append({"estimator": name, "acc_start": f["eval_accuracy"].mean(), "acc_end": g["eval_accuracy"].mean(),
                    "acc_end_sd": g["eval_accuracy"].std(), "kl_start": f["eval_reverse_kl"].mean(),
                    "kl_end": g["eval_reverse_kl"].mean(), "kl_end_sd": g["eval_reverse_kl"].std()})
    return pd.DataFrame(out)


def figure(df: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (col, label) in zip(axes, [("eval_accuracy", "held-out greedy accuracy"),
                                       ("eval_reverse_kl", "sequence reverse KL (nats)")]):
        sns.lineplot(df, x="step", y=col, hue="estimator", errorbar="sd", marker="o", ax=ax)
        ax.set_ylabel(label)
        ax.set_title(f"{label} (mean ± sd over {df['seed'].nunique()} seeds)")
    axes[1].set_yscale("log")
    axes[0].get_legend().remove()
    sns.move_legend(axes[1], "upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    return fig


def _with_seconds(table: pd.DataFrame, seconds: dict) -> tuple:
    """compute's (table, seconds) as run_study's (table, manifest entries)."""
    return table, {"train_seconds": seconds}


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return common.run_study(NAME, DEFAULTS, lambda cfg: _with_seconds(*compute(cfg)), figure,
                            report=common.summary_report(summary, 4), quick=quick, out_dir=out_dir, config=config,
                            plot=plot)


if __name__ == "__main__":
    common.main(run, __doc__)
