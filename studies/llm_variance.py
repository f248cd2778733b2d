"""Gradient variance of OPD estimators on real Hugging Face causal LMs, over independent prompt batches.

For each of ``num_batches`` independent batches (fresh prompts and fresh rollouts, seeded by
the batch index) the probe (``vopd_analysis.lm.variance.probe``) samples rollouts from the student
once and measures, for opd, vopd, vopd_topk, opd_bstar, opd_bstar_topk, iw_opd, full_kl and topk_kl
(every top-k estimator at the pair's ``topk``) on those same rollouts, the
trace of the covariance of the single-rollout parameter gradient, its per-layer breakdown, the
SNR, the gradient noise scale and the cosine of the mean gradient to the full_kl reference.
The ratio var(estimator)/var(opd) is formed within each batch (a paired comparison on common
rollouts) and reported as its geometric mean over batches with a 95% interval (the t-interval
of the log ratios, exponentiated) and the p-value of H0: ratio = 1; the per-layer ratios likewise. One batch's ratio is not a result: on the
tiny pair it moves by a factor of two from batch to batch.

Models: ``--pair tiny`` (default: the committed addition pair, vocabulary 16; outputs
``llm_variance.*``) or ``--pair small`` (the committed Python-documentation pair, vocabulary
8,192; outputs ``llm_variance_small.*``, with vopd_topk also at k = 64 and 256), each checked
against its sha256 card; ``--student PATH --teacher PATH`` (hub ids or local directories, with
``--prompts FILE.jsonl``, cut into consecutive batches; outputs ``llm_variance_custom.*``); or
randomly initialised tiny Qwen2 models with ``--random-init`` (a smoke test that needs no training).
The manifest records the sha256 of the weights, the versions and the CPU that ran it.

    python -m studies.llm_variance [--quick] [--pair small] [--student PATH --teacher PATH] [--prompts FILE]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from tqdm.auto import tqdm

from vopd_analysis.lm import hf, tasks, variance

from vopd_analysis import estimators as est, stats
from vopd_analysis.errors import InputError
from vopd_analysis.distill.loop import PRESETS, DistillConfig

from . import common

NAME = "llm_variance"
ESTIMATORS = ["opd", "vopd", "vopd_topk", "opd_bstar", "opd_bstar_topk", "iw_opd", "full_kl", "topk_kl"]
PER_BATCH = ["trace_cov", "variance_ratio_to_opd", "snr", "noise_scale_ref", "cosine_to_reference",
             "rel_error_to_reference"]
DEFAULTS = {
    "quick": {"pair": "tiny", "num_batches": 8, "num_prompts": 4, "num_rollouts": 8, "estimators": ESTIMATORS,
              "num_projections": 0, "seed": 0, "dtype": None, "device": "cpu"},
    "full": {"pair": "tiny", "num_batches": 16, "num_prompts": 8, "num_rollouts": 16, "estimators": ESTIMATORS,
             "num_projections": 0, "seed": 0, "dtype": None, "device": "cpu"},
}
# per pair: the k of every top-k estimator, further k for vopd_topk alone, the response length
PAIRS = {"tiny": {"topk": 4, "topk_extra": [], "max_new_tokens": PRESETS["tiny"].max_new_tokens},
         "small": {"topk": 16, "topk_extra": [64, 256], "max_new_tokens": PRESETS["small"].max_new_tokens}}
CUSTOM = {"topk": 16, "topk_extra": [], "max_new_tokens": 32}


def output_name(config: dict) -> str:
    """``llm_variance`` for the tiny pair, ``llm_variance_<pair>`` for another."""
    return NAME if config["pair"] == "tiny" else f"{NAME}_{config['pair']}"


def random_models(reason: str):
    """Randomly initialised tiny Qwen2 student/teacher saved to a temporary directory."""
    directory = tempfile.mkdtemp(prefix="vopd_random_pair_")
    student, teacher = hf.save_tiny_pair(directory, seed=0)
    print(f"NOTE: {reason}; using RANDOMLY INITIALISED tiny Qwen2 models saved under {directory} "
          "(the numbers describe untrained models)")
    return student, teacher, "random-init tiny Qwen2"


def default_models(pair: str, random_init: bool = False):
    """(student_path, teacher_path, source): the committed pair of preset ``pair``, or random tiny Qwen2 models."""
    if random_init:
        return random_models("--random-init given")
    if pair not in PRESETS:
        raise InputError(f"unknown pair '{pair}'; committed pairs: {', '.join(PRESETS)}")
    student, teacher, _ = PRESETS[pair].load_pair(DistillConfig.cache_dir, True)
    return student, teacher, f"{pair} (committed pair, vopd_analysis/lm/pairs/{pair})"


def batch_prompts(config: dict, batch: int, records=None) -> list:
    """The prompts of batch ``batch``: consecutive slices of ``records`` (a JSONL file's), or
    ``num_prompts`` training prompts of the pair's preset drawn with seed ``1000 seed + batch``."""
    n = config["num_prompts"]
    if records is None:
        source = PRESETS[config["pair"]].train_prompts if config["pair"] in PRESETS else tasks.train_prompts
        return [r["prompt"] for r in source(n, seed=1000 * config["seed"] + batch)]
    if len(records) < n * config["num_batches"]:
        raise InputError(f"{config['prompts']} holds {len(records)} prompts; {config['num_batches']} batches of "
                         f"{n} need {n * config['num_batches']} (lower --num-batches or --num-prompts)")
    return [r["prompt"] for r in records[batch * n:(batch + 1) * n]]


def probe_batch(pair, config: dict, batch: int, records=None):
    """One independent probe: (per-estimator rows, per-layer rows, mean response length), batch-tagged.

    vopd_topk at each further k of ``topk_extra`` is probed on the same rollouts (same seed) and
    labelled ``vopd_topk(k=K)``."""
    prompts = batch_prompts(config, batch, records)

    def one(estimators, k):
        return variance.probe(pair.student, pair.teacher, pair.tokenizer, prompts, estimators,
                              config["num_rollouts"], max_new_tokens=config["max_new_tokens"],
                              seed=1000 * config["seed"] + batch, vocab_size=pair.info.vocab_size,
                              num_projections=config["num_projections"], logits=config.get("logits", "auto"),
                              params={n: {"k": min(k, pair.info.vocab_size)} for n in estimators
                                      if "k" in est.get(n).defaults})

    result = one(config["estimators"], config["topk"])
    rows, layers = [result.summary], [result.layers]
    for k in config.get("topk_extra") or []:
        extra = one(["vopd_topk"], k)
        label = f"vopd_topk(k={k})"
        rows.append(extra.summary.assign(estimator=label))
        layers.append(extra.layers.assign(estimator=label))
    rows, layers = pd.concat(rows, ignore_index=True), pd.concat(layers, ignore_index=True)
    opd = rows.set_index("estimator")["trace_cov"].get("opd", float("nan"))
    rows = rows.assign(batch=batch, variance_ratio_to_opd=rows["trace_cov"] / opd)
    opd_layers = layers[layers["estimator"] == "opd"].set_index("group")["trace_cov"]
    layers = layers.assign(batch=batch, variance_ratio_to_opd=layers["trace_cov"] / layers["group"].map(opd_layers))
    return rows, layers, float(result.rollouts.response_mask.sum(1).float().mean())


def interval_columns(prefix: str, values) -> dict:
    """{prefix_mean, prefix_low, prefix_high}: the t-interval over batches."""
    mean, low, high = stats.mean_interval(values)
    return {f"{prefix}_mean": mean, f"{prefix}_low": low, f"{prefix}_high": high}


def ratio_columns(ratios) -> dict:
    """{ratio_gmean, ratio_low, ratio_high, ratio_p_value}: geometric mean over batches, the exponentiated
    t-interval of the log ratios, and the t-test p-value of H0: E log ratio = 0."""
    gmean, low, high = stats.ratio_interval(ratios)
    return {"ratio_gmean": gmean, "ratio_low": low, "ratio_high": high,
            "ratio_p_value": stats.t_test_p_value(np.log(np.asarray(ratios, dtype=float)))}


def summarise(per_batch: pd.DataFrame) -> pd.DataFrame:
    """Per estimator: the variance ratio to opd (geometric mean over batches, 95% interval, p-value of
    ratio = 1, number of batches below 1), and the mean trace, SNR and cosine to the reference with their
    t-intervals."""
    out = []
    for name, g in per_batch.groupby("estimator", sort=False):
        ratio = g["variance_ratio_to_opd"]
        out.append({"estimator": name, "unbiased_for": g["unbiased_for"].iloc[0],
                    "teacher_signal": g["teacher_signal"].iloc[0], "batches": len(g),
                    "rollouts_per_batch": int(g["num_rollouts"].iloc[0]), **ratio_columns(ratio),
                    "batches_below_1": int((ratio < 1).sum()),
                    **interval_columns("trace_cov", g["trace_cov"]), **interval_columns("snr", g["snr"]),
                    **interval_columns("cosine", g["cosine_to_reference"])})
    return pd.DataFrame(out)


def summarise_layers(layers: pd.DataFrame) -> pd.DataFrame:
    """Per estimator and parameter group: the group's variance ratio to opd's (geometric mean, interval)."""
    rows = [{"estimator": name, "group": group, "num_params": int(g["num_params"].iloc[0]),
             **ratio_columns(g["variance_ratio_to_opd"]), **interval_columns("trace_cov", g["trace_cov"])}
            for (name, group), g in layers.groupby(["estimator", "group"], sort=False)]
    return pd.DataFrame(rows)


def compute(config: dict, progress: bool = True):
    """Load the pair, probe every batch; return (summary, per-batch table, per-layer summary, manifest fields)."""
    pair = hf.load_pair(config["student"], config["teacher"], dtype=config["dtype"], device=config["device"])
    records = tasks.read_jsonl(config["prompts"]) if config.get("prompts") else None
    frames, layer_frames, lengths = [], [], []
    for batch in tqdm(range(config["num_batches"]), desc="llm_variance batches", disable=not progress):
        rows, layers, length = probe_batch(pair, config, batch, records)
        frames.append(rows)
        layer_frames.append(layers)
        lengths.append(length)
    per_batch = pd.concat(frames, ignore_index=True)
    summary = summarise(per_batch)
    layers = summarise_layers(pd.concat(layer_frames, ignore_index=True))
    per_batch = per_batch[["batch", "estimator", *PER_BATCH]]
    extra = {"vocab": vars(pair.info), "machine": common.machine(), "weights": common.weights_sha256(
             {"student": config["student"], "teacher": config["teacher"]}), "mean_response_tokens": lengths,
             "student_params": sum(p.numel() for p in pair.student.parameters()),
             "batch_prompts": [batch_prompts(config, b, records) for b in range(min(2, config["num_batches"]))]}
    return summary, per_batch, layers, extra


def figure(summary: pd.DataFrame, per_batch: pd.DataFrame, layers: pd.DataFrame):
    """(a) variance ratio to opd, (b) cosine to the full_kl mean, (c) per-layer ratio: batches as dots,
    the mean over batches with its 95% t-interval as a bar."""
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


def resolve_models(cfg: dict) -> dict:
    """Fill in the committed pair of ``cfg["pair"]`` (or random models) when no --student/--teacher is given,
    and the pair's top-k and response length where the config does not set them."""
    if cfg.get("student") or cfg.get("teacher"):
        if not (cfg.get("student") and cfg.get("teacher")):
            raise SystemExit("give both --student and --teacher, or neither (for a committed pair)")
        cfg["pair"] = "custom"
    else:
        cfg["student"], cfg["teacher"], cfg["model_source"] = default_models(cfg["pair"], cfg.get("random_init", False))
        cfg.setdefault("threads", 1)      # small models: threading overhead dominates
    for key, value in PAIRS.get(cfg["pair"], CUSTOM).items():
        cfg.setdefault(key, value)
    return cfg


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    started = time.perf_counter()
    cfg = resolve_models(common.make_config(DEFAULTS, quick, config))
    import torch
    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    summary, per_batch, layers, extra = compute(cfg)
    summary.insert(0, "pair", cfg["pair"])
    cols = ["estimator", "ratio_gmean", "ratio_low", "ratio_high", "ratio_p_value", "batches_below_1", "cosine_mean"]
    print(summary[cols].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    out, name = Path(out_dir), output_name(cfg)
    out.mkdir(parents=True, exist_ok=True)
    for suffix, table in (("batches", per_batch), ("layers", layers)):
        table.to_csv(out / f"{name}_{suffix}.csv", index=False, float_format=common.FLOAT_FORMAT)
        extra[f"{suffix}_csv"] = f"{name}_{suffix}.csv"
    fig = (lambda df: figure(df, per_batch, layers)) if plot else None
    common.finish(name, summary, cfg, out_dir, quick, started, fig, extra=extra, seed=cfg["seed"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few prompts and rollouts (minutes on a CPU)")
    parser.add_argument("--out", help="output folder (default: figures with --quick, figures/full without)")
    parser.add_argument("--pair", help=f"committed pair: {', '.join(PRESETS)} (default tiny)")
    parser.add_argument("--student", help="student hub id or local directory")
    parser.add_argument("--teacher", help="teacher hub id or local directory")
    parser.add_argument("--prompts", help="JSONL file of {\"prompt\": ...} records (default: addition task)")
    parser.add_argument("--num-batches", type=int, help="independent prompt batches (fresh prompts and rollouts)")
    parser.add_argument("--num-prompts", type=int, help="prompts per batch")
    parser.add_argument("--num-rollouts", type=int, help="rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="cpu, cuda, ...")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--random-init", action="store_true", default=None,
                        help="use random tiny Qwen2 models instead of the trained demo pair (smoke test)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 1 for the tiny pair)")
    parser.add_argument("--logits", choices=("auto", "materialised", "fused"),
                        help="per-rollout gradients from materialised logits or from hidden states and lm_head "
                             "tiles (default auto: fused when the estimator has it and the batch's N x V >= 2^26)")
    args = parser.parse_args()
    args.out = args.out or common.default_out(args.quick)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("quick", "out")}
    started = time.perf_counter()
    df = run(quick=args.quick, out_dir=args.out, config=overrides)
    name = output_name({"pair": "custom" if args.student else (args.pair or "tiny")})
    print(f"{len(df)} rows -> {Path(args.out) / name}.csv/.json/.png; {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
