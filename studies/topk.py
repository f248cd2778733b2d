"""Study 4: top-k baselines and top-k objectives on a long-tailed (Zipf) teacher.

vopd_topk subtracts the reverse KL on the student's top-k tokens (renormalised):
a state-only baseline, so unbiased for g_tok at every k, and only its variance
moves with k. topk_kl instead *optimises* the truncated KL on the teacher's
top-k: a different objective, so biased unless k = V. For each k: exact
variance of vopd_topk, the fraction of the full baseline's variance reduction
it keeps, (var_opd - var_topk(k)) / (var_opd - var_vopd), and the exact bias
and variance of topk_kl.
"""

from __future__ import annotations

import itertools

import pandas as pd

from synthetic.tree import make_tree
from vopd_analysis.tabular.enumeration import exact_moments
from vopd_analysis.tabular.targets import bias_report, tree_quantities

from . import common

NAME = "topk"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
DEFAULTS = {
    "quick": {"vocab": 64, "horizon": 2, "zipf_exponent": [1.0, 1.5], "divergence": [0.5, 1.0],
              "coupling": 0.5, "ks": [1, 2, 4, 8, 16, 32, 64], "seeds": [0]},
    "full": {"vocab": 128, "horizon": 2, "zipf_exponent": [1.0, 1.5, 2.0], "divergence": [0.25, 0.5, 1.0, 2.0],
             "coupling": 0.5, "ks": [1, 2, 4, 8, 16, 32, 64, 128], "seeds": [0, 1, 2]},
}


def compute(config: dict) -> pd.DataFrame:
    rows = []
    for a, div, seed in itertools.product(config["zipf_exponent"], config["divergence"], config["seeds"]):
        tree = make_tree(config["vocab"], config["horizon"], teacher_shape="zipf", zipf_exponent=a,
                         divergence=div, coupling=config["coupling"], seed=seed)
        tq = tree_quantities(tree)
        specs = {n: {"name": n} for n in ("opd", "vopd", "full_kl", "opd_bstar")}
        for k in config["ks"]:
            specs[f"vopd_topk_{k}"] = {"name": "vopd_topk", "k": k}
            specs[f"topk_kl_{k}"] = {"name": "topk_kl", "k": k}
        m = exact_moments(tree, specs, quantities=tq)
        var = {label: mom.total_variance for label, mom in m.items()}
        full_reduction = var["opd"] - var["vopd"]
        for k in config["ks"]:
            tk = m[f"topk_kl_{k}"]
            rows.append({
                "zipf_exponent": a, "divergence": div, "seed": seed, "k": k, "J": tq.sequence_kl,
                "var_opd": var["opd"], "var_vopd": var["vopd"], "var_bstar": var["opd_bstar"],
                "var_full_kl": var["full_kl"], "var_vopd_topk": var[f"vopd_topk_{k}"],
                "vopd_topk_bias_token": bias_report(m[f"vopd_topk_{k}"].mean, tq.grad_token)["relative"],
                "fraction_kept": (var["opd"] - var[f"vopd_topk_{k}"]) / full_reduction,
                "var_topk_kl": tk.total_variance,
                "topk_kl_bias_token": bias_report(tk.mean, tq.grad_token)["relative"],
                "topk_kl_bias_sequence": bias_report(tk.mean, tq.grad_sequence)["relative"],
                "topk_kl_cosine_token": bias_report(tk.mean, tq.grad_token)["cosine"],
            })
    return pd.DataFrame(rows)


def figure(df: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns
    df = df.assign(setting="a=" + df["zipf_exponent"].astype(str) + ", δ=" + df["divergence"].astype(str))
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    sns.lineplot(df, x="k", y="var_vopd_topk", hue="setting", marker="o", ax=ax, errorbar=None)
    for setting, g in df.groupby("setting"):
        color = [l.get_color() for l in ax.get_lines() if l.get_label() == setting]
        ax.axhline(g["var_opd"].mean(), ls=":", lw=1, color=color[0] if color else "grey")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_ylabel("tr Cov of vopd_topk (dotted: opd)")
    ax.set_title("vopd_topk variance vs k (unbiased at every k)")
    ax = axes[1]
    sns.lineplot(df, x="k", y="fraction_kept", hue="setting", marker="o", ax=ax, errorbar=None, legend=False)
    ax.axhline(1, color="grey", lw=0.8, ls="--")
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xscale("log", base=2)
    ax.set_ylabel("(var_opd - var_topk) / (var_opd - var_vopd)")
    ax.set_title("share of the full baseline's reduction kept")
    ax = axes[2]
    sns.lineplot(df, x="k", y="topk_kl_bias_token", hue="setting", marker="o", ax=ax, errorbar=None, legend=False)
    ax.set_xscale("log", base=2)
    ax.set_yscale("symlog", linthresh=1e-3)
    ax.set_ylabel("|E g - g_tok| / |g_tok|")
    ax.set_title("topk_kl relative bias vs k")
    fig.tight_layout()
    return fig


def report(df: pd.DataFrame, config: dict) -> common.Report:
    """Mean variances, kept fraction and topk_kl bias per (zipf exponent, divergence, k)."""
    cols = ["zipf_exponent", "divergence", "k", "var_opd", "var_vopd", "var_vopd_topk", "fraction_kept",
            "topk_kl_bias_token", "var_topk_kl"]
    means = df.groupby(cols[:3])[cols[3:]].mean()
    return common.Report(text=means.to_string(float_format=lambda x: f"{x:.3g}"))


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return common.run_study(NAME, DEFAULTS, compute, figure, report=report, quick=quick, out_dir=out_dir,
                            config=config, plot=plot)


if __name__ == "__main__":
    common.main(run, __doc__)
