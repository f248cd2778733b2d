"""Distilling the tiny addition student with each estimator at its own tuned learning rate.

``distill_tiny`` compares the estimators at one learning rate (1e-3), which may suit some of them
better than others. A researcher choosing an estimator tunes the learning rate per estimator, as
optimizer benchmarks do; this study does that in two phases on disjoint seeds, so the comparison
is not made on the seeds that chose the learning rates.

Selection. Each estimator (opd, vopd, vopd_topk with k=4, opd_bstar, full_kl) trains on the grid
``lrs`` (full mode: 1e-4, 3e-4, 1e-3, 3e-3; AdamW with the tiny preset's other settings, 16
prompts x 4 rollouts per step as in distill_tiny) with the selection seeds (100, 101, 102) for
``selection_steps`` (120) steps, evaluated every ``eval_every`` (40). The rule, fixed before running
(``compare.best_lrs``): the learning rate with the lowest mean final held-out reverse KL over the
selection seeds, ties to the smaller one. When the choice is at an edge of its grid, the grid gets
the next learning rate beyond that edge on the ladder {1, 3} x 10^k (a factor of about 3: 1e-4 ->
3e-5, 3e-3 -> 1e-2, ``ladder_step``), those runs are trained and the rule applied again, at most
``max_extensions`` (2) times per estimator; the manifest records every extension and any choice
still at an edge.

Confirmation. Fresh seeds 0..9, paired across estimators (seed s gives every estimator the same
training prompts; the held-out set is the same for all), each estimator at its chosen learning
rate for ``steps`` (1,200) steps, evaluated every 40. Reported per estimator over the seeds: the
final held-out accuracy and reverse KL (mean, 95% t-interval), the paired differences to opd and
to vopd (mean, 95% t-interval, paired t-test p-value; ``distill_tiny.summary``), the steps to reach
``kl_threshold`` nats, and whether the curves flattened: the least-squares slope of the reverse KL
against step over the evaluations in the last 20% of the steps (``tail_slope``, nats per 100
steps; mean over seeds with a 95% t-interval).

Outputs: ``distill_tuned.csv`` (the confirmation runs: estimator, lr, seed, step, eval_accuracy,
eval_reverse_kl, one row per evaluation), ``distill_tuned_lr.csv`` (the selection runs, same
columns), the manifest (grids, extensions, choices, slopes, summary, train seconds; wall times stay
out of the CSVs so that a rerun writes the same bytes) and the figure: (a) final reverse KL against
learning rate with 95% bands over the selection seeds, (b) the confirmation curves, (c, d) final
reverse KL and accuracy with 95% intervals. Every run is a ``vopd distill`` folder,
``work_dir/selection/<label>-lr<LR>-seed<S>`` and ``work_dir/confirmation/...`` (the folders of
``vopd sweep --lrs``), so a killed study resumes where it stopped, and
``vopd compare work_dir/selection --best-lr`` shows the selection table.

Quick mode (opd and vopd, 2 learning rates, 1 selection seed, 2 confirmation seeds, 20 steps) only
checks the pipeline and decides nothing. Full mode: 5 x 4 x 3 = 60 selection runs of 120 steps (7,200
steps), at most 30 more if every estimator's grid is extended twice (3,600 steps), and 5 x 10 = 50
confirmation runs of 1,200 steps (60,000 steps), with ``jobs`` 2. distill_tiny's full mode (50 runs x 400
steps of the same size, 2 processes) took 2,870 s of wall time on 2 cores, 0.14 s per step with
evaluations; so about 2.7 hours on an idle machine, plus about 5 minutes of process start-up (one process
per run). The confirmation first ran for 240 steps, then 600; its best curve (full_kl) was still falling
at both (-0.91 and -0.35 nats per 100 steps), so ``steps`` was raised each time and the kept runs continued
from their last checkpoints (``steps`` is resumable: the earlier steps of each run are unchanged). The tail
slopes say whether 1,200 steps were enough for the curves to flatten.

    python -m studies.distill_tuned [--quick]
"""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

from vopd_analysis import stats
from vopd_analysis.distill import compare, sweep

from . import common, distill_small, distill_tiny

NAME = "distill_tuned"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
ESTIMATORS = {"opd": {}, "vopd": {}, "vopd_topk": {"k": 4}, "opd_bstar": {}, "full_kl": {}}
METRICS = distill_tiny.METRICS            # eval_accuracy, eval_reverse_kl
LABELS = {**distill_tiny.METRICS, **distill_small.METRICS}   # every eval metric: (short name, axis label)
RULE_METRIC = "eval_reverse_kl"           # the selection rule: lowest mean final value, ties to the smaller lr
REFERENCES = ("opd", "vopd")              # the paired differences of the confirmation
LOOP = {"preset": "tiny", "metrics": list(METRICS), "prompts_per_step": 16, "rollouts_per_prompt": 4,
        "slope_fraction": 0.2}
QUICK_NOTE = ("QUICK MODE: this only checks that the pipeline runs (too few seeds and steps to choose a learning rate "
              "or compare estimators); it decides nothing")
DEFAULTS = {
    "quick": {"estimators": {"opd": {}, "vopd": {}}, "lrs": [3e-4, 1e-3], "selection_seeds": [100],
              "selection_steps": 20, "max_extensions": 1, "seeds": [0, 1], "steps": 20, "eval_every": 10,
              "num_eval": 50, "kl_threshold": 7.5, "jobs": 1, "work_dir": None, "note": QUICK_NOTE, **LOOP},
    "full": {"estimators": ESTIMATORS, "lrs": [1e-4, 3e-4, 1e-3, 3e-3], "selection_seeds": [100, 101, 102],
             "selection_steps": 120, "max_extensions": 2, "seeds": list(range(10)), "steps": 1200, "eval_every": 40,
             "num_eval": 200, "kl_threshold": 4.0, "jobs": 2, "work_dir": "runs/distill_tuned_full", "note": None,
             **LOOP},
}


def metrics(config: dict) -> dict:
    """The config's eval metrics (``config["metrics"]``, default the tiny pair's) with their labels."""
    return {m: LABELS[m] for m in config.get("metrics", METRICS)}


def columns(config: dict) -> list:
    """The columns of both tables: estimator, lr, seed, step and the config's eval metrics."""
    return ["estimator", "lr", "seed", "step", *metrics(config)]


# ----------------------------------------------------------------------------- the selection rule's grid

def ladder_step(lr: float, side: str) -> float:
    """The next learning rate beyond ``lr`` on the ladder {1, 3} x 10^k (..., 1e-4, 3e-4, 1e-3, ...):
    the largest ladder value below ``lr`` for ``side`` "low", the smallest above it for "high".
    From a ladder value this is a factor of 3 or 10/3: 1e-4 -> 3e-5 (low), 3e-3 -> 1e-2 (high)."""
    e = math.floor(math.log10(lr))
    ladder = [float(f"{m}e{k}") for k in range(e - 2, e + 3) for m in (1, 3)]
    if side == "low":
        return max(x for x in ladder if x < lr * (1 - 1e-9))
    if side == "high":
        return min(x for x in ladder if x > lr * (1 + 1e-9))
    raise ValueError(f"side must be 'low' or 'high', got {side!r}")


def extensions(choice: pd.DataFrame, done: dict, cap: int) -> list:
    """The grid extensions the rule asks for after a selection round.

    Args:
      choice: ``compare.best_lrs(..., by="estimator")`` of the round.
      done: {estimator: extensions made so far}.
      cap: the most extensions per estimator.

    Returns:
      [{"estimator", "side", "lr"}]: for each estimator whose choice is at the low or high edge of its
      grid and that has had fewer than ``cap`` extensions, ``ladder_step`` beyond that edge.
    """
    out = []
    for r in choice.to_dict("records"):
        if r["edge"] in ("low", "high") and done.get(r["estimator"], 0) < cap:
            edge_lr = r["grid"][0] if r["edge"] == "low" else r["grid"][-1]
            out.append({"estimator": r["estimator"], "side": r["edge"], "lr": ladder_step(edge_lr, r["edge"])})
    return out


def final_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Each run's last evaluation: the rows at the largest step per (estimator, lr, seed)."""
    return df.sort_values("step", kind="stable").groupby(["estimator", "lr", "seed"], sort=False).tail(1)


def choose(selection: pd.DataFrame) -> pd.DataFrame:
    """The rule on the selection table: ``compare.best_lrs`` of the final reverse KL per estimator."""
    return compare.best_lrs(final_rows(selection), RULE_METRIC, by="estimator")


# ----------------------------------------------------------------------------- training

def base_config(config: dict, steps: int):
    """The ``DistillConfig`` every run of a phase starts from (``distill_tiny.run_config``); ``sweep.plan``
    sets its estimator, learning rate, seed and folder."""
    return distill_tiny.run_config({**config, "steps": steps, "lr": config["lrs"][0]}, "opd", {}, 0, "unused")


def train(config: dict, folder: Path, steps: int, grids: dict, seeds: list) -> tuple:
    """Train (resume, or skip when finished) every (estimator, lr in its grid, seed) as ``vopd sweep --lrs``
    folders under ``folder``; return (its table with ``columns(config)``, {"<phase>/<run>": train seconds}).

    Args:
      config: the study's config (estimators, jobs, the loop's settings).
      folder: the phase's folder of runs.
      steps: the runs' step budget.
      grids: {estimator: [learning rates]}.
      seeds: the seeds, shared by every estimator and learning rate.
    """
    base = base_config(config, steps)
    runs = [run for name, params in config["estimators"].items()
            for run in sweep.plan(base, [(name, params)], seeds, folder, grids[name])]
    failures = sweep.execute([r for r in runs if r.state() != "finished"], folder, config["jobs"])
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed (run the study again to resume them): "
                           + "; ".join(failures))
    df = compare.load_runs([r.out for r in runs])
    order = {name: i for i, name in enumerate(config["estimators"])}
    df = df.sort_values(["estimator", "lr", "seed", "step"], key=lambda c: c.map(order) if c.name == "estimator" else c)
    seconds = {f"{folder.name}/{r.name}": float(json.loads((r.out / "summary.json").read_text())["train_seconds"])
               for r in runs}
    return df[columns(config)].reset_index(drop=True), seconds


def select(config: dict, work: Path) -> tuple:
    """The selection phase: train the grids, apply the rule, extend the grids at an edge, repeat.

    Returns:
      (selection table, the last ``choose`` table, {"grids", "extensions"}, train seconds).
    """
    grids = {name: sorted(config["lrs"]) for name in config["estimators"]}
    done, made, seconds = {}, [], {}
    while True:
        table, secs = train(config, work / "selection", config["selection_steps"], grids, config["selection_seeds"])
        seconds.update(secs)
        choice = choose(table)
        more = extensions(choice, done, config["max_extensions"])
        if not more:
            return table, choice, {"grids": grids, "extensions": made}, seconds
        for e in more:
            grids[e["estimator"]] = sorted(grids[e["estimator"]] + [e["lr"]])
            done[e["estimator"]] = done.get(e["estimator"], 0) + 1
            made.append({**e, "round": done[e["estimator"]]})
            print(f"selection: {e['estimator']}'s best lr is at the {e['side']} edge of its grid; adding lr "
                  f"{compare.format_lr(e['lr'])}", flush=True)


def compute(config: dict) -> tuple:
    """Both phases: (confirmation table, selection table, last choice, {"grids", "extensions"}, seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(config.get("work_dir") or tmp)
        selection, choice, grid, seconds = select(config, work)
        chosen = dict(zip(choice["estimator"], choice["lr"]))
        confirmation, secs = train(config, work / "confirmation", config["steps"],
                                   {name: [lr] for name, lr in chosen.items()}, config["seeds"])
    return confirmation, selection, choice, grid, {**seconds, **secs}


# ----------------------------------------------------------------------------- the report

def tail_slope(curve: pd.DataFrame, fraction: float = 0.2, metric: str = RULE_METRIC) -> float:
    """Whether a curve has flattened: the least-squares slope of ``metric`` against step, in units per 100
    steps, over the evaluations at step >= (1 - ``fraction``) x the last step (at least the last two
    evaluations); NaN with fewer than two evaluations.

    The slope of a line fitted to (s_i, y_i) is sum (s_i - mean s)(y_i - mean y) / sum (s_i - mean s)^2.
    """
    curve = curve.sort_values("step")
    tail = curve[curve["step"] >= (1 - fraction) * curve["step"].max()]
    if len(tail) < 2:
        tail = curve.tail(2)
    if len(tail) < 2:
        return math.nan
    s, y = tail["step"].to_numpy(float), tail[metric].to_numpy(float)
    return float(100 * ((s - s.mean()) * (y - y.mean())).sum() / ((s - s.mean()) ** 2).sum())


def slopes(df: pd.DataFrame, fraction: float) -> tuple:
    """(per run: estimator, seed, kl_slope; per estimator: kl_slope mean and 95% t-interval over seeds)."""
    runs = pd.DataFrame([{"estimator": name, "seed": seed, "kl_slope": tail_slope(g, fraction)}
                         for (name, seed), g in df.groupby(["estimator", "seed"], sort=False)])
    per = [{"estimator": name, **dict(zip(("kl_slope", "kl_slope_low", "kl_slope_high"),
                                          stats.mean_interval(g["kl_slope"])))}
           for name, g in runs.groupby("estimator", sort=False)]
    return runs, pd.DataFrame(per)


def summary(df: pd.DataFrame, config: dict) -> pd.DataFrame:
    """Per estimator on the confirmation runs: its lr, ``distill_tiny.summary`` (final values with
    intervals, steps to the threshold) with the paired differences to each of ``REFERENCES`` present
    (columns ``<metric>_minus_<reference>``, ``_low``, ``_high``, ``_p`` and the detectable difference
    ``_mde``, ``distill_tiny.detectable_differences``), and the tail slopes."""
    labels = metrics(config)
    out = distill_tiny.summary(df, config["kl_threshold"], reference="(none)", metrics=labels)
    for ref in (r for r in REFERENCES if r in set(df["estimator"])):
        out = out.merge(distill_tiny.differences_to(df, ref, labels), on="estimator")
    lrs = df.groupby("estimator", sort=False)["lr"].first().rename("lr")
    out = out.merge(lrs, left_on="estimator", right_index=True)
    out = out[["estimator", "lr", *[c for c in out if c not in ("estimator", "lr")]]]
    return out.merge(slopes(df, config["slope_fraction"])[1], on="estimator")


def report(df: pd.DataFrame, config: dict, selection: pd.DataFrame, choice: pd.DataFrame, grid: dict) -> common.Report:
    """The printed report and the manifest's entries (the choice, grids, extensions, slopes, summary)."""
    table = summary(df, config)
    per_run, _ = slopes(df, config["slope_fraction"])
    at_edge = [r["estimator"] for r in choice.to_dict("records") if r["edge"] in ("low", "high")]
    made = ", ".join(f"{e['estimator']} {e['side']} -> {compare.format_lr(e['lr'])}" for e in grid["extensions"])
    head = [config["note"]] if config.get("note") else []
    head += [f"selection: {len(config['selection_seeds'])} seed(s) {config['selection_seeds']}, "
             f"{selection['step'].max()} steps; grid extensions: {made or 'none'}",
             *compare.best_lr_lines(choice, RULE_METRIC, by="estimator"),
             f"confirmation: {df['seed'].nunique()} paired seeds, {df['step'].max()} steps, each estimator at its "
             f"chosen lr; differences are estimator - reference on the same seeds; steps_to_kl: first evaluation "
             f"with reverse KL <= {config['kl_threshold']} nats; kl_slope: least-squares slope of the reverse KL "
             f"over the last {config['slope_fraction']:.0%} of steps, nats per 100 steps (mean over seeds, "
             "95% interval)"]
    if at_edge:
        head.append(f"still at the edge of the grid after {config['max_extensions']} extension(s): "
                    + ", ".join(at_edge))
    text = "\n".join(head) + "\n" + table.set_index("estimator").T.to_string(float_format=lambda x: f"{x:.4g}")
    extra = {"note": config.get("note"), "summary_note": "\n".join(head), "summary": table.to_dict(orient="records"),
             "chosen_lr": dict(zip(choice["estimator"], choice["lr"])),
             "selection": {"rule": compare.best_lr_rule(RULE_METRIC), "metric": RULE_METRIC,
                           "initial_grid": sorted(config["lrs"]), "grids": grid["grids"],
                           "extensions": grid["extensions"], "still_at_edge": at_edge,
                           "choices": choice.to_dict(orient="records")},
             "slopes": {"unit": "nats per 100 steps", "fraction": config["slope_fraction"],
                        "per_run": per_run.to_dict(orient="records")}}
    return common.Report(text=text, extra=extra, figure_args=(selection, choice, metrics(config)))


# ----------------------------------------------------------------------------- the figure

def figure(df: pd.DataFrame, selection: pd.DataFrame, choice: pd.DataFrame, labels: dict = METRICS):
    """(a) final reverse KL against lr per estimator over the selection seeds (mean, 95% t-band; the chosen
    lr starred), (b) the confirmation's reverse KL against step (mean, 95% t-band), (c, d) final reverse
    KL and the other metric of ``labels`` (accuracy on the tiny pair) of the confirmation (mean, 95%
    t-interval)."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    names = list(dict.fromkeys(df["estimator"]))
    colour = dict(zip(names, plt.rcParams["axes.prop_cycle"].by_key()["color"] * 3))
    final = final_rows(selection)
    for name, g in final.groupby("estimator", sort=False):
        band = np.array([stats.mean_interval(g.loc[g["lr"] == lr, RULE_METRIC]) for lr in sorted(g["lr"].unique())])
        lrs = sorted(g["lr"].unique())
        axes[0].plot(lrs, band[:, 0], marker="o", color=colour.get(name), label=name)
        axes[0].fill_between(lrs, band[:, 1], band[:, 2], color=colour.get(name), alpha=0.2, linewidth=0)
    for r in choice.to_dict("records"):
        axes[0].plot([r["lr"]], [r["mean"]], marker="*", markersize=14, color=colour.get(r["estimator"]))
    axes[0].set(xscale="log", yscale="log", xlabel="learning rate", ylabel=labels[RULE_METRIC][1],
                title=f"(a) selection: final value, {selection['seed'].nunique()} seed(s) (* chosen)")
    for name, g in df.groupby("estimator", sort=False):
        steps = sorted(g["step"].unique())
        band = np.array([stats.mean_interval(g.loc[g["step"] == s, RULE_METRIC]) for s in steps])
        lr = compare.format_lr(g["lr"].iloc[0])
        axes[1].plot(steps, band[:, 0], marker="o", markersize=3, color=colour[name], label=f"{name} (lr {lr})")
        axes[1].fill_between(steps, band[:, 1], band[:, 2], color=colour[name], alpha=0.2, linewidth=0)
    axes[1].set(yscale="log", xlabel="step", ylabel=labels[RULE_METRIC][1],
                title=f"(b) confirmation, {df['seed'].nunique()} paired seeds")
    last = final_rows(df)
    other = next(m for m in labels if m != RULE_METRIC)
    for ax, metric, letter in zip(axes[2:], (RULE_METRIC, other), "cd"):
        for i, name in enumerate(names):
            mean, low, high = stats.mean_interval(last.loc[last["estimator"] == name, metric])
            err = [[mean - low], [high - mean]] if np.isfinite(low) else None
            ax.errorbar([i], [mean], yerr=err, fmt="o", capsize=4, color=colour[name])
        ax.set_xticks(range(len(names)), names, rotation=20)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set(ylabel=labels[metric][1], title=f"({letter}) confirmation: final value (95% t-interval)")
    axes[1].legend(fontsize=8)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    return fig


def run_tuned(name: str, defaults: dict, quick: bool = True, out_dir="figures", config: dict | None = None,
              plot: bool = True) -> pd.DataFrame:
    """Both phases and the report for a study named ``name`` with ``defaults`` (this study's ``DEFAULTS``, or
    another pair's: ``distill_tuned_small``): writes ``<name>.csv`` (confirmation) and ``<name>_lr.csv``
    (selection) with the manifest and the figure."""
    held = {}

    def compute_and_hold(cfg):
        confirmation, held["selection"], held["choice"], held["grid"], seconds = compute(cfg)
        return distill_tiny._with_seconds(confirmation, seconds, cfg.get("preset", "tiny"))

    df = common.run_study(name, defaults, compute_and_hold, figure,
                          report=lambda d, cfg: report(d, cfg, held["selection"], held["choice"], held["grid"]),
                          quick=quick, out_dir=out_dir, config=config, plot=plot)
    held["selection"].to_csv(Path(out_dir) / f"{name}_lr.csv", index=False, float_format=common.FLOAT_FORMAT)
    return df


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    return run_tuned(NAME, DEFAULTS, quick, out_dir, config, plot)


if __name__ == "__main__":
    common.main(run, __doc__)
