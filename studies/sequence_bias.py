"""Study 5: token-level bias against grad J as future coupling grows, and the discount trade-off.

Token-level estimators (opd, vopd, full_kl) are unbiased for g_tok, which drops
the future term g_fut = grad J - g_tok. rtg(gamma) interpolates between opd
(gamma = 0) and the unbiased reward-to-go (gamma = 1). The MSE of a batch-B mean
gradient against grad J is |bias|^2 + tr Cov / B (targets.Moments.mse); a biased,
low-variance estimator wins below the crossover batch size

    B* = (var_unbiased - var_biased) / |bias|^2,

and loses above it.
"""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from synthetic.tree import make_tree
from vopd_analysis.tabular.enumeration import exact_moments
from vopd_analysis.tabular.targets import bias_report, tree_quantities

from . import common

NAME = "sequence_bias"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
PAIRS = {"opd vs rtg": ("opd", "rtg_g1"), "vopd vs rtg_vopd": ("vopd", "rtg_vopd"),
         "full_kl vs rb_seq": ("full_kl", "rb_seq")}
DEFAULTS = {
    "quick": {"vocab": 4, "horizon": 4, "coupling": [0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0],
              "gammas": [0.0, 0.25, 0.5, 0.75, 0.9, 1.0], "batch_sizes": [1, 4, 16, 64, 256, 1024],
              "seeds": [0, 1, 2], "divergence": 1.0},
    "full": {"vocab": 4, "horizon": 5, "coupling": [0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0],
             "gammas": [0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 1.0],
             "batch_sizes": [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096], "seeds": list(range(8)),
             "divergence": 1.0},
}


def specs(gammas) -> dict:
    out = {f"rtg_g{g:g}": {"name": "rtg", "gamma": g} for g in gammas}
    out.update({n: {"name": n} for n in ("opd", "vopd", "full_kl", "rtg_vopd", "rb_seq")})
    return out


def compute(config: dict) -> pd.DataFrame:
    rows = []
    for kappa, seed in itertools.product(config["coupling"], config["seeds"]):
        tree = make_tree(config["vocab"], config["horizon"], coupling=kappa, divergence=config["divergence"],
                         seed=seed)
        tq = tree_quantities(tree)
        fut = float(np.linalg.norm(tq.grad_future)) / float(np.linalg.norm(tq.grad_sequence))
        for label, m in exact_moments(tree, specs(config["gammas"]), quantities=tq).items():
            b = bias_report(m.mean, tq.grad_sequence)
            row = {"coupling": kappa, "seed": seed, "estimator": label,
                   "gamma": specs(config["gammas"])[label].get("gamma", np.nan), "future_share": fut,
                   "rel_bias_sequence": b["relative"], "cosine_sequence": b["cosine"], "bias_sq": b["l2"] ** 2,
                   "total_variance": m.total_variance}
            row.update({f"mse_B{B}": m.mse(tq.grad_sequence, B) for B in config["batch_sizes"]})
            rows.append(row)
    return pd.DataFrame(rows)


def crossovers(df: pd.DataFrame) -> pd.DataFrame:
    """B* per coupling (mean over seeds) for each biased/unbiased pair and each gamma < 1 vs gamma = 1."""
    mean = df.groupby(["coupling", "estimator"])[["bias_sq", "total_variance"]].mean()
    rows = []
    pairs = dict(PAIRS)
    pairs.update({f"rtg_g{g:g} vs rtg": (f"rtg_g{g:g}", "rtg_g1") for g in df["gamma"].dropna().unique() if 0 < g < 1})
    for kappa in sorted(df["coupling"].unique()):
        for pair, (biased, unbiased) in pairs.items():
            b, u = mean.loc[(kappa, biased)], mean.loc[(kappa, unbiased)]
            gap = u["total_variance"] - b["total_variance"]
            cross = gap / b["bias_sq"] if b["bias_sq"] > 1e-20 and gap > 0 else (np.inf if gap > 0 else 0.0)
            rows.append({"coupling": kappa, "pair": pair, "bias_sq": b["bias_sq"], "var_biased": b["total_variance"],
                         "var_unbiased": u["total_variance"], "crossover_B": cross})
    return pd.DataFrame(rows)


def figure(df: pd.DataFrame, cross: pd.DataFrame, kappa_mse: float):
    import matplotlib.pyplot as plt
    import seaborn as sns
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    ax = axes[0]
    sub = df[df["estimator"].str.startswith("rtg_g")]
    sns.lineplot(sub, x="coupling", y="rel_bias_sequence", hue="gamma", palette="viridis", marker="o", ax=ax,
                 errorbar=("pi", 100))
    ax.set_ylabel("|E g - ∇J| / |∇J|")
    ax.set_title("bias of rtg(γ) vs coupling (γ=0 is opd/vopd/full_kl)")
    ax = axes[1]
    mse_cols = [c for c in df.columns if c.startswith("mse_B")]
    at = df[(df["coupling"] == kappa_mse)].melt(id_vars=["estimator", "seed"], value_vars=mse_cols,
                                                 var_name="B", value_name="mse")
    at["B"] = at["B"].str[5:].astype(int)
    at = at[at["estimator"].isin(["rtg_g0", "rtg_g0.5", "rtg_g0.9", "rtg_g1", "full_kl", "rb_seq", "rtg_vopd"])]
    sns.lineplot(at, x="B", y="mse", hue="estimator", marker="o", ax=ax, errorbar=None)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_ylabel("MSE of batch-B gradient vs ∇J")
    ax.set_title(f"MSE vs batch size, coupling={kappa_mse:g} (mean of seeds)")
    ax = axes[2]
    main = cross[cross["pair"].isin(list(PAIRS) + ["rtg_g0.5 vs rtg"])].replace(np.inf, np.nan)
    sns.lineplot(main, x="coupling", y="crossover_B", hue="pair", marker="o", ax=ax)
    ax.set_yscale("log")
    ax.set_ylabel("B* above which the unbiased one wins")
    ax.set_title("crossover batch size")
    fig.tight_layout()
    return fig


def report(df: pd.DataFrame, config: dict) -> common.Report:
    """The crossover batch sizes (printed for PAIRS, all in the manifest); the figure's MSE panel coupling."""
    cross = crossovers(df)
    kappa_mse = 1.0 if 1.0 in config["coupling"] else config["coupling"][-1]
    shown = cross[cross["pair"].isin(PAIRS)]
    return common.Report(text=shown.to_string(index=False, float_format=lambda x: f"{x:.3g}"),
                         extra={"crossovers": cross.replace(np.inf, None).to_dict(orient="records")},
                         figure_args=(cross, kappa_mse))


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return common.run_study(NAME, DEFAULTS, compute, figure, report=report, quick=quick, out_dir=out_dir,
                            config=config, plot=plot)


if __name__ == "__main__":
    common.main(run, __doc__)
