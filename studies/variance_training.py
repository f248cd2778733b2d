"""Gradient variance of the estimators along training: checkpoints of distillation runs, probed.

Each estimator in ``runs`` trains the committed tiny student (``vopd distill --preset tiny``,
checkpoints every ``checkpoint_every`` steps, all kept). At step 0 (the starting student) and
at every checkpoint, every estimator in ``probe`` is probed on the same rollouts, over
``num_batches`` independent prompt batches, exactly as in ``llm_variance``: the ratio
var(estimator)/var(opd) within each batch, then its geometric mean over batches with a 95% interval.
This is the real-model counterpart of the vOPD paper's variance-over-training evidence.

Quick mode: one vopd run of 200 steps, 4 checkpoints, 4 batches (a smoke run; the intervals
are wide). Full mode: the runs of opd, vopd and full_kl with distill_tiny's full-mode training
(400 steps of 16 prompts x 4 rollouts at lr 1e-3), 8 batches.

    python -m studies.variance_training [--quick]
"""

from __future__ import annotations

import tempfile

import pandas as pd

from vopd_analysis.distill import checkpoint as ckpt
from vopd_analysis.distill.command import run as distill
from vopd_analysis.distill.config import DistillConfig
from vopd_analysis.lm import loading, tiny

from . import common, llm_variance

NAME = "variance_training"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
# the estimators of the committed tables (llm_variance.ESTIMATORS has grown since)
PROBE = {"pair": "tiny", "num_prompts": 4, "num_rollouts": 8, "max_new_tokens": 8,
         "estimators": ["opd", "vopd", "vopd_topk", "full_kl", "topk_kl"],
         "topk": 4, "num_projections": 0, "seed": 0}
LOOP = {"lr": 3e-4, "prompts_per_step": 32, "rollouts_per_prompt": 4}
DEFAULTS = {
    "quick": {"runs": {"vopd": {}}, "steps": 200, "checkpoint_every": 50, "num_batches": 4, "seed": 0,
              "probe": PROBE, **LOOP},
    "full": {"runs": {"opd": {}, "vopd": {}, "full_kl": {}}, "steps": 400, "checkpoint_every": 100,
             "num_batches": 8, "seed": 0, "probe": PROBE, **LOOP, "lr": 1e-3, "prompts_per_step": 16},
}


def train(config: dict, name: str, params: dict, out_dir: str) -> list:
    """Train one run with every checkpoint kept; return [(step, student directory)] from step 0."""
    distill(DistillConfig(preset="tiny", estimator=name, estimator_params=dict(params), seed=config["seed"],
                          steps=config["steps"], eval_every=0, save_every=config["checkpoint_every"],
                          keep_checkpoints=0, lr=config["lr"], prompts_per_step=config["prompts_per_step"],
                          rollouts_per_prompt=config["rollouts_per_prompt"], num_threads=1, out_dir=out_dir))
    start, _, _ = tiny.load_or_train_pair(verbose=False)
    return [(0, start)] + [(int(d.name.split("-")[1]), str(d / "model")) for d in ckpt.checkpoint_dirs(out_dir)]


def probe_checkpoint(student: str, teacher: str, config: dict) -> pd.DataFrame:
    """Every probed estimator's per-batch variance ratio to opd at one checkpoint."""
    pair = loading.load_pair(student, teacher)
    probe = {**config["probe"], "num_batches": config["num_batches"]}
    return pd.concat([llm_variance.probe_batch(pair, probe, b)[0] for b in range(config["num_batches"])],
                     ignore_index=True)


def compute(config: dict) -> tuple:
    """(table: one row per run, step and probed estimator with the ratio's interval, per-batch rows)."""
    _, teacher, _ = tiny.load_or_train_pair(verbose=False)
    rows, batches = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for name, params in config["runs"].items():
            for step, student in train(config, name, params, f"{tmp}/{name}"):
                per_batch = probe_checkpoint(student, teacher, config).assign(run=name, step=step)
                batches.append(per_batch[["run", "step", "batch", "estimator", "trace_cov", "variance_ratio_to_opd"]])
                summary = llm_variance.summarise(per_batch)
                rows.append(summary.assign(run=name, step=step))
    table = pd.concat(rows, ignore_index=True)
    cols = ["run", "step", "estimator", "batches", "ratio_gmean", "ratio_low", "ratio_high", "ratio_p_value",
            "batches_below_1", "trace_cov_mean", "trace_cov_low", "trace_cov_high"]
    per_batch = pd.concat(batches, ignore_index=True)
    return table[cols], {"per_batch": per_batch.to_dict(orient="list"), "machine": common.machine(),
                         "weights": common.weights_sha256({"teacher": teacher})}


def figure(df: pd.DataFrame):
    """Variance ratio to opd against training step, one panel per run, 95% bands over batches."""
    import matplotlib.pyplot as plt
    runs = list(dict.fromkeys(df["run"]))
    fig, axes = plt.subplots(1, len(runs), figsize=(5.5 * len(runs), 4), squeeze=False, sharey=True)
    for ax, name in zip(axes[0], runs):
        for i, (est, g) in enumerate(df[(df["run"] == name) & (df["estimator"] != "opd")].groupby("estimator",
                                                                                                  sort=False)):
            ax.plot(g["step"], g["ratio_gmean"], marker="o", color=f"C{i}", label=est)
            ax.fill_between(g["step"], g["ratio_low"], g["ratio_high"], color=f"C{i}", alpha=0.2)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_xlabel(f"training step of the {name} run")
        ax.set_title(f"checkpoints of the {name} run")
    axes[0][0].set_ylabel("tr Cov / tr Cov(opd), same rollouts (95% band)")
    axes[0][-1].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return common.run_study(NAME, DEFAULTS, compute, figure,
                            report=common.summary_report(lambda df: df[df["estimator"] != "opd"], 4),
                            quick=quick, out_dir=out_dir, config=config, plot=plot, seed="seed")


if __name__ == "__main__":
    common.main(run, __doc__)
