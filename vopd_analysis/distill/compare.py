"""``vopd compare``: the final evaluations of distillation runs, per estimator, over seeds.

A run is a ``vopd distill`` folder (``config.json`` and ``metrics.jsonl``); its label is the
estimator with the parameters it was given (``vopd_topk-k4``), and runs that share a label
differ by seed. For each label the final evaluation of each seed (its last eval row) gives

* the mean of x_1..x_n over the n seeds, with the Student-t interval
  m -+ t_{(1+c)/2, n-1} s / sqrt(n)  (s the sample standard deviation, ``mean_interval``);
* the paired difference to a reference label over the seeds both have, d_i = x_i - r_i:
  the same interval for mean(d) and the two-sided paired t-test p-value
  2 P(T_{n-1} > |mean(d)| / (sd(d) / sqrt(n)))  (``paired_difference``).

Learning rate is a grouping variable: when the runs do not all share one ``lr``, each label gets it
as a suffix, ``vopd@lr=3e-4`` (``format_lr``), so runs that differ in learning rate are compared
side by side (the table, CSV and JSON also carry an ``lr`` column); runs of one learning rate keep
their plain labels. ``--best-lr METRIC`` then keeps, per estimator label, the runs of one learning
rate chosen by a rule fixed in advance (``best_lrs``): the lowest mean final ``eval_reverse_kl``
over seeds (the highest mean for ``eval_accuracy`` or ``eval_teacher_logprob``), ties to the smaller
lr; it prints each choice, warns when a choice is at an edge of its grid, and the paired differences
compare each estimator at its own chosen lr on the seeds both have.

With fewer than two values the interval and p-value are NaN; so is every accuracy entry of runs on
a task without a verifier (the small preset), and the accuracy panels say so. The formulae live in
``vopd_analysis.stats``; they are re-exported here with the run readers, so that a study can
take ``load_runs`` / ``summary_table`` / ``mean_interval`` / ``paired_difference`` from one place.

    vopd compare runs/sweep                          # a folder of runs (e.g. a sweep)
    vopd compare runs/a runs/b --reference vopd --plot cmp.png --csv cmp.csv
    vopd compare runs/lr-sweep --best-lr                # each estimator at its best learning rate
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Iterable, List, Optional

import numpy as np
import pandas as pd

from .. import records
from ..errors import InputError
from ..stats import mean_interval, paired_difference

__all__ = ["mean_interval", "paired_difference", "run_label", "format_lr", "find_runs", "load_runs", "summary_table",
           "best_lrs", "keep_best_lrs", "format_table", "plot_curves", "plot_run", "report", "main"]

METRICS = {"eval_accuracy": "held-out greedy accuracy (fraction correct)",
           "eval_reverse_kl": "held-out sequence reverse KL (nats)",
           "eval_teacher_logprob": "teacher log-prob of student samples (nats per token)"}
DEFAULT_REFERENCE = "opd"
# --best-lr: the metric of the default rule, and the metrics where lower is better (higher for the others)
DEFAULT_BEST_LR = "eval_reverse_kl"
LOWER_IS_BETTER = {"eval_reverse_kl"}
# config fields that do not change what a run measures, and lr, shown in the labels when it differs (all left
# out of the "runs differ in" note)
_BOOKKEEPING = {"estimator", "estimator_params", "seed", "out_dir", "num_threads", "cache_dir", "save_every",
                "keep_checkpoints", "lr"}


def present(columns) -> dict:
    """The entries of ``METRICS`` among ``columns`` (a table built by hand may lack some): {name: title}."""
    return {m: title for m, title in METRICS.items() if m in columns}


def run_label(estimator: str, params: Optional[dict] = None, engine: Optional[str] = None) -> str:
    """The label of a run: the estimator and the parameters it was given, ``vopd_topk`` + {"k": 4} -> ``vopd_topk-k4``,
    prefixed by the engine when it is not the built-in loop (``trl:vopd``).

    Args:
      estimator: the estimator name.
      params: the parameters given on the command line (None or {}: none), joined as
        ``-<name><value>`` in sorted name order.
      engine: the run's ``--engine`` (None or "builtin": no prefix).

    Returns:
      The label; runs that share one differ by seed only.
    """
    label = "-".join([estimator] + [f"{k}{v}" for k, v in sorted((params or {}).items())])
    return label if engine in (None, "builtin") else f"{engine}:{label}"


def format_lr(lr: float) -> str:
    """A learning rate as short, stable text for labels and folder names: the mantissa of its
    12-significant-digit scientific form without trailing zeros, then ``e`` and the exponent without
    ``+`` or leading zeros (none for exponent 0): 3e-4 -> ``3e-4``, 0.0015 -> ``1.5e-3``, 1.0 -> ``1``,
    0.0009000000000000001 -> ``9e-4``. ``float(format_lr(x))`` gives x back to 12 digits.
    """
    mantissa, exponent = f"{float(lr):.11e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return mantissa if int(exponent) == 0 else f"{mantissa}e{int(exponent)}"


# ----------------------------------------------------------------------------- reading runs

def _is_run(path: Path) -> bool:
    return (path / "metrics.jsonl").is_file() and (path / "config.json").is_file()


def find_runs(paths: Iterable) -> List[Path]:
    """The run folders among ``paths``; a folder holding runs stands for the runs directly inside it.

    A run is a folder with ``metrics.jsonl`` and ``config.json``.

    Args:
      paths: run folders, or folders of runs (a sweep).

    Returns:
      The run folders, each once, in the order found (runs inside a folder sorted by name).
      A missing path, or one that is neither a run nor holds any, raises ``InputError``.
    """
    runs, bad = [], []
    for path in map(Path, paths):
        if not path.exists():
            raise InputError(f"{path} does not exist")
        if _is_run(path):
            runs.append(path)
            continue
        inside = sorted(d for d in path.iterdir() if _is_run(d)) if path.is_dir() else []
        if (path / "metrics.jsonl").is_file() or not inside:
            bad.append(path)
        runs += inside
    if bad:
        missing = "config.json" if all((p / "metrics.jsonl").is_file() for p in bad) else "metrics.jsonl"
        names = ", ".join(map(str, bad))
        raise InputError(f"{names} {'is not a vopd distill run' if len(bad) == 1 else 'are not vopd distill runs'} "
                         f"(no {missing})")
    return list(dict.fromkeys(runs))


# what compare reads of a run's config.json (a run of any version has these)
RUN_CONFIG = {"estimator": str, "seed": int, "estimator_params": (dict, type(None)), "engine": (str, type(None)),
              "lr": (float, type(None))}


def read_run_config(path: Path) -> dict:
    """The ``config.json`` of the run in ``path``, with the fields compare reads checked
    (``records``: one ``InputError`` line naming the file and the field)."""
    return records.read_record(path / "config.json", "run config", RUN_CONFIG, required=("estimator", "seed"))


def load_runs(paths: Iterable) -> pd.DataFrame:
    """Every eval row of the runs in ``paths``: columns estimator, label, seed, step, eval_accuracy,
    eval_reverse_kl, eval_teacher_logprob, run (the run folder), lr (the run's learning rate) and
    base_label (the label without the learning rate); a metric a run did not record (no verifier, or a
    run from before the metric existed) is NaN. When the runs with eval rows do not all share one
    learning rate, ``label`` is ``base_label@lr=<format_lr(lr)>`` (``vopd@lr=3e-4``), else it is
    ``base_label``. Two runs with the same base label, learning rate and seed are refused.

    Args:
      paths: as for ``find_runs``.

    Returns:
      A DataFrame with one row per eval row of each run (``step`` and ``seed`` int, metrics and lr float);
      ``InputError`` if no run has an eval row.
    """
    frames, seen = [], {}
    for path in find_runs(paths):
        config = read_run_config(path)
        label = run_label(config["estimator"], config.get("estimator_params"), config.get("engine"))
        seed, lr = config["seed"], math.nan if config.get("lr") is None else float(config["lr"])
        if (label, lr, seed) in seen:
            raise InputError(f"{seen[label, lr, seed]} and {path} are both {label} lr {format_lr(lr)} seed {seed}; "
                             "compare runs that differ in engine, estimator, parameters, learning rate or seed")
        seen[label, lr, seed] = path
        evals = [r for r in records.read_rows(path / "metrics.jsonl") if r["kind"] == "eval"]
        frames.append(pd.DataFrame({"estimator": config["estimator"], "label": label, "seed": seed,
                                    "step": [r["step"] for r in evals],
                                    **{m: [r.get(m) for r in evals] for m in METRICS}, "run": str(path),
                                    "lr": lr, "base_label": label}))
    df = pd.concat(frames, ignore_index=True)
    if df.empty:
        raise InputError("none of the runs has an evaluation yet (runs with --eval-every 0 cannot be compared)")
    df = df.astype({"step": int, "seed": int, "lr": float, **{m: float for m in METRICS}})
    if df["lr"].nunique() > 1:
        df["label"] = [f"{base}@lr={format_lr(lr)}" for base, lr in zip(df["base_label"], df["lr"])]
    return df


# ----------------------------------------------------------------------------- the table

def final_evals(df: pd.DataFrame) -> pd.DataFrame:
    """Each run's last eval row (the one with the largest ``step`` per (label, seed)).

    Args:
      df: the table of ``load_runs``.

    Returns:
      The subset of ``df``, one row per run.
    """
    return df.sort_values("step", kind="stable").groupby(["label", "seed"], sort=False).tail(1)


def _reference(labels: list, df: pd.DataFrame, reference: Optional[str]) -> Optional[str]:
    """The reference label: ``reference`` itself if it is a label, else the one label whose base label
    (the label without ``@lr=``) or estimator it is; without ``reference``, ``opd`` resolved the same way
    by label or base label, or None when there is no such single label."""
    asked, matches = DEFAULT_REFERENCE if reference is None else reference, []
    if asked in labels:
        return asked
    columns = ["base_label"] if reference is None else ["base_label", "estimator"]
    for column in (c for c in columns if c in df):
        matches = sorted(set(df.loc[df[column] == asked, "label"]))
        if len(matches) == 1:
            return matches[0]
        if matches:
            break
    if reference is None:
        return None
    raise InputError(f"reference '{reference}' is {'ambiguous' if matches else 'not among the runs'}; "
                     f"labels: {', '.join(labels)}")


def summary_table(df: pd.DataFrame, reference: Optional[str] = None, confidence: float = 0.95) -> pd.DataFrame:
    """One row per label (the reference first): seeds, last step, and for each metric m the mean of the
    final evals with its t-interval (``m_mean``, ``m_low``, ``m_high``) and the paired difference to the
    reference (``m_diff``, ``m_diff_low``, ``m_diff_high``, ``m_p``, ``m_pairs``; NaN for the reference
    itself or without one). ``reference``: a label or an estimator name; default ``opd`` if present.
    The resolved reference is in ``table.attrs["reference"]``.

    Per label, with x_i the final value of seed i and n seeds: mean m with the t-interval
    m -+ t_{(1+c)/2, n-1} s / sqrt(n); the differences d_i = x_i - r_i to the reference on the
    seeds both have, with the same interval for mean(d) and the paired t-test p-value
    2 P(T_{n-1} > |mean(d)| / (sd(d) / sqrt(n))). See ``vopd_analysis.stats``.

    Args:
      df: the table of ``load_runs``.
      reference: a label, or an estimator name with exactly one label (else ``InputError``).
      confidence: c, the intervals' confidence level.

    Returns:
      A DataFrame with columns label, estimator, lr (when ``df`` has it), seeds, step and the
      per-metric columns above.
    """
    final = final_evals(df)
    labels = list(dict.fromkeys(df["label"]))
    ref = _reference(labels, df, reference)
    if ref is not None:
        labels.remove(ref)
        labels.insert(0, ref)
    by_seed = {label: g.set_index("seed").sort_index() for label, g in final.groupby("label")}
    rows = []
    for label in labels:
        g = by_seed[label]
        row = {"label": label, "estimator": g["estimator"].iloc[0],
               **({"lr": float(g["lr"].iloc[0])} if "lr" in g else {}), "seeds": len(g), "step": int(g["step"].max())}
        for m in present(df.columns):
            row.update(zip((f"{m}_mean", f"{m}_low", f"{m}_high"), mean_interval(g[m], confidence)))
            d = {"mean": np.nan, "low": np.nan, "high": np.nan, "p_value": np.nan, "n": 0}
            if ref is not None and label != ref:
                common = g.index.intersection(by_seed[ref].index)
                if len(common):
                    d = paired_difference(g.loc[common, m], by_seed[ref].loc[common, m], confidence)
            row.update({f"{m}_diff": d["mean"], f"{m}_diff_low": d["low"], f"{m}_diff_high": d["high"],
                        f"{m}_p": d["p_value"], f"{m}_pairs": d["n"]})
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["reference"] = ref
    return table


def best_lrs(final: pd.DataFrame, metric: str = DEFAULT_BEST_LR, by: str = "base_label") -> pd.DataFrame:
    """Each estimator's learning rate, chosen by a rule fixed before looking at the results.

    For each value of ``by`` (an estimator label) and each learning rate of its grid, the mean of the
    final ``metric`` over the seeds; the chosen lr has the lowest mean when ``metric`` is in
    ``LOWER_IS_BETTER`` (``eval_reverse_kl``), the highest otherwise (accuracy, teacher log-prob), and
    among equal means the smaller lr. A learning rate whose mean is not finite (a seed that diverged to
    NaN or inf) ranks last; a group with no finite mean at all is refused (``InputError``). ``edge`` says
    where the choice lies in its grid: "low" or "high" when it is the smallest or largest of two or more
    learning rates (the best one may lie outside: extend the grid on that side), "" inside the grid,
    "single" for a grid of one.

    Args:
      final: one row per run with the columns ``by``, ``lr``, ``seed`` and ``metric`` (``final_evals``).
      metric: the metric the rule reads.
      by: the column naming the estimator.

    Returns:
      One row per group, in order of first appearance: ``by``, lr (the choice), mean (its mean over
      seeds), seeds (their number), grid (the group's learning rates, ascending), means (the mean at
      each of them) and edge.
    """
    sign = 1.0 if metric in LOWER_IS_BETTER else -1.0
    rows = []
    for key, g in final.groupby(by, sort=False):
        per_lr = g.groupby("lr")[metric]
        means = per_lr.apply(lambda x: float(np.mean(x.to_numpy(float))))   # NaN/inf kept: a diverged seed counts
        if not np.isfinite(means.to_numpy(float)).any():
            raise InputError(f"{key} has no finite final {metric} at any learning rate; "
                             "choose another --best-lr metric")
        score = np.where(np.isfinite(means.to_numpy(float)), sign * means.to_numpy(float), np.inf)
        best = int(np.argmin(score))          # the first minimum: grid ascending, so ties go to the smaller lr
        grid = [float(lr) for lr in means.index]
        edge = ("single" if len(grid) == 1 else "low" if best == 0 else "high" if best == len(grid) - 1 else "")
        rows.append({by: key, "lr": grid[best], "mean": float(means.iloc[best]),
                     "seeds": int(per_lr.size().iloc[best]), "grid": grid, "means": means.to_list(), "edge": edge})
    return pd.DataFrame(rows, columns=[by, "lr", "mean", "seeds", "grid", "means", "edge"])


def keep_best_lrs(df: pd.DataFrame, metric: str = DEFAULT_BEST_LR) -> tuple:
    """The runs of each estimator label at its chosen learning rate (``best_lrs`` on the final evals).

    Args:
      df: the table of ``load_runs``.
      metric: the metric of the rule.

    Returns:
      (the rows of ``df`` at the chosen learning rates, the table of ``best_lrs``).
    """
    choice = best_lrs(final_evals(df), metric, by="base_label")
    chosen = set(zip(choice["base_label"], choice["lr"]))
    keep = [(base, lr) in chosen for base, lr in zip(df["base_label"], df["lr"])]
    return df[keep], choice


def best_lr_rule(metric: str) -> str:
    """The rule of ``best_lrs`` in words."""
    return (f"the {'lowest' if metric in LOWER_IS_BETTER else 'highest'} mean final {metric} over seeds, "
            "ties to the smaller lr")


def best_lr_lines(choice: pd.DataFrame, metric: str, by: str = "base_label") -> List[str]:
    """The choices of ``best_lrs`` as text: the rule, then per estimator the chosen lr, its mean, the
    grid, and "at the edge of the grid: extend it" when the choice is the smallest or largest lr."""
    width = max([len("estimator"), *map(len, choice[by])])
    out = [f"learning rate per estimator: {best_lr_rule(metric)}"]
    for r in choice.to_dict("records"):
        where = {"low": "at the edge of the grid: extend it (the smallest lr tried)",
                 "high": "at the edge of the grid: extend it (the largest lr tried)",
                 "single": "one lr only: nothing was chosen"}.get(r["edge"], "inside the grid")
        out.append(f"  {r[by]:{width}s} lr {format_lr(r['lr']):>7s}  mean {_num(r['mean'], '.4g')} over "
                   f"{r['seeds']} seed(s)  grid {', '.join(map(format_lr, r['grid']))}  {where}")
    return out


def _num(x: float, fmt: str) -> str:
    return "-" if x != x else format(x, fmt)


def format_table(table: pd.DataFrame, confidence: float = 0.95) -> str:
    """The table as text: one block per metric (a metric with no finite value gets one line saying so).

    Args:
      table: from ``summary_table``.
      confidence: only for the column headers.

    Returns:
      The text, blocks separated by a blank line.
    """
    ref = table.attrs.get("reference")
    pct = f"{confidence:.0%}"
    width = max(len("estimator"), *table["label"].str.len())
    out = []
    for m, title in METRICS.items():
        if f"{m}_mean" not in table:
            continue
        if not np.isfinite(table[f"{m}_mean"].to_numpy(float)).any():
            out.append(f"{title}: none recorded" + (" (no verifier for this task)" if m == "eval_accuracy" else ""))
            continue
        head = f"{'estimator':{width}s} {'seeds':>5s} {'step':>5s} {'mean':>8s} {pct + ' interval':>20s}"
        if ref is not None:
            head += f" {'minus ' + ref:>9s} {pct + ' interval':>20s} {'p':>7s} {'pairs':>5s}"
        lines = [f"{title}, final eval", head]
        for r in table.to_dict("records"):
            line = (f"{r['label']:{width}s} {r['seeds']:5d} {r['step']:5d} {_num(r[m + '_mean'], '8.4g')} "
                    f"{'[' + _num(r[m + '_low'], '.4g') + ', ' + _num(r[m + '_high'], '.4g') + ']':>20s}")
            if ref is not None and r["label"] != ref:
                line += (f" {_num(r[m + '_diff'], '+9.4g')} "
                         f"{'[' + _num(r[m + '_diff_low'], '+.4g') + ', ' + _num(r[m + '_diff_high'], '+.4g') + ']':>20s}"
                         f" {_num(r[m + '_p'], '7.3g')} {r[m + '_pairs']:5d}")
            lines.append(line)
        out.append("\n".join(lines))
    return "\n\n".join(out)


def notes(paths: Iterable, df: pd.DataFrame) -> List[str]:
    """What a reader of the table should know: unfinished runs, runs without evals, runs whose
    last eval is at another step than the others', and config fields in which the runs differ
    (bookkeeping fields such as seed, out_dir and estimator left out).

    Args:
      paths: as for ``find_runs``.
      df: the table of ``load_runs`` on the same paths.

    Returns:
      One string per note.
    """
    runs = find_runs(paths)
    out = [f"{p} is unfinished (no summary.json)" for p in runs if not (p / "summary.json").is_file()]
    evaluated = set(df["run"])
    out += [f"{p} has no eval rows yet; left out" for p in runs if str(p) not in evaluated]
    last = final_evals(df)
    if last["step"].nunique() > 1:
        out.append("final evals are at different steps: " + ", ".join(
            f"{r.label} seed {r.seed} at {r.step}" for r in last.itertuples()))
    configs = [read_run_config(p) for p in runs]
    for key in sorted({k for c in configs for k in c} - _BOOKKEEPING):
        values = [json.dumps(c.get(key)) for c in configs]
        if len(set(values)) > 1:
            out.append(f"the runs differ in {key}: " + ", ".join(
                f"{v} ({values.count(v)} runs)" for v in dict.fromkeys(values)))
    return out


# ----------------------------------------------------------------------------- figures

def _band(ax, x, mean, low, high, label):
    line, = ax.plot(x, mean, marker="o", markersize=3, label=label)
    ok = np.isfinite(low) & np.isfinite(high)
    if ok.any():
        ax.fill_between(np.asarray(x)[ok], np.asarray(low)[ok], np.asarray(high)[ok], color=line.get_color(),
                        alpha=0.2, linewidth=0)


def _save(fig, path: Path) -> Path:
    from matplotlib.ticker import MaxNLocator
    for ax in fig.axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def _no_values(ax, key: str) -> None:
    """Say on an empty panel why it is empty."""
    why = "no verifier for this task: no accuracy" if key == "eval_accuracy" else "not recorded"
    ax.text(0.5, 0.5, why, transform=ax.transAxes, ha="center", va="center", color="0.4")
    ax.tick_params(labelbottom=False, labelleft=False, length=0)


def plot_curves(df: pd.DataFrame, path, confidence: float = 0.95) -> Path:
    """Eval accuracy, reverse KL and teacher log-prob against step: per label the mean over seeds with its
    t-interval band (``mean_interval`` at each step; no band where fewer than 2 seeds).

    Args:
      df: the table of ``load_runs``.
      path: the image file (parent folders are created).
      confidence: the band's confidence level.

    Returns:
      ``path`` as a ``Path``.
    """
    from matplotlib.figure import Figure
    fig = Figure(figsize=(16, 4))
    metrics = present(df.columns)
    axes = fig.subplots(1, len(metrics))
    seeds = df.groupby("label")["seed"].nunique()
    for label, g in df.groupby("label", sort=False):
        for ax, m in zip(axes, metrics):
            steps = sorted(g["step"].unique())
            band = np.array([mean_interval(g.loc[g["step"] == s, m], confidence) for s in steps])
            _band(ax, steps, band[:, 0], band[:, 1], band[:, 2], f"{label} ({seeds[label]} seeds)")
    for ax, (m, title) in zip(axes, metrics.items()):
        if not np.isfinite(df[m].to_numpy(float)).any():
            _no_values(ax, m)
        ax.set_xlabel("step")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle(f"mean over seeds with {confidence:.0%} t-interval", fontsize=10)
    return _save(fig, path)


def plot_run(rows: list, path, title: str = "") -> Path:
    """One run's curves: eval accuracy, eval reverse KL, eval teacher log-prob and the training reverse
    KL against step.

    Args:
      rows: the run's metrics rows (dicts with ``kind`` "eval" or "train" and ``step``; train rows
        need ``reverse_kl_sampled`` and ``reverse_kl``).
      path: the image file (parent folders are created).
      title: the figure's title.

    Returns:
      ``path`` as a ``Path``.
    """
    from matplotlib.figure import Figure
    evals = [r for r in rows if r["kind"] == "eval"]
    train = [r for r in rows if r["kind"] == "train"]
    fig = Figure(figsize=(17, 3.8))
    axes = fig.subplots(1, len(METRICS) + 1)
    nan = float("nan")
    for ax, key in zip(axes, METRICS):
        values = [nan if r.get(key) is None else r[key] for r in evals]
        ax.plot([r["step"] for r in evals], values, marker="o")
        if not any(v == v for v in values):
            _no_values(ax, key)
        ax.set_title(METRICS[key], fontsize=10)
    steps = [r["step"] for r in train]
    axes[-1].plot(steps, [r["reverse_kl_sampled"] for r in train], label="sampled: sum_t log pi/pi_T")
    if any(r["reverse_kl"] == r["reverse_kl"] for r in train):
        axes[-1].plot(steps, [r["reverse_kl"] for r in train], label="exact per-token KL, summed")
    axes[-1].set_title("training rollouts' reverse KL (nats per sequence)", fontsize=10)
    axes[-1].legend(fontsize=8)
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


# ----------------------------------------------------------------------------- command line

def report(paths: list, reference: Optional[str] = None, plot=None, csv=None, as_json: bool = False,
           confidence: float = 0.95, best_lr: Optional[str] = None) -> pd.DataFrame:
    """``vopd compare``: print the table (or one JSON object), write the figure (and the CSV).

    Args:
      paths: as for ``find_runs``.
      reference: as for ``summary_table``.
      plot: the figure's path (None: ``<folder>/compare.png`` for one folder of runs, else
        ``./compare.png``); missing folders are created.
      csv: also write the table there (None: do not); missing folders are created. Both paths are
        checked before any run is read (``records.check_output``).
      as_json: print {"reference", "confidence", "plot", "csv", "notes", "best_lr", "rows"} instead of text.
      confidence: the intervals' confidence level.
      best_lr: a metric: keep each estimator label's runs at the learning rate ``best_lrs`` chooses by it
        (table, differences and figure), and say which (``best_lr`` in the JSON: metric, rule and one
        entry per estimator); None keeps every learning rate.

    Returns:
      The table of ``summary_table``.
    """
    if plot is None:
        plot = Path(paths[0]) / "compare.png" if len(paths) == 1 and not _is_run(Path(paths[0])) else "compare.png"
    records.check_output(plot, "--plot")                   # before the work: an impossible place is one line
    if csv is not None:
        csv = records.check_output(csv, "--csv")
    every = df = load_runs(paths)
    choice = None
    if best_lr is not None:
        df, choice = keep_best_lrs(every, best_lr)
    table = summary_table(df, reference, confidence)
    plot = plot_curves(df, plot, confidence)
    if csv is not None:
        csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(csv, index=False)
    remarks = notes(paths, every)
    if best_lr is None and table.attrs["reference"] is None and "lr" in table and table["lr"].nunique() > 1:
        remarks.append("no reference: the runs have several learning rates; give --reference LABEL, or --best-lr "
                       "to keep each estimator's best one")
    if as_json:
        chosen = None if choice is None else {"metric": best_lr, "rule": best_lr_rule(best_lr),
                                              "choices": json.loads(choice.to_json(orient="records"))}
        print(json.dumps({"reference": table.attrs["reference"], "confidence": confidence, "plot": str(plot),
                          "csv": str(csv) if csv else None, "notes": remarks, "best_lr": chosen,
                          "rows": json.loads(table.to_json(orient="records"))}))
        return table
    n_runs = df["run"].nunique()
    print(f"{len(table)} estimator(s), {n_runs} run(s); {confidence:.0%} t-intervals over seeds"
          + (f"; differences to {table.attrs['reference']} paired by seed" if table.attrs["reference"] else ""))
    if choice is not None:
        print("\n".join(best_lr_lines(choice, best_lr)))
    print()
    print(format_table(table, confidence))
    print()
    for line in remarks:
        print(f"note: {line}")
    print(f"curves: {plot}" + (f"; table: {csv}" if csv else ""))
    return table


def build_parser() -> argparse.ArgumentParser:
    """The ``vopd compare`` argument parser."""
    p = argparse.ArgumentParser(prog="vopd compare", description="The final evaluations of vopd distill runs "
                                "per estimator over seeds: mean with t-interval, paired difference to a reference "
                                "with its p-value, and the eval curves.")
    p.add_argument("paths", nargs="+", metavar="RUN_DIR", help="vopd distill runs, or folders holding runs")
    p.add_argument("--reference", help=f"label or estimator to difference against (default {DEFAULT_REFERENCE} "
                                       "if present)")
    p.add_argument("--plot", help="PNG of the eval curves (default FOLDER/compare.png for one folder of runs, "
                                  "else ./compare.png)")
    p.add_argument("--csv", help="also write the table as CSV")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--best-lr", dest="best_lr", nargs="?", const=DEFAULT_BEST_LR, choices=tuple(METRICS),
                   metavar="METRIC", help="when the runs differ in learning rate: keep each estimator's runs at "
                   "the lr with the best mean final METRIC over seeds (default METRIC eval_reverse_kl, lowest wins; "
                   "eval_accuracy and eval_teacher_logprob: highest wins; ties to the smaller lr), say which, and "
                   "warn when it is at an edge of the grid; give it after the run folders, or with its METRIC")
    return p


def main(argv=None) -> int:
    """``vopd compare RUN_DIR... [options]``; returns 0 (bad input raises ``InputError``)."""
    args = build_parser().parse_args(argv)
    if not 0 < args.confidence < 1:
        raise InputError(f"--confidence must be in (0, 1), got {args.confidence}")
    report(args.paths, args.reference, args.plot, args.csv, args.json, args.confidence, args.best_lr)
    return 0
