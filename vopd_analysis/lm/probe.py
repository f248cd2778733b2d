"""The gradient-variance probe over independent prompt batches, its summary, and ``vopd probe``.

For each of ``num_batches`` independent batches (fresh prompts, rollouts seeded by the batch) the
student samples ``num_rollouts`` responses per prompt once, and every estimator of the plan is
probed on those same rollouts (``variance.probe``: the trace of the covariance of the
single-rollout parameter gradient, per parameter group, the SNR and the cosine of the mean
gradient to the full_kl mean). Within a batch each estimator's trace is divided by opd's (a
paired comparison on common rollouts); over batches the ratio is summarised by its geometric
mean with the t-interval of the log ratios (``stats.ratio_interval``). One batch's ratio is not a
result: on the tiny pair it moves by a factor of two between batches.

Cost: within a batch each estimator is charged its own loss and backward time plus an equal share
of the scoring (student and teacher forwards), and its cost ratio is that over opd's. ``efficiency`` = variance ratio x cost ratio, the variance per unit of compute relative to
opd (lower is better), summarised like the variance ratio; ``verdict`` names the estimator, among
those unbiased for the token-level target, with the lowest one, the runner-up and whether their
intervals overlap.

An estimator can be probed at several parameter values on the same rollouts, all from one scoring:
``vopd_topk:k=64`` is labelled ``vopd_topk(k=64)``.

    vopd probe --preset smollm2 --num-batches 8 --params last:2 --out runs/probe-smollm2
    vopd probe --student STUDENT --teacher TEACHER --prompts prompts.jsonl --estimators opd,vopd,vopd_topk:k=64
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import time
from pathlib import Path
from typing import List, Optional, Sequence

import numpy as np
import torch

from .. import estimators as est
from .. import params as prm
from .. import provenance, records, stats
from ..errors import InputError, exit_with
from ..lock import RunLock
from . import fused_score as fs
from . import loading, tasks, variance
from . import rollouts as ro
from .presets import PRESETS
from .presets import get as get_preset

DEFAULT_ESTIMATORS = ("opd", "vopd", "vopd_topk", "opd_bstar", "opd_bstar_topk", "iw_opd", "full_kl", "topk_kl")
PER_BATCH = ["trace_cov", "variance_ratio_to_opd", "snr", "noise_scale_ref", "cosine_to_reference",
             "rel_error_to_reference"]        # the per-batch table (timings stay out of the CSVs: they differ per run)
CONTRASTS = (("opd_bstar", "vopd"), ("opd_bstar_topk", "vopd_topk"), ("vopd_topk", "vopd"))


@dataclasses.dataclass(frozen=True)
class Probed:
    """One estimator of a probe plan: its label in the tables, registry name and full parameters."""

    label: str
    name: str
    params: dict


def label_of(name: str, own: dict) -> str:
    """``vopd_topk`` + {"k": 64} -> ``vopd_topk(k=64)``; no parameters of its own -> the name."""
    return name if not own else f"{name}(" + ",".join(f"{k}={v}" for k, v in sorted(own.items())) + ")"


def plan(items: Sequence, vocab_size: int, topk: Optional[int] = None, common: Optional[dict] = None) -> List[Probed]:
    """The estimators of a probe with their parameters.

    Args:
      items: estimator items, each a name, ``name:param=value[:...]`` or a (name, own parameters) pair.
      vocab_size: V; a top-k size above V is refused (an explicit one) or capped (a default).
      topk: the k of every top-k estimator without its own k (a preset's; None: the registry default).
      common: parameters for every estimator that takes them (``--param``, ``--k``).

    Returns:
      The ``Probed`` list, in order; labels carry an item's own parameters (``label_of``).
    """
    common = dict(common or {})
    parsed = prm.parse_estimator_items(items, common)
    for name, _ in parsed:
        if est.get(name).analysis_only:
            raise InputError(f"estimator '{name}' needs exact tabular quantities; it cannot be probed on a model")
    out = []
    for name, own in parsed:
        spec = est.get(name)
        given = {k: v for k, v in common.items() if k in spec.defaults}
        if "k" in spec.defaults and "k" not in own and "k" not in given and topk is not None:
            given["k"] = topk
        given.update(own)
        explicit = set(given) - ({"k"} if "k" not in own and "k" not in common else set())
        resolved, _ = prm.cap_to_vocab(name, prm.resolve(name, given), explicit, vocab_size)
        out.append(Probed(label_of(name, own), name, resolved))
    labels = [p.label for p in out]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise InputError(f"{', '.join(twice)} listed twice; give each its own parameters (vopd_topk:k=64)")
    if "opd" not in [p.name for p in out]:
        out.insert(0, Probed("opd", "opd", prm.resolve("opd", {})))      # every ratio is to opd
    return out


# ----------------------------------------------------------------------------- one batch

def probe_batch(pair: loading.ModelPair, probed: Sequence[Probed], prompts: Sequence[str], config: dict,
                batch: int):
    """Probe every estimator of ``probed`` on one batch's rollouts.

    Args:
      pair: the loaded pair (``loading.load_pair``).
      probed: the plan (``plan``), opd included.
      prompts: the batch's prompts.
      config: ``num_rollouts``, ``max_new_tokens``, ``seed`` (the batch's rollouts are seeded by
        1000 seed + batch), ``num_projections``, ``logits``, optional ``temperature`` and ``per_rollout``
        (``variance.rollout_gradients``: each rollout scored alone, the same gradients, faster on large models).
      batch: the batch index.

    Returns:
      (rows: one per label, with ``variance_ratio_to_opd``, ``cost_ratio_to_opd``, ``efficiency``;
      layer rows: one per label and parameter group; mean response tokens).
    """
    seed = 1000 * config["seed"] + batch
    rollouts = ro.generate_rollouts(pair.student, pair.tokenizer, list(prompts), config["num_rollouts"],
                                    config["max_new_tokens"], temperature=config.get("temperature", 1.0), seed=seed,
                                    vocab_size=pair.info.vocab_size)
    result = variance.probe(pair.student, pair.teacher, pair.tokenizer, prompts, [p.label for p in probed],
                            config["num_rollouts"], max_new_tokens=config["max_new_tokens"], seed=seed,
                            vocab_size=pair.info.vocab_size, params={p.label: p.params for p in probed},
                            num_projections=config["num_projections"], logits=config.get("logits", "auto"),
                            rollouts=rollouts, per_rollout=config.get("per_rollout", False))
    share = result.timings["score"] / len(probed)
    rows = result.summary.assign(seconds=result.summary["estimator"].map(lambda n: result.timings[n] + share))
    layers = result.layers
    opd = rows.set_index("estimator").loc["opd"]
    rows = rows.assign(batch=batch, variance_ratio_to_opd=rows["trace_cov"] / opd["trace_cov"],
                       cost_ratio_to_opd=rows["seconds"] / opd["seconds"])
    rows["efficiency"] = rows["variance_ratio_to_opd"] * rows["cost_ratio_to_opd"]
    opd_layers = layers[layers["estimator"] == "opd"].set_index("group")["trace_cov"]
    layers = layers.assign(batch=batch, variance_ratio_to_opd=layers["trace_cov"] / layers["group"].map(opd_layers))
    return rows, layers, float(rollouts.response_mask.sum(1).float().mean())


# ----------------------------------------------------------------------------- summaries

def interval_columns(prefix: str, values) -> dict:
    """{prefix_mean, prefix_low, prefix_high}: the t-interval over batches."""
    mean, low, high = stats.mean_interval(values)
    return {f"{prefix}_mean": mean, f"{prefix}_low": low, f"{prefix}_high": high}


def ratio_columns(ratios, prefix: str = "ratio") -> dict:
    """{ratio_gmean, ratio_low, ratio_high, ratio_p_value}: geometric mean over batches, the exponentiated
    t-interval of the log ratios, and the t-test p-value of H0: E log ratio = 0."""
    gmean, low, high = stats.ratio_interval(ratios)
    return {f"{prefix}_gmean": gmean, f"{prefix}_low": low, f"{prefix}_high": high,
            f"{prefix}_p_value": stats.t_test_p_value(np.log(np.asarray(ratios, dtype=float)))}


def summarise(per_batch):
    """Per estimator: the variance ratio to opd (geometric mean over batches, 95% interval, p-value of
    ratio = 1, batches below 1), and the mean trace, SNR and cosine to the reference with their
    t-intervals."""
    import pandas as pd
    out = []
    for name, g in per_batch.groupby("estimator", sort=False):
        ratio = g["variance_ratio_to_opd"]
        row = {"estimator": name, "unbiased_for": g["unbiased_for"].iloc[0],
               "teacher_signal": g["teacher_signal"].iloc[0], "batches": len(g),
               "rollouts_per_batch": int(g["num_rollouts"].iloc[0]), **ratio_columns(ratio),
               "batches_below_1": int((ratio < 1).sum()),
               **interval_columns("trace_cov", g["trace_cov"]), **interval_columns("snr", g["snr"]),
               **interval_columns("cosine", g["cosine_to_reference"])}
        out.append(row)
    return pd.DataFrame(out)


def efficiency(per_batch):
    """Per estimator: the cost ratio to opd (geometric mean over batches) and the efficiency, variance ratio x
    cost ratio, with its 95% interval (``stats.ratio_interval``); from timings, so it changes from run to run."""
    import pandas as pd
    rows = []
    for name, g in per_batch.groupby("estimator", sort=False):
        eff = stats.ratio_interval(g["efficiency"])
        rows.append({"estimator": name, "unbiased_for": g["unbiased_for"].iloc[0],
                     "cost_ratio_gmean": stats.ratio_interval(g["cost_ratio_to_opd"])[0],
                     "efficiency_gmean": eff[0], "efficiency_low": eff[1], "efficiency_high": eff[2]})
    return pd.DataFrame(rows)


def summarise_layers(layers):
    """Per estimator and parameter group: the group's variance ratio to opd's (geometric mean, interval)."""
    import pandas as pd
    rows = [{"estimator": name, "group": group, "num_params": int(g["num_params"].iloc[0]),
             **ratio_columns(g["variance_ratio_to_opd"]), **interval_columns("trace_cov", g["trace_cov"])}
            for (name, group), g in layers.groupby(["estimator", "group"], sort=False)]
    return pd.DataFrame(rows)


def contrasts(per_batch, pairs=CONTRASTS) -> List[dict]:
    """Paired ratios var(a)/var(b) on the same rollouts, for each (a, b) both probed: geometric mean over
    batches, 95% interval, p-value of ratio = 1 and batches below 1."""
    traces = per_batch.pivot_table(index="batch", columns="estimator", values="trace_cov")
    out = []
    for a, b in pairs:
        if a in traces and b in traces:
            ratio = (traces[a] / traces[b]).to_numpy()
            out.append({"numerator": a, "denominator": b, **ratio_columns(ratio), "batches": len(ratio),
                        "batches_below_1": int((ratio < 1).sum())})
    return out


def verdict(table) -> dict:
    """The estimator with the lowest variance per unit of compute (``efficiency``'s ``efficiency_gmean``) among
    those unbiased for the token-level target g_tok, the runner-up, and whether their 95% intervals overlap.

    Returns:
      {"best", "runner_up", "best_efficiency", "runner_up_efficiency" ([gmean, low, high] each),
      "intervals_overlap", "text"}; {"text": ...} alone when fewer than two qualify.
    """
    eligible = table[table["unbiased_for"] == "token"].sort_values("efficiency_gmean")
    if len(eligible) < 2:
        return {"text": "fewer than two estimators unbiased for g_tok were probed: no ranking"}
    best, second = eligible.iloc[0], eligible.iloc[1]
    overlap = bool(best["efficiency_high"] >= second["efficiency_low"])

    def cell(r):
        return [float(r["efficiency_gmean"]), float(r["efficiency_low"]), float(r["efficiency_high"])]

    def text(r):
        return f"{r['estimator']} {r['efficiency_gmean']:.3g}x [{r['efficiency_low']:.3g}, {r['efficiency_high']:.3g}]"
    said = (f"lowest variance per unit of compute (variance ratio x cost ratio to opd, among estimators unbiased "
            f"for g_tok): {text(best)}; runner-up {text(second)}; the 95% intervals "
            + ("overlap: the order of the two is not decided by these batches" if overlap else "do not overlap"))
    return {"best": best["estimator"], "runner_up": second["estimator"], "best_efficiency": cell(best),
            "runner_up_efficiency": cell(second), "intervals_overlap": overlap, "text": said}


# ----------------------------------------------------------------------------- the batches

@dataclasses.dataclass
class ProbeTables:
    """What ``run`` measured: the summary, the per-batch rows, the per-layer summary, and manifest entries."""

    summary: object
    per_batch: object
    layers: object
    extra: dict


def batch_prompts(config: dict, batch: int, records: Optional[list] = None, source=None) -> List[str]:
    """The prompts of batch ``batch``: consecutive slices of ``records`` (a JSONL file's), or
    ``num_prompts`` prompts from ``source(n, seed)`` (a preset's training prompts) with seed 1000 seed + batch."""
    n = config["num_prompts"]
    if records is None:
        return [r["prompt"] for r in source(n, seed=1000 * config["seed"] + batch)]
    if len(records) < n * config["num_batches"]:
        raise InputError(f"the prompts file holds {len(records)} prompts; {config['num_batches']} batches of "
                         f"{n} need {n * config['num_batches']} (lower --num-batches or --num-prompts)")
    return [r["prompt"] for r in records[batch * n:(batch + 1) * n]]


# ----------------------------------------------------------------------------- stored batches (resuming)

NOT_IN_KEY = ("num_batches", "threads", "name", "work_dir", "check_batches")   # settings no batch depends on


def batch_key(config: dict, probed: Sequence[Probed]) -> dict:
    """What one batch's result depends on: the config without ``NOT_IN_KEY``, and the plan's labels and
    parameters."""
    return {**{k: v for k, v in config.items() if k not in NOT_IN_KEY}, "plan": {p.label: p.params for p in probed}}


def batch_file(work_dir, batch: int) -> Path:
    return Path(work_dir) / f"batch-{batch:04d}.json"


def batch_to_json(rows, layers, length: float) -> dict:
    """One probed batch (``probe_batch``'s result) as JSON values, to be kept by ``records.store_result``."""
    return {"rows": rows.to_dict(orient="records"), "layers": layers.to_dict(orient="records"), "length": length}


def batch_from_json(stored: dict) -> tuple:
    """``batch_to_json``'s inverse: (rows, layer rows, mean response tokens)."""
    import pandas as pd
    return pd.DataFrame(stored["rows"]), pd.DataFrame(stored["layers"]), float(stored["length"])


def stored_batch(work_dir, batch: int, key: dict, probe_it) -> tuple:
    """Batch ``batch`` kept in ``work_dir`` for the settings ``key``, else ``probe_it()``'s, kept there first
    (``records.stored_or_computed``: other settings in the folder are refused by name)."""
    return batch_from_json(records.stored_or_computed(batch_file(work_dir, batch), key, "a stored probe batch",
                                                      lambda: batch_to_json(*probe_it())))


def run(pair: loading.ModelPair, probed: Sequence[Probed], config: dict, records: Optional[list] = None,
        source=None, progress: bool = True) -> ProbeTables:
    """Probe ``config["num_batches"]`` independent batches and summarise them.

    Args:
      pair: the loaded pair; ``config["parameters"]`` (``variance.select_parameters``) is applied to it.
      probed: the plan (``plan``).
      config: ``num_batches``, ``num_prompts``, ``num_rollouts``, ``max_new_tokens``, ``seed``,
        ``num_projections``, ``logits``, ``parameters``; with ``work_dir`` every probed batch is stored
        there and a batch already stored (with the same settings) is read back instead of probed again,
        so a killed probe resumes where it stopped and gives the same tables.
      records, source: where prompts come from (``batch_prompts``).
      progress: a progress bar over batches.

    Returns:
      ``ProbeTables``; its ``extra`` holds the paired contrasts, the verdict, the logits path taken,
      the parameters probed and the first two batches' prompts.
    """
    import pandas as pd
    from tqdm.auto import tqdm
    names = variance.select_parameters(pair.student, config.get("parameters") or "all")
    group = 1 if config.get("per_rollout") else config["num_rollouts"]      # rollouts scored together
    planned = group * config["max_new_tokens"]
    paths = {p.label: ("fused" if fs.has_fused_form(p.name) and fs.choose(config.get("logits", "auto"), p.name, planned,
                                                                         pair.info.vocab_size) else "materialised")
             for p in probed}
    frames, layer_frames, lengths = [], [], []
    work, key = config.get("work_dir"), batch_key(config, probed)
    if work and progress and any(batch_file(work, b).exists() for b in range(config["num_batches"])):
        print(f"resuming: batches already probed are read back from {work}", flush=True)
    for batch in tqdm(range(config["num_batches"]), desc="probe batches", disable=not progress):
        def probe_it():
            return probe_batch(pair, probed, batch_prompts(config, batch, records, source), config, batch)
        rows, layers, length = stored_batch(work, batch, key, probe_it) if work else probe_it()
        frames.append(rows)
        layer_frames.append(layers)
        lengths.append(length)
    per_batch = pd.concat(frames, ignore_index=True)
    summary, costs = summarise(per_batch), efficiency(per_batch)
    extra = {"contrasts": contrasts(per_batch), "efficiency": costs.to_dict(orient="records"),
             "verdict": verdict(costs), "logits_path": paths,
             "vocab": vars(pair.info), "mean_response_tokens": lengths,
             "parameters_probed": {"spec": config.get("parameters") or "all", "tensors": len(names),
                                   "count": sum(p.numel() for n, p in pair.student.named_parameters() if n in names)},
             "student_params": sum(p.numel() for p in pair.student.parameters()),
             "estimator_params": {p.label: p.params for p in probed},
             "batch_prompts": [batch_prompts(config, b, records, source) for b in range(min(2, config["num_batches"]))]}
    layers = summarise_layers(pd.concat(layer_frames, ignore_index=True))
    return ProbeTables(summary, per_batch[["batch", "estimator", *PER_BATCH]], layers, extra)


def report(tables: ProbeTables) -> str:
    """The ratio table with intervals, the paired contrasts and the verdict, as text."""
    costs = {r["estimator"]: r for r in tables.extra["efficiency"]}

    def cell(r, prefix):
        return f"{r[prefix + '_gmean']:.3g} [{r[prefix + '_low']:.3g}, {r[prefix + '_high']:.3g}]"
    lines = [f"{'estimator':<22} {'var / var(opd) [95%]':<26} {'below 1':<8} {'cost':<6} {'var x cost [95%]':<26} "
             "cos to full_kl"]
    for _, r in tables.summary.iterrows():
        c = costs[r["estimator"]]
        lines.append(f"{r['estimator']:<22} {cell(r, 'ratio'):<26} {r['batches_below_1']:>2}/{r['batches']:<5} "
                     f"{c['cost_ratio_gmean']:<6.3g} {cell(c, 'efficiency'):<26} {r['cosine_mean']:.3g}")
    for c in tables.extra["contrasts"]:
        lines.append(f"paired var({c['numerator']}) / var({c['denominator']}): {cell(c, 'ratio')}, below 1 in "
                     f"{c['batches_below_1']} of {c['batches']} batches")
    lines.append(tables.extra["verdict"]["text"])
    return "\n".join(lines)


def figure(summary, per_batch, layers):
    """(a) variance ratio to opd, (b) cosine to the full_kl mean, (c) per-layer ratio: batches as dots,
    the mean over batches with its 95% interval."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    order = list(summary["estimator"])
    x = {name: i for i, name in enumerate(order)}
    n = int(summary["batches"].iloc[0])
    for ax, col, center in ((axes[0], "variance_ratio_to_opd", "ratio_gmean"),
                            (axes[1], "cosine_to_reference", "cosine_mean")):
        prefix = center.split("_")[0]
        ax.scatter(per_batch["estimator"].map(x), per_batch[col], s=10, color="0.6", zorder=2, label="one batch")
        mean = summary[center]
        ax.errorbar(range(len(order)), mean, yerr=[mean - summary[f"{prefix}_low"], summary[f"{prefix}_high"] - mean],
                    fmt="o", color="C3", capsize=4, zorder=3, label="mean over batches, 95% interval")
        ax.set_xticks(range(len(order)), order, rotation=30)
    axes[0].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("tr Cov / tr Cov(opd), same rollouts")
    axes[0].set_title(f"gradient variance relative to opd ({n} batches)")
    axes[0].legend(loc="lower left", fontsize=8)
    axes[1].set_title("cos(mean gradient, full_kl mean)")
    groups = list(dict.fromkeys(layers["group"]))
    width = 0.8 / max(1, len(order))
    for i, name in enumerate(order):
        g = layers[layers["estimator"] == name].set_index("group").loc[groups]
        pos = [j + (i - (len(order) - 1) / 2) * width for j in range(len(groups))]
        axes[2].errorbar(pos, g["ratio_gmean"], yerr=[g["ratio_gmean"] - g["ratio_low"], g["ratio_high"] - g["ratio_gmean"]],
                         fmt="o", capsize=3, label=name)
    axes[2].axhline(1.0, color="k", lw=0.8, ls="--")
    axes[2].set_yscale("log")
    axes[2].set_xticks(range(len(groups)), groups, rotation=30)
    axes[2].set_ylabel("group tr Cov / opd's")
    axes[2].set_title("per-layer variance ratio (geometric mean, 95% interval)")
    axes[2].legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    return fig


def write(tables: ProbeTables, out_dir, name: str, config: dict, started: float, quick: bool = True,
          plot: bool = True, extra: Optional[dict] = None, repo=None) -> Path:
    """Write ``<name>.csv`` (summary), ``<name>_batches.csv``, ``<name>_layers.csv``, ``<name>.json`` (the
    manifest: config, versions, machine, weights, contrasts, verdict) and ``<name>.png``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fmt = "%.10g"
    tables.summary.to_csv(out / f"{name}.csv", index=False, float_format=fmt)
    files = {}
    for suffix, table in (("batches", tables.per_batch), ("layers", tables.layers)):
        table.to_csv(out / f"{name}_{suffix}.csv", index=False, float_format=fmt)
        files[f"{suffix}_csv"] = f"{name}_{suffix}.csv"
    if plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig = figure(tables.summary, tables.per_batch, tables.layers)
        fig.savefig(out / f"{name}.png", dpi=130, bbox_inches="tight")
        if not quick:
            fig.savefig(out / f"{name}.pdf", bbox_inches="tight")
        plt.close(fig)
    manifest = provenance.manifest(name, config, started, tables.summary, quick, config.get("seed"),
                                   {**tables.extra, "machine": provenance.machine(), **files, **(extra or {})}, repo)
    provenance.write_json(out / f"{name}.json", manifest)
    return out


# ----------------------------------------------------------------------------- vopd probe

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vopd probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", help=f"a built-in pair with its prompts: {', '.join(PRESETS)}")
    parser.add_argument("--student", help="student: a folder, a .gguf file, package:MODULE[/FILE] or a hub id")
    parser.add_argument("--teacher", help="teacher: as --student")
    parser.add_argument("--prompts", help="JSONL file of {\"prompt\": ...} records, cut into consecutive batches "
                                          "(default: the preset's training prompts)")
    parser.add_argument("--estimators", help="comma-separated, each NAME or NAME:PARAM=VALUE (e.g. vopd_topk:k=64); "
                                             f"default {','.join(DEFAULT_ESTIMATORS)} (opd is always added)")
    parser.add_argument("--param", action="append", metavar="NAME=VALUE",
                        help="a parameter for every estimator that takes it (repeatable)")
    parser.add_argument("--k", type=int, help="short for --param k=K")
    parser.add_argument("--num-batches", type=int, default=8, help="independent prompt batches (default 8)")
    parser.add_argument("--num-prompts", type=int, default=4, help="prompts per batch (default 4)")
    parser.add_argument("--num-rollouts", type=int, default=8, help="rollouts per prompt (default 8)")
    parser.add_argument("--max-new-tokens", type=int, help="response length (default: the preset's, else 32)")
    parser.add_argument("--params", default="all", help="which student parameters the gradient covers: all, "
                                                        "last:N (last N decoder layers and the final norm) or "
                                                        "regex:PATTERN (default all)")
    parser.add_argument("--logits", default="auto", choices=fs.PATHS,
                        help="materialised logits or hidden states and lm_head tiles (default auto: fused when the "
                             "estimator has it and rollouts x max new tokens x V >= 2^26)")
    parser.add_argument("--score", choices=("rollout", "group"), default=None,
                        help="score each rollout alone (default: the same gradients, a backward pass touches one "
                             "rollout's rows) or each prompt's rollouts together (one [K, T, V] batch; needed by "
                             "group estimators, and where the fused path matters)")
    parser.add_argument("--num-projections", type=int, default=0, help="random projections per gradient (default 0)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16", "float64"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="torch CPU threads")
    parser.add_argument("--cache-dir", help="where presets keep what they build")
    parser.add_argument("--out", required=True, help="output folder (probe.csv, probe_batches.csv, probe_layers.csv, "
                                                     "probe.json, probe.png)")
    parser.add_argument("--name", default="probe", help="file name stem of the outputs (default probe)")
    parser.add_argument("--no-plot", action="store_true", help="no figure")
    return parser


def check_positive(args) -> None:
    for option in ("num_batches", "num_prompts", "num_rollouts", "max_new_tokens", "threads"):
        value = getattr(args, option)
        if value is not None and value < 1:
            raise InputError(f"--{option.replace('_', '-')} must be >= 1, got {value}")
    if args.num_rollouts is not None and args.num_rollouts < 2:
        raise InputError("--num-rollouts must be >= 2: the variance is over rollouts")
    if args.num_projections < 0:
        raise InputError(f"--num-projections must be >= 0, got {args.num_projections}")


def main(argv=None) -> int:
    """``vopd probe``: the variance probe on any pair (see the module docstring)."""
    args = build_parser().parse_args(argv)
    started = time.perf_counter()
    check_positive(args)
    preset = get_preset(args.preset) if args.preset else None
    if preset is None and not (args.student and args.teacher):
        raise InputError("give --preset NAME, or --student and --teacher (with --prompts)")
    if preset is None and not args.prompts:
        raise InputError("without --preset give --prompts FILE.jsonl")
    out = records.check_output(args.out, "--out", folder=True)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        with RunLock(out, f"{args.name}.lock", "vopd probe"):   # a second probe on these outputs is refused at once
            return _probe(args, preset, out, started)
    finally:
        if created and not any(out.iterdir()):     # refused input leaves no folder behind
            out.rmdir()


def _probe(args, preset, out: Path, started: float) -> int:
    """The body of ``main`` once ``out`` is locked for ``args.name`` (``preset``: the ``--preset`` entry or None)."""
    if (out / f"{args.name}.json").exists():     # checked under the lock: never overwrite a finished probe
        raise InputError(f"--out {out} already holds {args.name}.json; choose another --out or --name")
    prompt_records = tasks.read_jsonl(args.prompts) if args.prompts else None
    common = prm.with_shorthand(prm.parse_assignments(args.param), args.k)
    items = args.estimators.split(",") if args.estimators else list(DEFAULT_ESTIMATORS)
    topk = preset.topk if preset is not None else None
    items = [i for i in items if i.strip()]
    plan(items, 2 ** 62, topk, common)                          # names and parameters, before any model loads
    spec = args.params
    if not (spec == "all" or spec.startswith(("last:", "regex:"))):
        raise InputError(f"--params {spec!r}: expected all, last:N or regex:PATTERN")
    if args.threads:
        torch.set_num_threads(args.threads)
    student, teacher = args.student, args.teacher
    if preset is not None and not (student and teacher):
        built = preset.sources(args.cache_dir, True)
        student, teacher = student or built[0], teacher or built[1]
    pair = loading.load_pair(student, teacher, dtype=args.dtype, device=args.device)
    probed = plan(items, pair.info.vocab_size, topk, common)
    if preset is not None and not args.estimators:
        probed += [Probed(f"vopd_topk(k={k})", "vopd_topk", prm.resolve("vopd_topk", {"k": k}))
                   for k in preset.topk_extra if k <= pair.info.vocab_size]
    config = {"preset": args.preset, "student": str(student), "teacher": str(teacher), "prompts": args.prompts,
              "num_batches": args.num_batches, "num_prompts": args.num_prompts, "num_rollouts": args.num_rollouts,
              "max_new_tokens": args.max_new_tokens or (preset.max_new_tokens if preset else 32),
              "parameters": args.params, "logits": args.logits, "num_projections": args.num_projections,
              "seed": args.seed, "dtype": args.dtype, "device": args.device,
              "estimators": [p.label for p in probed],
              "per_rollout": args.score == "rollout" or (args.score is None
                                                         and not any(est.get(p.name).group for p in probed))}
    if prompt_records is not None:
        batch_prompts(config, 0, prompt_records)                       # enough prompts for every batch
    work = out / f"{args.name}_batches.partial"       # a killed probe resumes from here; removed once written
    tables = run(pair, probed, {**config, "work_dir": work}, prompt_records,
                 preset.train_prompts if preset and prompt_records is None else None)
    print(report(tables))
    weights = {"student": loading.weights_sha256(student, "student"), "teacher": loading.weights_sha256(teacher, "teacher")}
    folder = write(tables, out, args.name, config, started, quick=True, plot=not args.no_plot,
                   extra={"weights": weights})
    shutil.rmtree(work, ignore_errors=True)
    paths = sorted(set(tables.extra["logits_path"].values()))
    group = 1 if config["per_rollout"] else config["num_rollouts"]
    print(f"logits: {', '.join(paths)} (scored {group} rollout(s) at a time x {config['max_new_tokens']} tokens x "
          f"V = {pair.info.vocab_size:,})")
    print(f"wrote {folder / args.name}.csv, {args.name}_batches.csv, {args.name}_layers.csv, {args.name}.json"
          + ("" if args.no_plot else f", {args.name}.png") + f"; {time.perf_counter() - started:.0f} s")
    return 0


if __name__ == "__main__":
    exit_with(main)
