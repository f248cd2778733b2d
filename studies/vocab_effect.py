"""Does vOPD's variance reduction grow with the vocabulary on trained LMs, as it does on tabular trees?

Tabular side (exact, logit space): var(vopd)/var(opd) and var(full_kl)/var(opd) on the base tree of
``variance_landscape`` (H=3, divergence 1, temperature 1, coupling 0.5) as the vocabulary grows,
mean over seeds. Real side (Monte Carlo, parameter space): the same ratios on the committed pairs
with their 95% intervals, read from the ``llm_variance`` tables already in the output folder
(``llm_variance.csv`` for the tiny pair, V = 16, and ``llm_variance_small.csv`` for the small pair,
V = 8,192): run ``python -m studies.llm_variance`` with ``--pair tiny`` and ``--pair small`` first
(``run_all`` does). The two sides measure variance in different spaces, so compare trends, not levels.
The manifest's ``small_over_tiny`` compares the pairs: the ratio of their geometric-mean ratios with
Welch's interval and p-value on the per-batch log ratios.

    python -m studies.vocab_effect [--quick] [--out figures]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from vopd_analysis.errors import InputError
from . import common, variance_landscape

NAME = "vocab_effect"
RATIOS = ["vopd", "full_kl"]
REAL = {"tiny": "llm_variance.csv", "small": "llm_variance_small.csv"}
DEFAULTS = {
    "quick": {"vocab": [2, 4, 8, 16, 32], "seeds": [0, 1], "base": variance_landscape.BASE, "real": REAL},
    "full": {"vocab": [2, 3, 4, 6, 8, 12, 16, 24, 32], "seeds": [0, 1, 2, 3, 4], "base": variance_landscape.BASE,
             "real": REAL},
}


def tabular(config: dict) -> pd.DataFrame:
    """Exact ratios to opd per vocabulary size, mean over seeds."""
    rows = []
    for vocab in config["vocab"]:
        for seed in config["seeds"]:
            var, _ = variance_landscape.variances({**config["base"], "vocab": vocab}, seed)
            rows += [{"vocab": vocab, "seed": seed, "estimator": n, "ratio": var[n] / var["opd"]} for n in RATIOS]
    table = pd.DataFrame(rows).groupby(["vocab", "estimator"], as_index=False)["ratio"].mean()
    return table.assign(source="tabular (exact)", ratio_low=float("nan"), ratio_high=float("nan"))


def real(out_dir, files: dict) -> pd.DataFrame:
    """The committed pairs' ratios with their intervals, from the llm_variance tables in ``out_dir``."""
    rows = []
    for pair, name in files.items():
        path = Path(out_dir) / name
        if not path.is_file():
            raise InputError(f"{path} is missing: run python -m studies.llm_variance --pair {pair} --out {out_dir} first")
        table = pd.read_csv(path)
        vocab = json.loads(path.with_suffix(".json").read_text())["vocab"]["vocab_size"]   # the probe's manifest
        for _, r in table[table["estimator"].isin(RATIOS)].iterrows():
            rows.append({"vocab": vocab, "estimator": r["estimator"], "ratio": r["ratio_gmean"],
                         "ratio_low": r["ratio_low"], "ratio_high": r["ratio_high"],
                         "source": f"trained pair '{pair}' ({int(r['batches'])} batches)"})
    return pd.DataFrame(rows)


def pair_contrast(out_dir, files: dict) -> list:
    """small over tiny: the ratio of the two pairs' geometric-mean variance ratios, with Welch's 95% interval
    and p-value on the per-batch log ratios (the batches of the two pairs are independent)."""
    logs = {pair: pd.read_csv(Path(out_dir) / name.replace(".csv", "_batches.csv")) for pair, name in files.items()}
    out = []
    for name in RATIOS:
        a, b = (np.log(logs[p].loc[logs[p]["estimator"] == name, "variance_ratio_to_opd"].to_numpy())
                for p in ("small", "tiny"))
        welch = sps.ttest_ind(a, b, equal_var=False)
        interval = welch.confidence_interval(0.95)
        out.append({"estimator": name, "small_over_tiny": float(np.exp(a.mean() - b.mean())),
                    "low": float(np.exp(interval.low)), "high": float(np.exp(interval.high)),
                    "p_value": float(welch.pvalue)})
    return out


def figure(df: pd.DataFrame):
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, name in enumerate(RATIOS):
        tab = df[(df["estimator"] == name) & (df["source"] == "tabular (exact)")]
        ax.plot(tab["vocab"], tab["ratio"], marker="o", color=f"C{i}", label=f"{name}, tabular trees (exact)")
        lm = df[(df["estimator"] == name) & (df["source"] != "tabular (exact)")]
        ax.errorbar(lm["vocab"], lm["ratio"], yerr=[lm["ratio"] - lm["ratio_low"], lm["ratio_high"] - lm["ratio"]],
                    fmt="s", color=f"C{i}", capsize=4, mfc="white", label=f"{name}, trained LMs (95% interval)")
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("vocabulary size V")
    ax.set_ylabel("var(estimator) / var(opd)")
    ax.set_title("variance reduction against vocabulary size")
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return fig


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    def compute(cfg):
        table = pd.concat([tabular(cfg), real(out_dir, cfg["real"])], ignore_index=True)[
            ["source", "vocab", "estimator", "ratio", "ratio_low", "ratio_high"]]
        return table, {"small_over_tiny": pair_contrast(out_dir, cfg["real"])}

    def report(df, cfg):
        contrast = pd.DataFrame(pair_contrast(out_dir, cfg["real"]))
        text = (df.to_string(index=False, float_format=lambda x: f"{x:.4g}") + "\nsmall pair over tiny pair (Welch):\n"
                + contrast.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
        return common.Report(text=text)
    return common.run_study(NAME, DEFAULTS, compute, figure, report=report, quick=quick, out_dir=out_dir,
                            config=config, plot=plot, seed="seeds")


if __name__ == "__main__":
    common.main(run, __doc__)
