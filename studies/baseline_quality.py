"""Study 3: how good is vOPD's closed-form baseline KL_t(s_t)?

For the per-token estimator sum_t (l_t - b(s_t)) S_t the logit-space trace
variance is a quadratic in the baseline (vopd_analysis/baselines.py):

    var(b) = var(b*) + sum_s d(s) E|S|^2 (b(s) - b*(s))^2,   E|S|^2 = sum_y q_y |e_y - q|^2,

so b = KL_s lowers the variance of b = 0 exactly when, on average over states
weighted by d(s) E|S|^2, KL_s is closer to b*(s) than 0 is. Over a grid of
trees: variance with no baseline, with KL_s, with b*; reduction ratio and
explained variance; and a per-state decomposition of a counterexample in which
the closed-form baseline increases the variance.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from synthetic.tree import make_tree
from vopd_analysis import divergences as dv
from vopd_analysis.tabular.baseline_quality import baseline_quality, optimal_baseline
from vopd_analysis.tabular.targets import tree_quantities

from . import common

NAME = "baseline_quality"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
COUNTEREXAMPLE = {"vocab": 3, "horizon": 3, "coupling": 1.0, "seed": 1}
DEFAULTS = {
    "quick": {"vocab": [3, 8, 32], "horizon": [3], "divergence": [0.25, 0.5, 1.0, 2.0, 4.0],
              "teacher_temperature": [0.5, 1.0, 2.0], "coupling": [0.0, 1.0],
              "teacher_shape": ["gaussian", "zipf"], "seeds": [0, 1, 2], "counterexample": COUNTEREXAMPLE},
    "full": {"vocab": [3, 4, 8, 16, 32, 64], "horizon": [2, 3], "divergence": [0.1, 0.25, 0.5, 1.0, 2.0, 4.0],
             "teacher_temperature": [0.25, 0.5, 1.0, 2.0, 4.0], "coupling": [0.0, 0.5, 1.0, 2.0],
             "teacher_shape": ["gaussian", "zipf"], "seeds": list(range(10)), "counterexample": COUNTEREXAMPLE},
}


def compute(config: dict) -> pd.DataFrame:
    rows = []
    grid = itertools.product(config["vocab"], config["horizon"], config["divergence"],
                             config["teacher_temperature"], config["coupling"], config["teacher_shape"],
                             config["seeds"])
    for V, H, div, temp, kappa, shape, seed in grid:
        tree = make_tree(V, H, divergence=div, teacher_temperature=temp, coupling=kappa,
                         teacher_shape=shape, seed=seed)
        q = baseline_quality(tree)
        rows.append({"vocab": V, "horizon": H, "divergence": div, "teacher_temperature": temp,
                     "coupling": kappa, "teacher_shape": shape, "seed": seed,
                     "var_none": q["var_no_baseline"], "var_vopd": q["var_baseline"], "var_bstar": q["var_optimal"],
                     "reduction_ratio": q["reduction_ratio"], "bstar_ratio": q["var_optimal"] / q["var_no_baseline"],
                     "explained_variance": q["explained_variance"], "gap_to_optimal": q["gap_to_optimal"],
                     "vopd_increases": q["var_baseline"] > q["var_no_baseline"]})
    return pd.DataFrame(rows)


def per_state(vocab: int, horizon: int, coupling: float, seed: int) -> pd.DataFrame:
    """Per-state terms of var(b) - var(b*) = sum_s d(s) E|S|^2 (b - b*)^2 for b = 0 and b = KL."""
    tree = make_tree(vocab, horizon, coupling=coupling, seed=seed)
    tq = tree_quantities(tree)
    q = tq.log_q.exp()
    w = dv.logit_score_weights(q).sum(-1)  # E|S|^2 = sum_y q_y |e_y - q|^2 per state
    bstar = optimal_baseline(tq)
    weight = tq.reach * w
    df = pd.DataFrame({"state": np.arange(tree.num_states), "reach": tq.reach.numpy(), "E_score_sq": w.numpy(),
                       "kl": tq.kl.numpy(), "bstar": bstar.numpy(), "q_max": q.max(-1).values.numpy(),
                       "gap_none": (weight * bstar ** 2).numpy(), "gap_vopd": (weight * (tq.kl - bstar) ** 2).numpy()})
    df["vopd_minus_none"] = df["gap_vopd"] - df["gap_none"]
    return df


def explain(states: pd.DataFrame, quality: dict, spec: dict) -> str:
    worst = states.sort_values("vopd_minus_none", ascending=False).head(3)
    lines = ["# Baseline quality: why vOPD's baseline can increase the variance\n",
             f"Tree make_tree({spec['vocab']}, {spec['horizon']}, coupling={spec['coupling']}, seed={spec['seed']}): "
             f"var(b=0) = {quality['var_no_baseline']:.4g}, var(b=KL) = {quality['var_baseline']:.4g}, "
             f"var(b*) = {quality['var_optimal']:.4g}.\n",
             "The variance is quadratic in the baseline: var(b) = var(b*) + sum_s d(s) E|S|^2 (b(s) - b*(s))^2. "
             f"Summed over states, the distance term is {states['gap_none'].sum():.4g} for b = 0 and "
             f"{states['gap_vopd'].sum():.4g} for b = KL (difference {states['vopd_minus_none'].sum():.4g} = "
             f"var(KL) - var(0) = {quality['var_baseline'] - quality['var_no_baseline']:.4g}).\n",
             "b*(s) averages l_y with weights q_y |e_y - q|^2, which vanish on the token the student is sure of "
             "(|e_y - q|^2 -> 0 as q_y -> 1); KL_s averages l_y with weights q_y, dominated by that token. When the "
             "student's confident token has a positive log-ratio and its rare tokens have negative ones, KL_s > 0 "
             "while b*(s) <= 0, and KL_s is farther from b* than 0. The states that cost most:\n",
             common.markdown_table(worst.round(4))]
    return "\n".join(lines)


def figure(df: pd.DataFrame, states: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    sns.scatterplot(df, x="bstar_ratio", y="reduction_ratio", hue="divergence", style="teacher_shape",
                    palette="viridis", ax=ax, s=18, alpha=0.7)
    ax.axhline(1, color="red", lw=0.8)
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("var(b*) / var(b=0)")
    ax.set_ylabel("var(b=KL) / var(b=0)")
    ax.set_title(f"vOPD increases variance in {df['vopd_increases'].mean():.0%} of {len(df)} trees")
    ax = axes[1]
    sns.boxplot(df, x="divergence", y="explained_variance", hue="vocab", ax=ax, fliersize=1.5, palette="crest")
    ax.axhline(0, color="red", lw=0.8)
    ax.axhline(1, color="grey", lw=0.8, ls="--")
    ax.set_ylim(max(-3, df["explained_variance"].min() - 0.1), 1.1)
    ax.set_ylabel("explained variance (var0 - varKL) / (var0 - var*)")
    ax.set_title("share of the optimal reduction vOPD achieves")
    ax = axes[2]
    long = states.melt(id_vars="state", value_vars=["gap_none", "gap_vopd"], var_name="baseline", value_name="term")
    long["baseline"] = long["baseline"].map({"gap_none": "b = 0", "gap_vopd": "b = KL"})
    sns.barplot(long, x="state", y="term", hue="baseline", ax=ax)
    ax.set_ylabel("d(s) E|S|^2 (b(s) - b*(s))^2")
    ax.set_title("counterexample make_tree(3,3,coupling=1,seed=1), per state")
    fig.tight_layout()
    return fig


def report(df: pd.DataFrame, config: dict) -> common.Report:
    """Medians per divergence and the counterexample's per-state explanation (also <out>/baseline_quality.md)."""
    spec = config["counterexample"]
    states = per_state(**spec)
    quality = baseline_quality(make_tree(spec["vocab"], spec["horizon"], coupling=spec["coupling"], seed=spec["seed"]))
    text = explain(states, quality, spec)
    grouped = df.groupby("divergence")[["reduction_ratio", "bstar_ratio", "explained_variance", "vopd_increases"]]
    return common.Report(text=grouped.median().to_string(float_format=lambda x: f"{x:.3g}") + "\n" + text,
                         extra={"fraction_vopd_increases": float(df["vopd_increases"].mean()),
                                "counterexample": {**spec, **quality}},
                         figure_args=(states,), markdown=text)


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return common.run_study(NAME, DEFAULTS, compute, figure, report=report, quick=quick, out_dir=out_dir,
                            config=config, plot=plot)


if __name__ == "__main__":
    common.main(run, __doc__)
