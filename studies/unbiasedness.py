"""Study 1: is every single-sequence estimator unbiased for what it claims?

For each environment (bandit, tree without coupling, tree with coupling, Zipf
teacher) and each registered single-sequence estimator: the exact relative bias
against g_tok and against grad J (exact.py), and a Monte Carlo test
(montecarlo.unbiasedness_test: Bonferroni t-tests along fixed directions, inconclusive when the draws are too
few for the t approximation) of H0: E g = claimed target (estimators whose claim is 'none' are tested against
g_tok, so the test should reject the biased ones). studies/calibration.py measures the test's
false-positive rate and power on these environments.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from synthetic.tree import bandit, make_tree
from vopd_analysis import estimators as est
from vopd_analysis.errors import InputError
from vopd_analysis.tabular.analysis import estimator_specs
from vopd_analysis.tabular.enumeration import exact_moments
from vopd_analysis.tabular.montecarlo import sample_gradients, unbiasedness_test
from vopd_analysis.tabular.targets import bias_report, target_gradient, tree_quantities

from . import common

NAME = "unbiasedness"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
ENVS = {
    "bandit": lambda seed: bandit(6, seed=seed),
    "tree": lambda seed: make_tree(3, 3, coupling=0.0, seed=seed),
    "tree_coupled": lambda seed: make_tree(3, 3, coupling=1.0, seed=seed),
    "zipf": lambda seed: make_tree(8, 2, teacher_shape="zipf", coupling=0.5, seed=seed),
}
DEFAULTS = {
    "quick": {"seed": 0, "envs": list(ENVS), "mc_samples": 10000, "k": 2, "alpha": 0.05,
              "extra": {"rtg_g0.5": {"name": "rtg", "gamma": 0.5}}},
    "full": {"seed": 0, "envs": list(ENVS), "mc_samples": 100000, "k": 2, "alpha": 0.05,
             "extra": {"rtg_g0.5": {"name": "rtg", "gamma": 0.5}}},
}


def compute(config: dict) -> pd.DataFrame:
    rows = []
    for env in config["envs"]:
        tree = ENVS[env](config["seed"])
        tq = tree_quantities(tree)
        # every single-sequence estimator as vopd exact builds it, top-k ones with config["k"], then the extras
        spec = {**estimator_specs({"k": config["k"]}, vocab=tree.vocab)[0], **config["extra"]}
        moments = exact_moments(tree, spec, quantities=tq)
        norm_tok = float(torch.linalg.norm(tq.grad_token))
        for label, s in spec.items():
            params = {k: v for k, v in s.items() if k != "name"}
            claim = est.get(s["name"]).target_for(**params)
            target = target_gradient(tq, claim)
            tested = "token" if target is None else claim
            target = tq.grad_token if target is None else target
            mean = moments[label].mean
            try:
                samples = sample_gradients(tree, s["name"], config["mc_samples"], config["seed"] + 1, **params)
                test = unbiasedness_test(samples, target.reshape(-1).numpy(), alpha=config["alpha"])
                mc = {"mc_directions": test.directions, "mc_stat": test.statistic, "mc_p": test.p_value,
                      "mc_reject": bool(test.reject), "mc_inconclusive": bool(test.inconclusive),
                      "mc_draws_needed": test.draws_needed or np.nan}
            except InputError:  # an estimator the sampler cannot draw
                mc = {"mc_directions": 0, "mc_stat": np.nan, "mc_p": np.nan, "mc_reject": False,
                      "mc_inconclusive": False, "mc_draws_needed": np.nan}
            rows.append({
                "env": env, "estimator": label, "claimed_target": claim,
                "rel_bias_token": bias_report(mean, tq.grad_token)["relative"],
                "rel_bias_sequence": bias_report(mean, tq.grad_sequence)["relative"],
                "rel_bias_claimed": float(torch.linalg.norm(mean - target)) / norm_tok,
                "cos_sequence": bias_report(mean, tq.grad_sequence)["cosine"],
                "total_variance": moments[label].total_variance,
                "mc_tested_against": tested, "mc_n": config["mc_samples"], **mc,
            })
    return pd.DataFrame(rows)


def _fmt_bias(x: float) -> str:
    return "0" if x < 1e-10 else f"{x:.2g}"


def _verdict(r) -> str:
    if np.isnan(r["mc_p"]):
        return "n/a"
    if r["mc_inconclusive"]:
        return f"inconclusive (need ~{int(r['mc_draws_needed'])})"
    return ("REJECT" if r["mc_reject"] else "ok") + f" (p={r['mc_p']:.2g})"


def summary_markdown(df: pd.DataFrame, alpha: float) -> str:
    """Table 1: exact bias vs the claimed target and the MC verdict; table 2: bias vs g_tok / grad J."""
    envs = list(dict.fromkeys(df["env"]))
    t1, t2 = [], []
    for label, g in df.groupby("estimator", sort=False):
        g = g.set_index("env")
        row = {"estimator": label, "claims": g["claimed_target"].iloc[0]}
        row2 = dict(row)
        for env in envs:
            r = g.loc[env]
            verdict = _verdict(r)
            row[env] = f"{_fmt_bias(r['rel_bias_claimed'])} / {verdict}"
            row2[env] = f"{_fmt_bias(r['rel_bias_token'])} / {_fmt_bias(r['rel_bias_sequence'])}"
        t1.append(row)
        t2.append(row2)
    unbiased = df[(df["rel_bias_claimed"] < 1e-10) & (df["claimed_target"] != "none")]
    n_false, n_open = int(unbiased["mc_reject"].sum()), int(unbiased["mc_inconclusive"].sum())
    biased = df[df["rel_bias_claimed"] >= 1e-10]
    n_caught, n_open_biased = int(biased["mc_reject"].sum()), int(biased["mc_inconclusive"].sum())
    return ("# Unbiasedness\n\nCell: exact relative bias |E g - target| / |g_tok| against the claimed target "
            f"/ Monte Carlo verdict (montecarlo.unbiasedness_test) at alpha={alpha} (n={int(df['mc_n'].iloc[0])} sequences; claim "
            "'none' is tested against g_tok; n/a: an estimator the sampler cannot draw; inconclusive: too few draws for the test's t approximation, with the "
            "draws it asks for).\n\n" + common.markdown_table(pd.DataFrame(t1))
            + f"\nFalse rejections among the {len(unbiased)} exactly-unbiased cases: {n_false}, with "
            f"{len(unbiased) - n_open} verdicts and {n_open} inconclusive (the false-positive rate is measured "
            f"in test_calibration). Biased cases detected: {n_caught} of {len(biased)} "
            f"({n_open_biased} inconclusive).\n\n"
            "Exact relative bias against g_tok / against grad J:\n\n" + common.markdown_table(pd.DataFrame(t2)))


def figure(df: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns
    order = list(dict.fromkeys(df["estimator"]))
    bias = df.melt(id_vars=["env", "estimator"], value_vars=["rel_bias_token", "rel_bias_sequence"],
                   var_name="against", value_name="rel_bias")
    bias["column"] = bias["env"] + "\nvs " + bias["against"].map({"rel_bias_token": "g_tok",
                                                                   "rel_bias_sequence": "∇J"})
    grid = bias.pivot(index="estimator", columns="column", values="rel_bias").loc[order]
    grid = grid[[c for env in dict.fromkeys(df["env"]) for c in grid.columns if c.startswith(env + "\n")]]
    pvals = df.pivot(index="estimator", columns="env", values="mc_p").loc[order][list(dict.fromkeys(df["env"]))]
    fig, axes = plt.subplots(1, 2, figsize=(14, 0.38 * len(order) + 2), gridspec_kw={"width_ratios": [2, 1]})
    annot = grid.map(_fmt_bias)
    sns.heatmap(np.log10(grid.clip(lower=1e-16)), annot=annot, fmt="", cmap="rocket_r", vmin=-16, vmax=0.5,
                cbar_kws={"label": "log10 relative bias"}, ax=axes[0], annot_kws={"size": 7})
    axes[0].set_title("Exact relative bias (0 = unbiased to round-off)")
    axes[0].set_xlabel("")
    open_cells = df.pivot(index="estimator", columns="env", values="mc_inconclusive").loc[order][pvals.columns]
    annot_p = pvals.map(lambda p: f"{p:.2g}").where(~open_cells.astype(bool), "inconcl.")
    sns.heatmap(pvals, annot=annot_p, fmt="", cmap="vlag_r", vmin=0, vmax=0.2,
                cbar_kws={"label": "MC p-value (vs claimed target)"}, ax=axes[1], annot_kws={"size": 7})
    axes[1].set_title("Monte Carlo test of the claimed target")
    axes[1].set_xlabel("")
    axes[1].set_ylabel("")
    fig.tight_layout()
    return fig


def report(df: pd.DataFrame, config: dict) -> common.Report:
    """The markdown table of the claims, written to <out>/unbiasedness.md."""
    return common.Report(markdown=summary_markdown(df, config["alpha"]))


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return common.run_study(NAME, DEFAULTS, compute, figure, report=report, quick=quick, out_dir=out_dir,
                            config=config, plot=plot, seed="seed")


if __name__ == "__main__":
    common.main(run, __doc__)
