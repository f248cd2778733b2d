"""Study 2: exact total variance of the estimators as one knob at a time moves.

Base tree make_tree(V=4, H=3, divergence=1, temperature=1, coupling=0.5); one
sweep each over divergence, teacher temperature, vocabulary size and horizon.
Token family: opd, vopd, vopd_topk (k = V/4, at least 1), full_kl, opd_bstar;
sequence family: rtg, rtg_vopd, rb_seq. Variance is tr Cov of one sequence's
gradient in logit space, averaged over seeds.
"""

from __future__ import annotations

import pandas as pd

from synthetic.tree import make_tree
from vopd_analysis.tabular.enumeration import exact_moments
from vopd_analysis.tabular.targets import tree_quantities

from . import common

NAME = "variance_landscape"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
TOKEN = ["opd", "vopd", "vopd_topk", "full_kl", "opd_bstar"]
SEQUENCE = ["rtg", "rtg_vopd", "rb_seq"]
BASE = {"vocab": 4, "horizon": 3, "divergence": 1.0, "teacher_temperature": 1.0, "coupling": 0.5}
DEFAULTS = {
    "quick": {"seeds": [0, 1], "base": BASE, "sweeps": {
        "divergence": [0.1, 0.3, 1.0, 2.0, 4.0],
        "teacher_temperature": [0.25, 0.5, 1.0, 2.0, 4.0],
        "vocab": [2, 4, 8, 16, 32],
        "horizon": [1, 2, 3, 4, 5, 6]}},
    "full": {"seeds": [0, 1, 2, 3, 4], "base": BASE, "sweeps": {
        "divergence": [0.05, 0.1, 0.2, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0],
        "teacher_temperature": [0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0],
        "vocab": [2, 3, 4, 6, 8, 12, 16, 24, 32],
        "horizon": [1, 2, 3, 4, 5, 6, 7]}},
}


def variances(knobs: dict, seed: int) -> dict:
    vocab, horizon = knobs["vocab"], knobs["horizon"]
    tree = make_tree(vocab, horizon, divergence=knobs["divergence"],
                     teacher_temperature=knobs["teacher_temperature"], coupling=knobs["coupling"], seed=seed)
    specs = {name: {"name": name} for name in TOKEN + SEQUENCE}
    specs["vopd_topk"]["k"] = max(1, vocab // 4)
    tq = tree_quantities(tree)
    moments = exact_moments(tree, specs, quantities=tq)
    return {name: m.total_variance for name, m in moments.items()}, tq.sequence_kl


def compute(config: dict) -> pd.DataFrame:
    rows = []
    for knob, values in config["sweeps"].items():
        for value in values:
            knobs = {**config["base"], knob: value}
            for seed in config["seeds"]:
                var, J = variances(knobs, seed)
                for name, v in var.items():
                    rows.append({"knob": knob, "value": value, "seed": seed, "estimator": name,
                                 "family": "token" if name in TOKEN else "sequence", "J": J,
                                 "total_variance": v, "ratio_to_opd": v / var["opd"]})
    return pd.DataFrame(rows)


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Mean over seeds of var(vopd)/var(opd) and var(full_kl)/var(vopd) at each knob value."""
    order = {k: i for i, k in enumerate(dict.fromkeys(df["knob"]))}
    mean = df.groupby(["knob", "value", "estimator"])["total_variance"].mean().unstack()
    mean = mean.sort_index(key=lambda idx: idx.map(order) if idx.name == "knob" else idx)
    return pd.DataFrame({"vopd_over_opd": mean["vopd"] / mean["opd"],
                         "full_kl_over_vopd": mean["full_kl"] / mean["vopd"],
                         "bstar_over_opd": mean["opd_bstar"] / mean["opd"],
                         "rtg_vopd_over_rtg": mean["rtg_vopd"] / mean["rtg"]}).reset_index()


def figure(df: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns
    knobs = list(dict.fromkeys(df["knob"]))
    fig, axes = plt.subplots(2, len(knobs), figsize=(4.2 * len(knobs), 7.5), sharey="row")
    palette = dict(zip(TOKEN + SEQUENCE, sns.color_palette("tab10", len(TOKEN + SEQUENCE))))
    dashes = {n: "" if n in TOKEN else (4, 2) for n in TOKEN + SEQUENCE}
    for j, knob in enumerate(knobs):
        sub = df[df["knob"] == knob]
        for i, y in enumerate(["total_variance", "ratio_to_opd"]):
            ax = axes[i, j]
            sns.lineplot(sub, x="value", y=y, hue="estimator", style="estimator", palette=palette,
                         dashes=dashes, markers=True, errorbar=("pi", 100), ax=ax,
                         legend=(i == 0 and j == len(knobs) - 1))
            ax.set_yscale("log")
            if knob in ("divergence", "teacher_temperature", "vocab"):
                ax.set_xscale("log", base=2)
            ax.set_xlabel(knob)
            ax.set_ylabel("tr Cov (one sequence)" if y == "total_variance" else "variance / opd variance")
        axes[0, j].set_title(f"sweep: {knob}")
    axes[1, 0].axhline(1.0, color="grey", lw=0.8)
    sns.move_legend(axes[0, -1], "upper left", bbox_to_anchor=(1.02, 1))
    fig.tight_layout()
    return fig


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return common.run_study(NAME, DEFAULTS, compute, figure, report=common.summary_report(summary, 3),
                            quick=quick, out_dir=out_dir, config=config, plot=plot)


if __name__ == "__main__":
    common.main(run, __doc__)
