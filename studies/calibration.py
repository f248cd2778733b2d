"""Study: does montecarlo.unbiasedness_test keep the false-positive rate it states, and what power is left?

For every registry estimator that claims a target (top-k ones at k = 2; the
group estimators seq_rloo and seq_grpo with K = 4), on the environments of the
unbiasedness study, a larger random tree (V=5, H=4, coupling 1) and the
heavy-tailed Zipf tree make_tree(4, 3, coupling=1, teacher_shape="zipf", seed=3):
``reps`` independent repetitions of n draws for each n, each tested against the
claimed target at level alpha. Per cell: the rejection rate among all runs and
among the runs with a verdict, each with its Clopper-Pearson 95% interval, the
inconclusive rate, the median number of draws the test asked for, and the
rejection rate of the plain Bonferroni t-test (``plain_p_value``: the test
before the skewness and unresolved-coordinate guards). Biased cases give the
power: topk_kl, gkd_jsd (beta = 0.5) and k3 against g_tok everywhere, rtg
(gamma = 0.5) against g_tok and opd against grad J on the coupled trees.

A single-sequence estimator's draw is a function of the sampled sequence, so
the draws of all V^H sequences are computed once and a repetition is a
multinomial count vector over them (unbiasedness_test takes distinct rows with
counts): the same law as sampling, at a fraction of the cost. Group estimators
are sampled (montecarlo.sample_gradients), with n up to ``group_ns``.
"""

from __future__ import annotations

import os

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")  # small matrices: BLAS threads only fight for the cores

import zlib  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from synthetic.tree import make_tree  # noqa: E402
from vopd_analysis import estimators as est  # noqa: E402
from vopd_analysis import stats  # noqa: E402
from vopd_analysis.tabular.enumeration import exact_moments  # noqa: E402
from vopd_analysis.tabular.montecarlo import (  # noqa: E402
    NOT_REJECTED_SHARE,
    SIZE_ERROR_SHARE,
    sample_gradients,
    sequence_draws,
    unbiasedness_test,
)
from vopd_analysis.tabular.targets import target_gradient, tree_quantities  # noqa: E402

from . import common  # noqa: E402
from .unbiasedness import ENVS as UNBIASEDNESS_ENVS  # noqa: E402

NAME = "test_calibration"   # the outputs keep their committed names (figures/full/test_calibration.*)
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
ENVS = {**UNBIASEDNESS_ENVS,
        "zipf_heavy": lambda seed: make_tree(4, 3, coupling=1.0, teacher_shape="zipf", seed=3 + seed),
        "tree_large": lambda seed: make_tree(5, 4, coupling=1.0, seed=seed)}
COUPLED = {"tree_coupled", "zipf", "zipf_heavy", "tree_large"}
BIASED = {  # label: (spec, tested against, coupled environments only)
    "topk_kl": ({"name": "topk_kl", "k": 2}, "token", False),
    "gkd_jsd": ({"name": "gkd_jsd"}, "token", False),
    "k3 vs g_tok": ({"name": "k3"}, "token", False),
    "rtg_g0.5": ({"name": "rtg", "gamma": 0.5}, "token", True),
    "opd vs grad J": ({"name": "opd"}, "sequence", True),
}
_COMMON = {"seed": 0, "envs": list(ENVS), "k": 2, "alpha": 0.05, "biased": list(BIASED)}
DEFAULTS = {
    "quick": {**_COMMON, "reps": 60, "ns": [200, 2000, 10000], "group_reps": 30, "group_ns": [200, 2000]},
    "full": {**_COMMON, "reps": 400, "ns": [100, 200, 500, 2000, 10000, 100000], "group_reps": 400,
             "group_ns": [100, 200, 500, 2000]},
}
SHARES = (1.0, 0.5, 0.2, 0.1, SIZE_ERROR_SHARE)   # the shares r of alpha compared in the sweep
UNDERPOWERED = ("quick mode is underpowered: {reps} repetitions (group estimators {group_reps}) give a 95% "
                "interval about +-{half:.2f} wide at a 5% rate; the full mode has 400")


def unbiased_specs(k: int) -> dict:
    """{label: spec} of the registry estimators that claim a target (top-k ones at ``k``)."""
    out = {}
    for entry in est.REGISTRY.values():
        spec = {"name": entry.name, **({"k": k} if "k" in entry.defaults else {})}
        if entry.target_for(**{p: v for p, v in spec.items() if p != "name"}) != "none":
            out[entry.name] = spec
    return out


def cases(env: str, k: int, biased: list) -> list:
    """(label, spec, tested against, unbiased?) for one environment."""
    out = [(label, spec, est.get(spec["name"]).target_for(**_params(spec)), True)
           for label, spec in unbiased_specs(k).items()]
    out += [(label, BIASED[label][0], BIASED[label][1], False) for label in biased
            if not BIASED[label][2] or env in COUPLED]
    return out


def _params(spec: dict) -> dict:
    return {p: v for p, v in spec.items() if p != "name"}


def target_vector(tq, against: str, spec: dict) -> np.ndarray:
    """The exact vector tested against; 'scaled_sequence' is (K-1)/K grad J."""
    if against == "scaled_sequence":
        K = est.get(spec["name"]).params(**_params(spec))["group_size"]
        return ((K - 1) / K * tq.grad_sequence).numpy().ravel()
    return target_gradient(tq, against).numpy().ravel()


def _rng(config: dict, *names) -> np.random.Generator:
    """An independent stream per cell (names hashed, so adding cells does not move the others)."""
    return np.random.default_rng([config["seed"], *(zlib.crc32(str(x).encode()) for x in names)])


def tabulated_results(table: np.ndarray, probs: np.ndarray, target: np.ndarray, n: int, rng, reps: int,
                      alpha: float) -> list:
    """``reps`` tests of n draws each, a draw being a row of ``table`` picked with ``probs`` (sequence_draws)."""
    return [unbiasedness_test(table, target, alpha=alpha, counts=c) for c in rng.multinomial(n, probs, size=reps)]


def sampled_results(tree, spec: dict, target: np.ndarray, n: int, rng, reps: int, alpha: float) -> list:
    """``reps`` tests of n sampled draws each (group estimators)."""
    seeds = rng.integers(0, 2 ** 62, size=reps)
    return [unbiasedness_test(sample_gradients(tree, spec["name"], n, int(s), **_params(spec)), target, alpha=alpha)
            for s in seeds]


def share_sweep(results: list, alpha: float) -> dict:
    """Verdicts and rejections had the skewness rule used the share r' of alpha for rejections (N_skew scales as
    1/r: a rejection is a verdict iff n >= N_skew r / r'), with non-rejections at NOT_REJECTED_SHARE as in the
    test ("split") or at r' too ("same")."""
    out = {}
    for share in SHARES:
        for mode, other in (("split", NOT_REJECTED_SHARE), ("same", share)):
            verdict = [not r.unresolved and r.draws * (share if r.p_value < alpha else other)
                       >= r.skewness_draws * SIZE_ERROR_SHARE for r in results]
            out[f"verdicts_{mode}_r{share:g}"] = sum(verdict)
            out[f"rejected_{mode}_r{share:g}"] = sum(v and r.p_value < alpha for v, r in zip(verdict, results))
    return out


def summarise(results: list, alpha: float) -> dict:
    """Rates and intervals of one cell."""
    reps = len(results)
    rejected = sum(r.reject for r in results)
    verdicts = sum(not r.inconclusive for r in results)
    needed = [r.draws_needed for r in results if r.inconclusive]
    low, high = stats.clopper_pearson(rejected, reps)
    v_low, v_high = stats.clopper_pearson(rejected, verdicts)
    return {"reps": reps, "reject_rate": rejected / reps, "reject_low": low, "reject_high": high,
            "verdicts": verdicts, "inconclusive_rate": 1 - verdicts / reps,
            "reject_given_verdict": rejected / verdicts if verdicts else np.nan,
            "rgv_low": v_low, "rgv_high": v_high,
            "median_draws_needed": float(np.median(needed)) if needed else np.nan,
            "plain_reject_rate": float(np.mean([r.plain_p_value < alpha for r in results])),
            **share_sweep(results, alpha)}


def _relative_bias(tree, tq, spec: dict, target: np.ndarray) -> float:
    """|E g - target| / |g_tok|, exact (nan for group estimators)."""
    if est.get(spec["name"]).group:
        return np.nan
    mean = exact_moments(tree, {"x": spec}, quantities=tq)["x"].mean.numpy().ravel()
    return float(np.linalg.norm(mean - target) / np.linalg.norm(tq.grad_token.numpy()))


def env_rows(env: str, config: dict) -> list:
    tree = ENVS[env](config["seed"])
    tq = tree_quantities(tree)
    rows = []
    for label, spec, against, unbiased in cases(env, config["k"], config["biased"]):
        target = target_vector(tq, against, spec)
        group = est.get(spec["name"]).group
        table, probs = (None, None) if group else sequence_draws(tree, spec["name"], **_params(spec))
        for n in config["group_ns"] if group else config["ns"]:
            rng = _rng(config, env, label, n)
            if group:
                results = sampled_results(tree, spec, target, n, rng, config["group_reps"], config["alpha"])
            else:
                results = tabulated_results(table, probs, target, n, rng, config["reps"], config["alpha"])
            rows.append({"env": env, "estimator": label, "unbiased": unbiased, "tested_against": against,
                         "rel_bias": 0.0 if unbiased else _relative_bias(tree, tq, spec, target), "n": n,
                         **summarise(results, config["alpha"])})
    return rows


def compute(config: dict) -> pd.DataFrame:
    return pd.DataFrame([row for env in config["envs"] for row in env_rows(env, config)])


def _cell(row) -> dict:
    keys = ["env", "estimator", "n", "verdicts", "reject_given_verdict", "rgv_low", "rgv_high", "reject_rate"]
    return {k: (row[k].item() if hasattr(row[k], "item") else row[k]) for k in keys}


def sweep_table(unbiased: pd.DataFrame, alpha: float) -> pd.DataFrame:
    """Per share r for rejections and per rule for non-rejections: cells with verdicts, cells whose interval of
    P(reject | verdict) lies above alpha, the mean verdict rate."""
    rows = []
    for mode, label in (("split", f"r = {NOT_REJECTED_SHARE:g}"), ("same", "the same r")):
        for share in SHARES:
            k, v = unbiased[f"rejected_{mode}_r{share:g}"], unbiased[f"verdicts_{mode}_r{share:g}"]
            low = np.array([stats.clopper_pearson(int(a), int(b))[0] for a, b in zip(k, v)])
            rows.append({"r for rejections": share, "non-rejections at": label,
                         "cells with verdicts": int((v > 0).sum()), "cells above alpha": int((low > alpha).sum()),
                         "verdict rate": round(float((v / unbiased["reps"]).mean()), 3)})
    return pd.DataFrame(rows)


def calibration_summary(df: pd.DataFrame, alpha: float, min_verdicts: int) -> dict:
    """The worst unbiased cells, how many cells exceed alpha beyond their interval, and the sweep over r."""
    unbiased = df[df["unbiased"]]
    judged = unbiased[unbiased["verdicts"] > 0]
    many = judged[judged["verdicts"] >= min_verdicts]
    plain = unbiased.loc[unbiased["plain_reject_rate"].idxmax()]
    return {"alpha": alpha, "unbiased_cells": len(unbiased), "cells_with_verdicts": len(judged),
            "cells_above_alpha": int((judged["rgv_low"] > alpha).sum()),
            "cells_above_alpha_every_run": int((unbiased["reject_low"] > alpha).sum()),
            "most_evident_cell": _cell(judged.loc[judged["rgv_low"].idxmax()]) if len(judged) else None,
            "highest_rate_cell": _cell(many.loc[many["reject_given_verdict"].idxmax()]) if len(many) else None,
            "min_verdicts_for_highest_rate": min_verdicts,
            "worst_plain_t_cell": {"env": plain["env"], "estimator": plain["estimator"], "n": int(plain["n"]),
                                   "plain_reject_rate": float(plain["plain_reject_rate"])},
            "inconclusive_rate_by_n": unbiased.groupby("n")["inconclusive_rate"].mean().round(3).to_dict(),
            "share_sweep": sweep_table(unbiased, alpha).to_dict(orient="records")}


def _pct(x: float) -> str:
    return "-" if np.isnan(x) else f"{100 * x:.1f}%"


def summary_markdown(df: pd.DataFrame, config: dict, summary: dict) -> str:
    alpha = config["alpha"]
    unbiased, biased = df[df["unbiased"]], df[~df["unbiased"]]
    lines = [f"# Calibration of montecarlo.unbiasedness_test (alpha = {alpha}, {config['reps']} repetitions; "
             f"group estimators {config['group_reps']})\n"]
    if config["reps"] < 400:
        lines.append(UNDERPOWERED.format(**config, half=1.96 * np.sqrt(alpha * (1 - alpha) / config["reps"])) + ".\n")
    for key, what in (("highest_rate_cell", f"highest rate among cells with at least "
                                             f"{summary['min_verdicts_for_highest_rate']} verdicts"),
                      ("most_evident_cell", "highest lower interval bound")):
        w = summary[key]
        if w:
            lines.append(f"Unbiased cell with the {what}: {w['estimator']} on {w['env']} at n={w['n']}: "
                         f"{_pct(w['reject_given_verdict'])} of {w['verdicts']} verdicts rejected (95% interval "
                         f"{_pct(w['rgv_low'])}-{_pct(w['rgv_high'])}).\n")
    lines.append(f"Cells whose interval lies above alpha: {summary['cells_above_alpha']} of "
                 f"{summary['cells_with_verdicts']} with verdicts ({summary['cells_above_alpha_every_run']} "
                 f"counting every run as the denominator).\n")
    p = summary["worst_plain_t_cell"]
    lines.append(f"The plain Bonferroni t-test (the test before the guards) rejected up to "
                 f"{_pct(p['plain_reject_rate'])} ({p['estimator']} on {p['env']}, n={p['n']}).\n")
    per_env = []
    for (env, n), g in unbiased.groupby(["env", "n"], sort=False):
        top = g.loc[g["reject_given_verdict"].fillna(-1).idxmax()]
        per_env.append({"env": env, "n": n, "inconclusive (mean)": _pct(g["inconclusive_rate"].mean()),
                        "worst P(reject given verdict)": f"{_pct(top['reject_given_verdict'])} ({top['estimator']}, "
                                                  f"{int(top['verdicts'])} verdicts)",
                        "worst plain t": _pct(g["plain_reject_rate"].max())})
    lines.append("Unbiased estimators, per environment and n:\n\n" + common.markdown_table(pd.DataFrame(per_env)))
    power = biased.pivot_table(index=["env", "estimator", "rel_bias"], columns="n",
                               values=["reject_rate", "inconclusive_rate"])
    table = pd.DataFrame({f"n={n}": [f"{_pct(r)} / {_pct(i)}" for r, i in
                                     zip(power[("reject_rate", n)], power[("inconclusive_rate", n)])]
                          for n in power["reject_rate"].columns}, index=power.index).reset_index()
    table["rel_bias"] = table["rel_bias"].map(lambda x: f"{x:.2g}")
    lines.append("\nPower (reject / inconclusive) against the biased cases:\n\n" + common.markdown_table(table))
    lines.append(f"\nThe share r of alpha the skewness rule lets the t approximation's size error take "
                 f"(montecarlo.SIZE_ERROR_SHARE = {SIZE_ERROR_SHARE:g} for rejections, NOT_REJECTED_SHARE = "
                 f"{NOT_REJECTED_SHARE:g} for non-rejections), verdicts recomputed from the same runs:\n\n"
                 + common.markdown_table(sweep_table(unbiased, alpha)))
    return "\n".join(lines)


def report(df: pd.DataFrame, config: dict) -> common.Report:
    summary = calibration_summary(df, config["alpha"], min_verdicts=config["reps"] // 4)
    text = summary_markdown(df, config, summary)
    extra = {"summary": summary}
    if config["reps"] < 400:
        extra["note"] = UNDERPOWERED.format(**config, half=1.96 * np.sqrt(0.05 * 0.95 / config["reps"]))
    return common.Report(text=text, extra=extra, markdown=text, figure_args=(config["alpha"],))


def figure(df: pd.DataFrame, alpha: float):
    import matplotlib.pyplot as plt
    envs = list(dict.fromkeys(df["env"]))
    names = list(dict.fromkeys(df[df["unbiased"]]["estimator"]))
    colors = dict(zip(names, plt.cm.tab20(np.linspace(0, 1, len(names)))))
    fig, axes = plt.subplots(3, len(envs), figsize=(2.9 * len(envs), 8.5), sharex=True, sharey="row", squeeze=False)
    for j, env in enumerate(envs):
        d = df[df["env"] == env]
        for name, g in d[d["unbiased"]].groupby("estimator", sort=False):
            rate = g["reject_given_verdict"]
            axes[0, j].errorbar(g["n"], rate, yerr=[(rate - g["rgv_low"]).fillna(0), (g["rgv_high"] - rate).fillna(0)],
                                color=colors[name], marker="o", ms=3, lw=1, capsize=2, label=name, alpha=0.8)
            axes[1, j].plot(g["n"], g["inconclusive_rate"], color=colors[name], marker="o", ms=3, lw=1)
        plain = d[d["unbiased"]].groupby("n")["plain_reject_rate"].max()
        axes[0, j].plot(plain.index, plain.values, "k--", lw=1, label="plain t-test (worst estimator)")
        for name, g in d[~d["unbiased"]].groupby("estimator", sort=False):
            axes[2, j].errorbar(g["n"], g["reject_rate"], yerr=[g["reject_rate"] - g["reject_low"],
                                                                g["reject_high"] - g["reject_rate"]],
                                marker="s", ms=3, lw=1, capsize=2, label=name)
        axes[0, j].axhline(alpha, color="red", lw=1)
        axes[0, j].set_title(env)
        axes[0, j].set_ylim(-0.02, 0.5)
        axes[2, j].set_xscale("log")
        axes[2, j].set_xlabel("draws n")
        axes[2, j].legend(fontsize=6, loc="lower right")
    axes[0, 0].set_ylabel("unbiased: P(reject | verdict)")
    axes[1, 0].set_ylabel("unbiased: P(inconclusive)")
    axes[2, 0].set_ylabel("biased: P(reject) (power)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(9, len(labels)), fontsize=7, frameon=False)
    fig.suptitle(f"unbiasedness_test calibration at alpha = {alpha} (red line); 95% Clopper-Pearson intervals")
    fig.tight_layout(rect=(0, 0.06, 1, 0.97))
    return fig


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    torch.set_num_threads(1)
    return common.run_study(NAME, DEFAULTS, compute, figure, report=report, quick=quick, out_dir=out_dir,
                            config=config, plot=plot, seed="seed")


if __name__ == "__main__":
    common.main(run, __doc__)
