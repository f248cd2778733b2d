"""Study 6: SGD on a tabular student with each estimator (vopd_analysis.tabular.training).

Zipf-teacher tree make_tree(8, 3, zipf, coupling=0.5); theta = the student logit
table; a fixed number of sampled sequences per step; a grid of learning rates
and several seeds. Reports the exact sequence reverse KL J over steps, the
largest learning rate at which every seed stays stable (J finite, never above
1.5 x J0, and ending below J0), and the final J per estimator and learning rate.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from synthetic.tree import make_tree
from vopd_analysis.tabular.training import train

from . import common

NAME = "training_dynamics"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
ESTIMATORS = {"opd": {}, "vopd": {}, "vopd_topk": {"k": 2}, "full_kl": {}, "topk_kl": {"k": 2}, "rtg": {},
              "rtg_vopd": {}}
TREE = {"vocab": 8, "horizon": 3, "teacher_shape": "zipf", "coupling": 0.5, "divergence": 1.0, "seed": 0}
DEFAULTS = {
    "quick": {"tree": TREE, "estimators": ESTIMATORS, "lrs": [0.3, 1.0, 3.0, 10.0, 30.0], "steps": 100,
              "batch_size": 8, "seeds": [0, 1, 2], "eval_every": 5, "diverge_factor": 1.5},
    "full": {"tree": TREE, "estimators": ESTIMATORS, "lrs": [0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0], "steps": 500,
             "batch_size": 8, "seeds": [0, 1, 2, 3, 4, 5, 6, 7], "eval_every": 5, "diverge_factor": 1.5},
}


def compute(config: dict) -> pd.DataFrame:
    t = config["tree"]
    tree = make_tree(t["vocab"], t["horizon"], teacher_shape=t["teacher_shape"], coupling=t["coupling"],
                     divergence=t["divergence"], seed=t["seed"])
    frames = []
    for (name, params), lr, seed in itertools.product(config["estimators"].items(), config["lrs"], config["seeds"]):
        r = train(tree, name, lr, config["steps"], config["batch_size"], seed, eval_every=config["eval_every"],
                  diverge_factor=config["diverge_factor"], **params)
        frames.append(r.curve.assign(estimator=name, lr=lr, seed=seed, stable=r.stable))
    return pd.concat(frames, ignore_index=True)[["estimator", "lr", "seed", "step", "J", "stable"]]


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per estimator: largest lr stable for every seed, final J there, and the best final J over lrs."""
    last = df[df["step"] == df["step"].max()]
    per_lr = last.groupby(["estimator", "lr"], sort=False).agg(stable=("stable", "all"), final_J=("J", "mean"),
                                                               final_J_sd=("J", "std")).reset_index()
    rows = []
    for name, g in per_lr.groupby("estimator", sort=False):
        ok = g[g["stable"]]
        top = ok.loc[ok["lr"].idxmax()] if len(ok) else None
        best = ok.loc[ok["final_J"].idxmin()] if len(ok) else None
        rows.append({"estimator": name, "largest_stable_lr": top["lr"] if top is not None else np.nan,
                     "final_J_at_largest": top["final_J"] if top is not None else np.nan,
                     "best_lr": best["lr"] if best is not None else np.nan,
                     "best_final_J": best["final_J"] if best is not None else np.nan,
                     "best_final_J_sd": best["final_J_sd"] if best is not None else np.nan})
    return pd.DataFrame(rows)


def figure(df: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns
    lrs = sorted(df["lr"].unique())
    ncols = 3
    nrows = int(np.ceil((len(lrs) + 1) / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.8 * nrows), squeeze=False)
    axes = axes.ravel()
    palette = dict(zip(df["estimator"].unique(), sns.color_palette("tab10")))
    for ax, lr in zip(axes, lrs):
        sns.lineplot(df[df["lr"] == lr], x="step", y="J", hue="estimator", palette=palette, errorbar=("pi", 100),
                     ax=ax, legend=False)
        ax.set_yscale("log")
        ax.set_title(f"lr = {lr:g} (band: min-max over seeds)")
        ax.set_ylabel("exact sequence KL J")
    ax = axes[len(lrs)]
    last = df[df["step"] == df["step"].max()]
    final = last.groupby(["estimator", "lr"], sort=False).agg(J=("J", "mean"), stable=("stable", "all")).reset_index()
    final.loc[~final["stable"], "J"] = np.nan
    sns.lineplot(final, x="lr", y="J", hue="estimator", palette=palette, marker="o", ax=ax)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title("final J vs lr (missing = unstable)")
    sns.move_legend(ax, "upper left", bbox_to_anchor=(1.02, 1))
    for extra in axes[len(lrs) + 1:]:
        extra.set_visible(False)
    fig.tight_layout()
    return fig


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return common.run_study(NAME, DEFAULTS, compute, figure, report=common.summary_report(summary, 4),
                            quick=quick, out_dir=out_dir, config=config, plot=plot)


if __name__ == "__main__":
    common.main(run, __doc__)
