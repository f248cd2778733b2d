"""Beyond vOPD: every registered estimator, exactly.

Every single-sequence estimator of the registry (``vopd_analysis.estimators.REGISTRY``; the group
estimators seq_rloo and seq_grpo are left out, they need K-tuple enumeration), at its registry
defaults, plus the token-selection variants opd and vopd with rho = 0.5 (keep the top half of the
positions by student entropy), on every tree of the ``baseline_quality`` sweep (its grid is
imported, ``baseline_quality.DEFAULTS``; the quick grid is 3 x 1 x 5 x 3 x 2 x 2 x 3 = 540 trees and
already holds the Zipf-teacher trees, teacher_shape="zipf", and the coupled trees, coupling=1.0).
The two oracle estimators (rtg_oracle, rb_seq_oracle: they read the exact KL-to-go W) are kept
and marked analysis-only: they are floors, not trainable estimators.

Per tree and estimator, exactly (no sampling): the relative L2 bias |E g - g| / |g| against
g_tok (``target="token"``) and against grad J (``"sequence"``), and against the registry's claimed
target (a check: it must be ~0 wherever a target is claimed; for the target "zero", |E g| / |g_tok|);
the trace variance tr Cov and its ratio to opd's on the same tree; the MSE of a batch-B mean,
|bias|^2 + tr Cov / B, against both targets for B in ``batch_sizes``; the estimator's claimed
target, teacher signal, cost class (what it needs from the teacher per token: 1 log-prob /
k log-probs / V logits / oracle) and reference. The summary (``estimator_zoo.md``) ranks the
estimators unbiased for g_tok on every tree by their median var/var(opd), then the others by the
same; it also gives the median relative bias against grad J over the coupled trees alone (on the
uncoupled ones grad J = g_tok).

Engine: ``tabular.dp`` wherever the estimator has a DP credit (exact, O(S V^2)), enumeration
(``tabular.enumeration``, exact over all V^H sequences) for the rest: iw_opd (position weights)
and the rho < 1 variants. The two agree to ~1e-15 where both apply (``engine="enumeration"``
forces enumeration for every estimator; the tests compare them).

Top-k sizes: k = min(registry default, max(2, ceil(V / 4))) for every estimator with a ``k``
(vopd_topk, opd_bstar_topk, topk_kl, topk_tail_kl, student_topk_kl); on the quick grid k = 2 at
V = 3 and V = 8, k = 8 at V = 32 (full grid: 2 at V = 4, 4 at V = 16, 16 at V = 64). Why: the
defaults (16, and 100 for student_topk_kl) are at least V on almost every tree, and k > V is
refused while k = V turns every top-k estimator into its full-vocabulary twin, so nothing of the
truncation would be measured; k = 1 is degenerate (the renormalised KL on one token is 0, so
topk_kl and student_topk_kl have zero gradient and vopd_topk's baseline is 0, i.e. opd); a fixed
share of the vocabulary (a quarter) keeps the truncation comparable across V. A consequence to
keep in mind when reading the table: at V = 3, k = 2 leaves a one-token tail, so topk_tail_kl is
exactly full_kl there (unbiased on those trees). Other parameters are the registry defaults, so
vopd_scaled (alpha = 1) is vopd and k2 is opd on every sample; they are kept as checks.

Crossovers against opd (per tree and target, ``vopd_analysis.stats.mse_crossover`` with y = opd): the
batch sizes B where x's batch-B MSE is below opd's: B < B* ("below"), every B ("always"), none
("never"), B > B* ("above"), or "tie"; the squared-bias gap is taken as 0 when |E g_x - E g_opd| <=
1e-10 |g| (the same expectation up to round-off).

Tree sets: quick mode runs the whole 540-tree quick grid except that the 180 trees with V = 32
are thinned to seed 0 (60 trees; 420 trees in all): one V = 32 tree costs ~2.5 s of the engines'
time on one thread (21 DP passes and 3 enumerations) against ~0.08 s for V <= 8, so the 540 would
take ~8 minutes; the 420 took 135-195 s wall on a shared 2-core machine. Full mode runs the whole
540-tree quick sweep plus the baseline_quality full grid with V <= 16 in full and V in {32, 64}
thinned to seed 0 (``thin_vocab``, ``thin_seeds``), 20280 distinct trees; a V = 64, H = 3 tree costs
~34 s, so full mode is some 3-4 hours on one thread (not run for the committed outputs).
"""

from __future__ import annotations

import itertools
import json
import math
import time

import numpy as np
import pandas as pd

from synthetic.tree import make_tree
from vopd_analysis import estimators as est
from vopd_analysis import stats
from vopd_analysis.tabular import analysis
from vopd_analysis.tabular.dp import dp_moments
from vopd_analysis.tabular.enumeration import exact_moments
from vopd_analysis.tabular.targets import target_gradient, tree_quantities

from . import baseline_quality, common

NAME = "estimator_zoo"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
GRID_KEYS = ("vocab", "horizon", "divergence", "teacher_temperature", "coupling", "teacher_shape", "seeds")
TREE_KEYS = ("vocab", "horizon", "divergence", "teacher_temperature", "coupling", "teacher_shape", "seed")
COST = {"sampled": "1 log-prob", "topk": "k log-probs", "full": "V logits", "oracle": "oracle"}
UNBIASED_TOL = 1e-10          # relative L2 bias below which an estimator counts as unbiased on a tree
SCATTER = ("iw_opd", "topk_tail_kl", "student_topk_kl", "k3_clamped", "topk_kl")
DEFAULTS = {
    "quick": {"grids": [{"base": "quick", "thin_vocab": 32, "thin_seeds": [0]}], "batch_sizes": [1, 16, 256],
              "topk_share": 0.25, "topk_min": 2, "rho": 0.5, "engine": "auto"},
    "full": {"grids": [{"base": "quick"}, {"base": "full", "thin_vocab": 32, "thin_seeds": [0]}],
             "batch_sizes": [1, 16, 256], "topk_share": 0.25, "topk_min": 2, "rho": 0.5, "engine": "auto"},
}


# ----------------------------------------------------------------------------- trees and estimators

def trees(config: dict) -> list:
    """The tree specs (dicts of TREE_KEYS), in baseline_quality's grid order, without duplicates.

    Each entry of ``config["grids"]`` is baseline_quality.DEFAULTS[base] updated with the entry's own
    grid keys; trees with vocab >= thin_vocab keep only the seeds in thin_seeds.
    """
    out, seen = [], set()
    for spec in config["grids"]:
        grid = {**{k: baseline_quality.DEFAULTS[spec.get("base", "quick")][k] for k in GRID_KEYS},
                **{k: v for k, v in spec.items() if k in GRID_KEYS}}
        thin_vocab, thin_seeds = spec.get("thin_vocab"), spec.get("thin_seeds")
        for values in itertools.product(*(grid[k] for k in GRID_KEYS)):
            tree = dict(zip(TREE_KEYS, values))
            if thin_vocab is not None and tree["vocab"] >= thin_vocab and tree["seed"] not in thin_seeds:
                continue
            key = tuple(tree.values())
            if key not in seen:
                seen.add(key)
                out.append(tree)
    return out


def topk_size(default: int, vocab: int, config: dict) -> int:
    """k = min(default, max(topk_min, ceil(topk_share V))), never above V."""
    return min(default, vocab, max(config["topk_min"], math.ceil(config["topk_share"] * vocab)))


def specs(vocab: int, config: dict) -> dict:
    """{label: {"name": estimator, **params}}: every non-group registry entry at its defaults (top-k sizes
    by ``topk_size``), then opd and vopd with rho = config["rho"]."""
    out = {}
    for name, entry in est.REGISTRY.items():
        if entry.group:
            continue
        spec = {"name": name}
        if "k" in entry.defaults:
            spec["k"] = topk_size(entry.defaults["k"], vocab, config)
        out[name] = spec
    for name in ("opd", "vopd"):
        out[f"{name}[rho={config['rho']:g}]"] = {"name": name, "rho": config["rho"]}
    return out


def _params(spec: dict) -> dict:
    return {k: v for k, v in spec.items() if k != "name"}


def moments(tree, tq, table: dict, engine: str) -> tuple:
    """({label: Moments}, {label: engine used}, {engine: seconds})."""
    dp = {label: s for label, s in table.items()
          if engine == "auto" and analysis.dp_applies(s)}
    rest = {label: s for label, s in table.items() if label not in dp}
    out, used, seconds = {}, {}, {"dp": 0.0, "enumeration": 0.0}
    for name, chosen, run in (("dp", dp, dp_moments), ("enumeration", rest, exact_moments)):
        if chosen:
            started = time.perf_counter()
            out.update(run(tree, chosen, quantities=tq))
            seconds[name] += time.perf_counter() - started
            used.update({label: name for label in chosen})
    return out, used, seconds


# ----------------------------------------------------------------------------- the table

def _sq(x) -> float:
    return float((x ** 2).sum())


def _cos(x, y) -> float:
    """cos(E g, target): 1 when the bias is a pure (positive) rescaling of the target; NaN when
    |E g| <= 1e-10 |target| (a zero mean, as k1's, has no direction)."""
    nx, ny = math.sqrt(_sq(x)), math.sqrt(_sq(y))
    return float((x * y).sum()) / (nx * ny) if nx > UNBIASED_TOL * ny and ny > 0 else np.nan


def compute(config: dict) -> tuple:
    rows = []
    timing = {"dp": 0.0, "enumeration": 0.0, "trees": 0}
    for spec in trees(config):
        tree = make_tree(spec["vocab"], spec["horizon"], divergence=spec["divergence"],
                         teacher_temperature=spec["teacher_temperature"], coupling=spec["coupling"],
                         teacher_shape=spec["teacher_shape"], seed=spec["seed"])
        tq = tree_quantities(tree)
        table = specs(spec["vocab"], config)
        m, used, seconds = moments(tree, tq, table, config["engine"])
        for name in ("dp", "enumeration"):
            timing[name] += seconds[name]
        timing["trees"] += 1
        tok, seq = tq.grad_token, tq.grad_sequence
        tok_sq, seq_sq = _sq(tok), _sq(seq)
        future_share = math.sqrt(_sq(tq.grad_future) / seq_sq) if seq_sq > 0 else np.nan
        var_opd = m["opd"].total_variance
        bias = {label: (_sq(mom.mean - tok), _sq(mom.mean - seq)) for label, mom in m.items()}
        gap = {label: _sq(mom.mean - m["opd"].mean) for label, mom in m.items()}
        for label, s in table.items():
            entry, params = est.get(s["name"]), _params(s)
            mom = m[label]
            target = entry.target_for(**params)
            claimed = target_gradient(tq, target)
            b_tok, b_seq = bias[label]
            row = {**spec, "estimator": label, "name": entry.name, "params": json.dumps(entry.params(**params),
                                                                                          sort_keys=True),
                   "k": s.get("k", np.nan), "target": target, "teacher_signal": entry.teacher_signal,
                   "cost": COST[entry.teacher_signal], "analysis_only": entry.analysis_only,
                   "reference": entry.reference, "engine": used[label], "future_share": future_share,
                   "rel_bias_token": math.sqrt(b_tok / tok_sq), "rel_bias_sequence": math.sqrt(b_seq / seq_sq),
                   # against the claimed target, relative to its norm (to |g_tok| for the target "zero")
                   "rel_bias_claimed": (np.nan if claimed is None else math.sqrt(
                       _sq(mom.mean - claimed) / (tok_sq if target == "zero" else _sq(claimed)))),
                   "cosine_token": _cos(mom.mean, tok), "cosine_sequence": _cos(mom.mean, seq),
                   "bias_sq_token": b_tok, "bias_sq_sequence": b_seq, "total_variance": mom.total_variance,
                   "var_ratio": mom.total_variance / var_opd, "target_sq_token": tok_sq, "target_sq_sequence": seq_sq}
            for B in config["batch_sizes"]:
                row[f"mse_token_B{B}"] = mom.mse(tok, B)
            for B in config["batch_sizes"]:
                row[f"mse_sequence_B{B}"] = mom.mse(seq, B)
            for tname, tsq, bx in (("token", tok_sq, b_tok), ("sequence", seq_sq, b_seq)):
                b_opd = bias["opd"][0 if tname == "token" else 1]
                row[f"crossover_{tname}_B"], row[f"crossover_{tname}_regime"] = stats.mse_crossover(
                    bx, mom.total_variance, b_opd, var_opd, gap[label] <= UNBIASED_TOL ** 2 * tsq)
            rows.append(row)
    timing = {k: (round(v, 2) if isinstance(v, float) else v) for k, v in timing.items()}
    return pd.DataFrame(rows), {"engine_seconds": timing}


# ----------------------------------------------------------------------------- summaries

def _q(x: pd.Series, p: float) -> float:
    return float(np.quantile(x.to_numpy(dtype=float), p))


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """One row per estimator, ranked: first those unbiased for g_tok on every tree, by median var/var(opd),
    then the others, by the same."""
    rows = []
    for label, g in df.groupby("estimator", sort=False):
        first = g.iloc[0]
        ks = sorted({int(k) for k in g["k"].dropna()})
        rows.append({"estimator": label, "k": ",".join(map(str, ks)) if ks else "",
                     "target": first["target"], "teacher_signal": first["teacher_signal"], "cost": first["cost"],
                     "analysis_only": bool(first["analysis_only"]), "engine": first["engine"],
                     "var_ratio_median": _q(g["var_ratio"], 0.5), "var_ratio_p10": _q(g["var_ratio"], 0.1),
                     "var_ratio_p90": _q(g["var_ratio"], 0.9),
                     "rel_bias_token_median": _q(g["rel_bias_token"], 0.5),
                     "rel_bias_sequence_median": _q(g["rel_bias_sequence"], 0.5),
                     "rel_bias_sequence_median_coupled": (_q(g.loc[g["coupling"] > 0, "rel_bias_sequence"], 0.5)
                                                          if (g["coupling"] > 0).any() else np.nan),
                     "cosine_token_median": (_q(g["cosine_token"].dropna(), 0.5) if g["cosine_token"].notna().any()
                                             else np.nan),
                     "unbiased_token_share": float((g["rel_bias_token"] < UNBIASED_TOL).mean()),
                     "unbiased_sequence_share": float((g["rel_bias_sequence"] < UNBIASED_TOL).mean()),
                     "max_rel_bias_claimed": float(g["rel_bias_claimed"].max()) if first["target"] != "none"
                     else np.nan,
                     "reference": first["reference"], "trees": len(g)})
    out = pd.DataFrame(rows)
    out["group"] = np.where(out["unbiased_token_share"] == 1.0, "unbiased for g_tok", "biased for g_tok on some tree")
    out = out.sort_values(["group", "var_ratio_median"], ascending=[False, True], kind="stable")
    out.insert(0, "rank", range(1, len(out) + 1))
    return out.reset_index(drop=True)


def versus(df: pd.DataFrame, x: str, y: str) -> dict:
    """Share of trees with var(x) < var(y), and the median and 10-90% range of var(x)/var(y)."""
    v = df.pivot_table(index=list(TREE_KEYS), columns="estimator", values="total_variance")[[x, y]]
    ratio = v[x] / v[y]
    return {"x": x, "y": y, "trees": int(len(ratio)), "share_below": float((v[x] < v[y]).mean()),
            "ratio_median": _q(ratio, 0.5), "ratio_p10": _q(ratio, 0.1), "ratio_p90": _q(ratio, 0.9),
            "ratio_min": float(ratio.min()), "ratio_max": float(ratio.max())}


def crossovers(df: pd.DataFrame) -> pd.DataFrame:
    """Per estimator (opd excluded) and target: the share of trees in each regime, and B* over the 'below' trees
(x wins for B < B*) and over the 'above' trees (x wins for B > B*)."""
    rows = []
    for label, g in df[df["estimator"] != "opd"].groupby("estimator", sort=False):
        for tname in ("token", "sequence"):
            regime = g[f"crossover_{tname}_regime"]
            row = {"estimator": label, "against": "g_tok" if tname == "token" else "grad J", "trees": len(g)}
            for r in ("always", "below", "above", "never", "tie"):
                row[f"share_{r}"] = float((regime == r).mean())
            for r in ("below", "above"):
                b = g.loc[regime == r, f"crossover_{tname}_B"]
                row.update({f"Bstar_{r}_{s}": _q(b, p) if len(b) else np.nan
                            for s, p in (("median", 0.5), ("p10", 0.1), ("p90", 0.9))})
            rows.append(row)
    return pd.DataFrame(rows)


def _g(x, digits: int = 3) -> str:
    if isinstance(x, str):
        return x
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    if isinstance(x, float) and math.isinf(x):
        return "inf"
    return f"{x:.{digits}g}"


def _share(x: float) -> str:
    return f"{100 * x:.0f}%"


def markdown(table: pd.DataFrame, cross: pd.DataFrame, pairs: list, df: pd.DataFrame, config: dict,
             timing: dict) -> str:
    n_trees = df.groupby(list(TREE_KEYS)).ngroups
    vocab_counts = df.drop_duplicates(list(TREE_KEYS))["vocab"].value_counts().sort_index()
    zipf = df.drop_duplicates(list(TREE_KEYS))["teacher_shape"].eq("zipf").sum()
    coupled = df.drop_duplicates(list(TREE_KEYS))["coupling"].gt(0).sum()
    lines = ["# Beyond vOPD: every registered estimator, exactly\n",
             f"{n_trees} trees of the baseline_quality sweep (per vocabulary: "
             + ", ".join(f"V={v}: {c}" for v, c in vocab_counts.items())
             + f"; {zipf} with a Zipf teacher, {coupled} with coupling > 0), {df['estimator'].nunique()} estimators, "
             "every number exact (DP where the estimator has a DP credit, enumeration otherwise). "
             "Top-k sizes k = min(default, max(2, ceil(V/4))). var ratio = tr Cov / tr Cov(opd) on the same tree; "
             f"relative bias |E g - g|/|g| (cos: the cosine of E g with g_tok, 1 for a pure rescaling); "
             f"'unbiased' = relative bias < {UNBIASED_TOL:g}. "
             "rtg_oracle and rb_seq_oracle read the exact KL-to-go: analysis-only floors, not trainable. "
             "vopd_scaled (alpha = 1) is vopd and k2 is opd (checks). At V = 3, k = 2 leaves a one-token tail, so "
             "topk_tail_kl is exactly full_kl on those trees.\n",
             "## Ranking\n",
             "Ranked by median var ratio, first the estimators unbiased for g_tok on every tree, then the rest.\n"]
    shown = pd.DataFrame({
        "rank": table["rank"], "estimator": table["estimator"], "k": table["k"].replace("", "-"),
        "target": table["target"], "cost": table["cost"] + np.where(table["analysis_only"], " (analysis-only)", ""),
        "var/var(opd) median": table["var_ratio_median"].map(_g),
        "10-90%": [f"{_g(a)}-{_g(b)}" for a, b in zip(table["var_ratio_p10"], table["var_ratio_p90"])],
        "rel bias g_tok (median)": table["rel_bias_token_median"].map(lambda x: _g(x, 2)),
        "rel bias grad J (median)": table["rel_bias_sequence_median"].map(lambda x: _g(x, 2)),
        "rel bias grad J (median, coupled trees)": table["rel_bias_sequence_median_coupled"].map(lambda x: _g(x, 2)),
        "cos(E g, g_tok) (median)": table["cosine_token_median"].map(lambda x: _g(x, 3)),
        "unbiased g_tok": table["unbiased_token_share"].map(_share),
        "unbiased grad J": table["unbiased_sequence_share"].map(_share),
        "reference": table["reference"].replace("", "-")})
    lines.append(common.markdown_table(shown))
    lines.append("## b* against vOPD's baseline\n")
    for p in pairs:
        lines.append(f"- var({p['x']}) < var({p['y']}) on {_share(p['share_below'])} of {p['trees']} trees; "
                     f"var({p['x']})/var({p['y']}): median {_g(p['ratio_median'], 4)}, 10-90% "
                     f"{_g(p['ratio_p10'], 4)}-{_g(p['ratio_p90'], 4)} (min {_g(p['ratio_min'], 4)}, "
                     f"max {_g(p['ratio_max'], 4)}).")
    lines.append("\n## Batch-B MSE against opd's\n")
    lines.append("Per tree, x's batch-B MSE is below opd's for B < B* ('below'), at every B ('always'), at no B "
                 "('never') or for B > B* ('above'); B* = (var_opd - var_x) / (|bias_x|^2 - |bias_opd|^2). "
                 "Shares of trees, and B* over the 'below' and over the 'above' trees.\n")
    shown = cross.copy()
    for r in ("always", "below", "above", "never", "tie"):
        shown[f"share_{r}"] = shown[f"share_{r}"].map(_share)
    for r in ("below", "above"):
        shown[f"B* ({r}) median"] = shown[f"Bstar_{r}_median"].map(_g)
        shown[f"B* ({r}) 10-90%"] = [f"{_g(a)}-{_g(b)}" if not math.isnan(a) else "-"
                                     for a, b in zip(shown[f"Bstar_{r}_p10"], shown[f"Bstar_{r}_p90"])]
    shown = shown.drop(columns=[c for c in shown.columns if c.startswith("Bstar_")])
    lines.append(common.markdown_table(shown))
    worst = table.loc[table["target"] != "none", "max_rel_bias_claimed"].max()
    lines.append("Check: the largest relative bias of any estimator against its own claimed target is "
                 f"{_g(worst, 2)}.\n")
    lines.append(f"Engine time: {timing['dp']} s DP, {timing['enumeration']} s enumeration, {timing['trees']} trees.\n")
    return "\n".join(lines)


def figure(df: pd.DataFrame, table: pd.DataFrame):
    import matplotlib.pyplot as plt
    import seaborn as sns
    fig, axes = plt.subplots(2, 2, figsize=(16, 11), gridspec_kw={"width_ratios": [1.15, 1]})
    ax = axes[0, 0]
    order = list(table["estimator"])
    data = df.assign(group=df["estimator"].map(dict(zip(table["estimator"], table["group"]))))
    sns.boxplot(data, y="estimator", x="var_ratio", order=order, hue="group", ax=ax, fliersize=1.2, orient="h",
                dodge=False)
    ax.set_xscale("log")
    ax.axvline(1, color="red", lw=0.8)
    ax.set_xlabel("tr Cov / tr Cov(opd), same tree")
    ax.set_ylabel("")
    ax.set_title(f"variance ratio to opd over {df.groupby(list(TREE_KEYS)).ngroups} trees (ranked)")
    ax.legend(loc="lower right", fontsize=8)
    sub = df[df["estimator"].isin(SCATTER)]
    biased = sub[["rel_bias_token", "rel_bias_sequence"]].to_numpy().ravel()
    biased = biased[biased >= UNBIASED_TOL]
    floor = 10 ** np.floor(np.log10(0.5 * biased.min())) if len(biased) else UNBIASED_TOL
    for ax, col, label in ((axes[0, 1], "rel_bias_token", "g_tok"), (axes[1, 1], "rel_bias_sequence", "∇J")):
        sns.scatterplot(sub.assign(bias=sub[col].clip(lower=floor)), x="var_ratio", y="bias", hue="estimator",
                        style="vocab", ax=ax, s=12, alpha=0.6)
        opd = df[df["estimator"] == "opd"]
        ax.scatter(opd["var_ratio"], opd[col].clip(lower=floor), marker="*", s=60, color="black", label="opd",
                   zorder=5)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.axvline(1, color="grey", lw=0.8, ls="--")
        ax.set_xlabel("tr Cov / tr Cov(opd)")
        ax.set_ylabel(f"|E g - {label}| / |{label}| (unbiased, < {UNBIASED_TOL:g}: drawn at {floor:g})")
        ax.set_title(f"bias against {label} vs variance reduction")
        ax.legend(fontsize=7, ncol=2)
    ax = axes[1, 0]
    v = df.pivot_table(index=list(TREE_KEYS), columns="estimator", values="total_variance")
    for x, y in (("opd_bstar", "vopd"), ("opd_bstar_topk", "vopd_topk")):
        ratio = np.log10(v[x] / v[y])
        ax.hist(ratio, bins=40, alpha=0.55, label=f"var({x}) / var({y})")
    ax.axvline(0, color="red", lw=0.8)
    ax.set_xlabel("log10 variance ratio")
    ax.set_ylabel("trees")
    ax.set_title("the variance-optimal scalar baseline b* against vOPD's KL baseline")
    ax.legend()
    fig.tight_layout()
    return fig


def report(df: pd.DataFrame, config: dict, timing: dict | None = None) -> common.Report:
    table = summary(df)
    cross = crossovers(df)
    pairs = [versus(df, "opd_bstar", "vopd"), versus(df, "opd_bstar_topk", "vopd_topk")]
    text = markdown(table, cross, pairs, df, config, timing or {"dp": "?", "enumeration": "?", "trees": "?"})
    printed = table[["rank", "estimator", "target", "cost", "var_ratio_median", "var_ratio_p10", "var_ratio_p90",
                     "rel_bias_token_median", "rel_bias_sequence_median", "unbiased_token_share",
                     "unbiased_sequence_share"]]
    said = [printed.to_string(index=False, float_format=lambda x: f"{x:.3g}")]
    said += [f"var({p['x']}) < var({p['y']}) on {p['share_below']:.1%} of {p['trees']} trees; ratio median "
             f"{p['ratio_median']:.4g} (10-90% {p['ratio_p10']:.4g}-{p['ratio_p90']:.4g})" for p in pairs]
    def clean(records):
        return [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()}
                for r in records]
    return common.Report(text="\n".join(said),
                         extra={"trees": int(df.groupby(list(TREE_KEYS)).ngroups),
                                "topk_rule": "k = min(default, max(topk_min, ceil(topk_share * V)))",
                                "summary": clean(table.to_dict(orient="records")),
                                "bstar_vs_vopd": pairs[0], "bstar_topk_vs_vopd_topk": pairs[1],
                                "crossovers": clean(cross.to_dict(orient="records"))},
                         figure_args=(table,), markdown=text)


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    timing = {}

    def _compute(cfg):
        df, extra = compute(cfg)
        timing.update(extra["engine_seconds"])
        return df, extra

    return common.run_study(NAME, DEFAULTS, _compute, figure, report=lambda df, cfg: report(df, cfg, timing),
                            quick=quick, out_dir=out_dir, config=config, plot=plot, seed="seed")


if __name__ == "__main__":
    common.main(run, __doc__)
