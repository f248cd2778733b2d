"""Does vOPD's variance reduction grow with the vocabulary on real LMs, as it does on tabular trees?

Tabular side (exact, logit space): var(vopd)/var(opd) and var(full_kl)/var(opd) on the base tree of
``variance_landscape`` (H=3, divergence 1, temperature 1, coupling 0.5) as the vocabulary grows,
mean over seeds. Real side (Monte Carlo, parameter space): the same ratios on the registry's pairs
with their 95% intervals, read from the ``llm_variance`` tables already in the output folder
(``llm_variance.csv`` for the tiny pair, V = 16, ``llm_variance_small.csv`` for V = 8,192,
``llm_variance_smollm2.csv`` for V = 49,152 and ``llm_variance_gemma3.csv`` for V = 262,144): run
``python -m studies.llm_variance --pair NAME`` for each first (``run_all`` does). The two sides
measure variance in different spaces, so compare trends, not levels. The manifest's ``contrasts``
compare pairs: the ratio of their geometric-mean ratios with Welch's interval and p-value on the
per-batch log ratios.

Vocabulary or teacher entropy? The pairs differ in both. From ``pair_statistics_entropy.csv``
(``pair_statistics`` bins every visited state by the teacher's entropy and sums, per bin, the exact
logit-space one-token score variance of opd, vOPD and b* over the next token), rows with source
``states, teacher entropy [a, b) nats`` give, per pair and bin, sum Var(vopd) / sum Var(opd) (and
b*'s) as the geometric mean over batches with its 95% interval, so the pairs can be compared at equal
teacher entropy. This is logit space at one state (no parameter Jacobian, no future tokens).

    python -m studies.vocab_effect [--quick] [--out figures]
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as sps

from vopd_analysis import stats
from vopd_analysis.errors import InputError

from . import common, variance_landscape

NAME = "vocab_effect"
READS = ("llm_variance", "llm_variance_small", "llm_variance_smollm2", "llm_variance_gemma3", "pair_statistics")
RATIOS = ["vopd", "full_kl"]
REAL = {"tiny": "llm_variance.csv", "small": "llm_variance_small.csv", "smollm2": "llm_variance_smollm2.csv",
        "gemma3": "llm_variance_gemma3.csv"}
ENTROPY = "pair_statistics_entropy.csv"
MIN_STATES = 20          # a batch's bin with fewer states gives no ratio
DEFAULTS = {
    "quick": {"vocab": [2, 4, 8, 16, 32], "seeds": [0, 1], "base": variance_landscape.BASE, "real": REAL,
              "entropy": ENTROPY},
    "full": {"vocab": [2, 3, 4, 6, 8, 12, 16, 24, 32], "seeds": [0, 1, 2, 3, 4], "base": variance_landscape.BASE,
             "real": REAL, "entropy": ENTROPY},
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


def _missing(path: Path, hint: str):
    raise InputError(f"{path} is missing: run {hint} first")


def real(out_dir, files: dict) -> pd.DataFrame:
    """The pairs' ratios with their intervals, from the llm_variance tables in ``out_dir``."""
    rows = []
    for pair, name in files.items():
        path = Path(out_dir) / name
        if not path.is_file():
            _missing(path, f"python -m studies.llm_variance --pair {pair} --out {out_dir}")
        table = pd.read_csv(path)
        vocab = json.loads(path.with_suffix(".json").read_text())["vocab"]["vocab_size"]   # the probe's manifest
        for _, r in table[table["estimator"].isin(RATIOS)].iterrows():
            rows.append({"vocab": vocab, "estimator": r["estimator"], "ratio": r["ratio_gmean"],
                         "ratio_low": r["ratio_low"], "ratio_high": r["ratio_high"],
                         "source": f"real pair '{pair}' ({int(r['batches'])} batches)"})
    return pd.DataFrame(rows)


def by_entropy(out_dir, name: str) -> pd.DataFrame:
    """Per pair and teacher-entropy bin: sum Var(b) / sum Var(opd) over the bin's states for b = vOPD's KL and
    b*, geometric mean over batches (each with at least ``MIN_STATES`` states there) with its 95% interval."""
    path = Path(out_dir) / name
    if not path.is_file():
        _missing(path, f"python -m studies.pair_statistics --out {out_dir}")
    bins = pd.read_csv(path)
    rows = []
    for (pair, low, high), g in bins.groupby(["pair", "low", "high"], sort=False):
        g = g[(g["states"] >= MIN_STATES) & (g["opd"] > 0)]
        if len(g) < 2:
            continue
        label = f"states, teacher entropy [{low:g}, {high:g}) nats"
        for column, estimator in (("vopd", "vopd"), ("bstar", "opd_bstar")):
            gmean, lo, hi = stats.ratio_interval(g[column] / g["opd"])
            rows.append({"vocab": int(g["vocab_size"].iloc[0]), "estimator": estimator, "ratio": gmean, "ratio_low": lo,
                         "ratio_high": hi, "source": label, "pair": pair, "states": int(g["states"].sum()),
                         "batches": len(g)})
    return pd.DataFrame(rows)


def pair_contrasts(out_dir, files: dict) -> list:
    """For each pair after the first (by vocabulary) against the tiny pair and against the previous one: the
    ratio of the two geometric-mean variance ratios, with Welch's 95% interval and p-value on the per-batch
    log ratios (the batches of two pairs are independent)."""
    logs = {pair: pd.read_csv(Path(out_dir) / name.replace(".csv", "_batches.csv")) for pair, name in files.items()}
    pairs = list(files)
    comparisons = {(b, a) for i, b in enumerate(pairs[1:], 1) for a in {pairs[0], pairs[i - 1]}}
    out = []
    for numerator, denominator in sorted(comparisons, key=lambda c: (pairs.index(c[0]), pairs.index(c[1]))):
        for name in RATIOS:
            a, b = (np.log(logs[p].loc[logs[p]["estimator"] == name, "variance_ratio_to_opd"].to_numpy())
                    for p in (numerator, denominator))
            welch = sps.ttest_ind(a, b, equal_var=False)
            interval = welch.confidence_interval(0.95)
            out.append({"estimator": name, "numerator": numerator, "denominator": denominator,
                        "ratio": float(np.exp(a.mean() - b.mean())), "low": float(np.exp(interval.low)),
                        "high": float(np.exp(interval.high)), "p_value": float(welch.pvalue)})
    return out


def figure(df: pd.DataFrame):
    import matplotlib.pyplot as plt
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 4.4))
    for i, name in enumerate(RATIOS):
        tab = df[(df["estimator"] == name) & (df["source"] == "tabular (exact)")]
        ax.plot(tab["vocab"], tab["ratio"], marker="o", color=f"C{i}", label=f"{name}, tabular trees (exact)")
        lm = df[(df["estimator"] == name) & df["source"].str.startswith("real pair")]
        ax.errorbar(lm["vocab"], lm["ratio"], yerr=[lm["ratio"] - lm["ratio_low"], lm["ratio_high"] - lm["ratio"]],
                    fmt="s", color=f"C{i}", capsize=4, mfc="white", label=f"{name}, real pairs (95% interval)")
    states = df[(df["estimator"] == "vopd") & df["source"].str.startswith("states")]
    bins = sorted(states["source"].unique(), key=lambda text: float(text.split("[")[1].split(",")[0]))
    for j, label in enumerate(bins):
        g = states[states["source"] == label]
        g = g.sort_values("vocab")
        bx.errorbar(g["vocab"] * (1.06 ** j), g["ratio"], yerr=[g["ratio"] - g["ratio_low"], g["ratio_high"] - g["ratio"]],
                    marker="o", capsize=3, label=label.replace("states, teacher entropy ", "H(teacher) "))
    for a in (ax, bx):
        a.axhline(1.0, color="k", lw=0.8, ls="--")
        a.set_xscale("log", base=2)
        a.set_yscale("log")
        a.set_xlabel("vocabulary size V")
    ax.set_ylabel("var(estimator) / var(opd)")
    ax.set_title("parameter-space variance against V")
    ax.legend(fontsize=7, loc="lower left")
    bx.set_ylabel("sum Var(vopd) / sum Var(opd) over states")
    bx.set_title("logit space, states binned by the teacher's entropy")
    bx.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    def compute(cfg):
        parts = [tabular(cfg), real(out_dir, cfg["real"])]
        if cfg.get("entropy"):
            parts.append(by_entropy(out_dir, cfg["entropy"]))
        table = pd.concat(parts, ignore_index=True)
        cols = ["source", "vocab", "estimator", "ratio", "ratio_low", "ratio_high"]
        table = table[cols + [c for c in ("pair", "states", "batches") if c in table]]
        return table, {"contrasts": pair_contrasts(out_dir, cfg["real"])}

    def report(df, cfg):
        contrast = pd.DataFrame(pair_contrasts(out_dir, cfg["real"]))
        text = (df.to_string(index=False, float_format=lambda x: f"{x:.4g}") + "\npair over pair (Welch):\n"
                + contrast.to_string(index=False, float_format=lambda x: f"{x:.4g}"))
        return common.Report(text=text)
    return common.run_study(NAME, DEFAULTS, compute, figure, report=report, quick=quick, out_dir=out_dir,
                            config=config, plot=plot, seed="seeds")


if __name__ == "__main__":
    common.main(run, __doc__)
