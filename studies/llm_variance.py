"""Gradient variance of OPD estimators on real Hugging Face causal LMs.

Samples rollouts from the student once and measures, for opd, vopd, vopd_topk, full_kl
and topk_kl, the trace of the covariance of the single-rollout parameter gradient, its
per-layer breakdown, the SNR, the gradient noise scale and the cosine of the mean
gradient to the full_kl reference, all on the same rollouts (``vopd_analysis.variance.probe``).

Models: ``--student PATH --teacher PATH`` (hub ids or local directories, with ``--prompts
FILE.jsonl``), else the tiny addition pair of the in-project CPU demo
(``vopd_analysis.tiny.load_or_train_pair``), else, if that module is missing, randomly
initialised tiny Qwen2 models (said so in the output and the manifest; ``--random-init``
forces them, for a smoke test that needs no training).

    python -m studies.llm_variance [--quick] [--student PATH --teacher PATH] [--prompts FILE] [--random-init]
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
import time
from pathlib import Path

import pandas as pd

from vopd_analysis import hf, tasks, variance

from . import common

NAME = "llm_variance"
ESTIMATORS = ["opd", "vopd", "vopd_topk", "full_kl", "topk_kl"]
DEFAULTS = {
    "quick": {"num_prompts": 4, "num_rollouts": 8, "max_new_tokens": 8, "estimators": ESTIMATORS,
              "topk": 4, "num_projections": 8, "seed": 0, "dtype": None, "device": "cpu"},
    "full": {"num_prompts": 16, "num_rollouts": 16, "max_new_tokens": 8, "estimators": ESTIMATORS,
             "topk": 4, "num_projections": 16, "seed": 0, "dtype": None, "device": "cpu"},
}


def random_models(reason: str):
    """Randomly initialised tiny Qwen2 student/teacher saved to a temporary directory."""
    directory = tempfile.mkdtemp(prefix="vopd_random_pair_")
    student, teacher = hf.save_tiny_pair(directory, seed=0)
    print(f"NOTE: {reason}; using RANDOMLY INITIALISED tiny Qwen2 models saved under {directory} "
          "(the numbers describe untrained models)")
    return student, teacher, "random-init tiny Qwen2"


def default_models(random_init: bool = False, cache_dir: str = ".cache/vopd_tiny"):
    """(student_path, teacher_path, source): the in-project tiny pair (trained and cached on first
    use), or random tiny Qwen2 models if ``random_init`` or ``vopd_analysis.tiny`` is missing."""
    if random_init:
        return random_models("--random-init given")
    try:
        loader = importlib.import_module("vopd_analysis.tiny").load_or_train_pair
    except (ImportError, AttributeError):
        return random_models("vopd_analysis.tiny.load_or_train_pair is not available")
    student, teacher, _ = loader(cache_dir)
    return student, teacher, "vopd_analysis.tiny.load_or_train_pair"


def load_prompts(path, n: int, seed: int):
    """``n`` prompts from a JSONL file, or ``n`` training prompts of the built-in addition task."""
    records = tasks.read_jsonl(path)[:n] if path else tasks.train_prompts(n, seed)
    return [r["prompt"] for r in records]


def compute(config: dict):
    """Load the pair, run the probe; return (summary, per-layer table, extra manifest fields)."""
    pair = hf.load_pair(config["student"], config["teacher"], dtype=config["dtype"], device=config["device"])
    prompts = load_prompts(config.get("prompts"), config["num_prompts"], config["seed"])
    k = min(config["topk"], pair.info.vocab_size)
    result = variance.probe(pair.student, pair.teacher, pair.tokenizer, prompts, config["estimators"],
                            config["num_rollouts"], max_new_tokens=config["max_new_tokens"], seed=config["seed"],
                            vocab_size=pair.info.vocab_size, num_projections=config["num_projections"],
                            params={n: {"k": k} for n in config["estimators"] if n in ("vopd_topk", "topk_kl")},
                            progress=True)
    summary = result.summary
    if "opd" in set(summary["estimator"]):
        opd_trace = float(summary.loc[summary["estimator"] == "opd", "trace_cov"].iloc[0])
        summary = summary.assign(variance_ratio_to_opd=summary["trace_cov"] / opd_trace)
    timing = summary[["estimator", "seconds", "rollouts_per_s"]].to_dict(orient="records")
    summary = summary.drop(columns=["seconds", "rollouts_per_s"])  # wall times go to the manifest only
    mean_len = float(result.rollouts.response_mask.sum(1).float().mean())
    extra = {"vocab": vars(pair.info), "hf_versions": hf_versions(), "prompts": prompts, "mean_response_tokens": mean_len,
             "student_params": sum(p.numel() for p in pair.student.parameters()),
             "example_responses": result.rollouts.responses(pair.tokenizer)[:4], "timing": timing}
    return summary, result.layers, extra


def hf_versions() -> dict:
    """Versions of the Hugging Face stack (the common manifest records torch, numpy, scipy, pandas)."""
    import accelerate
    import tokenizers
    import transformers
    return {"transformers": transformers.__version__, "tokenizers": tokenizers.__version__,
            "accelerate": accelerate.__version__}


def figure(summary: pd.DataFrame, layers: pd.DataFrame):
    """(a) tr Cov per estimator, (b) cosine of the mean gradient to the full_kl reference, (c) per layer."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4), gridspec_kw={"width_ratios": [1, 1, 1.6]})
    order = list(summary["estimator"])
    sns.barplot(summary, x="estimator", y="trace_cov", hue="estimator", order=order, ax=axes[0], legend=False)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("tr Cov of the single-rollout gradient")
    axes[0].set_title("gradient variance (same rollouts)")
    sns.barplot(summary, x="estimator", y="cosine_to_reference", hue="estimator", order=order, ax=axes[1],
                legend=False)
    axes[1].set_ylim(min(0.0, summary["cosine_to_reference"].min()), 1.05)
    axes[1].set_title("cos(mean gradient, full_kl mean)")
    sns.barplot(layers, x="group", y="trace_cov", hue="estimator", hue_order=order, ax=axes[2])
    axes[2].set_yscale("log")
    axes[2].set_ylabel("tr Cov (parameter group)")
    axes[2].set_title("per-layer variance")
    axes[2].tick_params(axis="x", rotation=30)
    sns.move_legend(axes[2], "upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    for ax in axes[:2]:
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    return fig


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    started = time.perf_counter()
    cfg = common.make_config(DEFAULTS, quick, config)
    if not cfg.get("student") or not cfg.get("teacher"):
        if cfg.get("student") or cfg.get("teacher"):
            raise SystemExit("give both --student and --teacher, or neither (for the tiny demo pair)")
        cfg["student"], cfg["teacher"], cfg["model_source"] = default_models(cfg.get("random_init", False))
        cfg.setdefault("threads", 1)      # tiny models: threading overhead dominates
    if cfg.get("threads"):
        import torch
        torch.set_num_threads(cfg["threads"])
    summary, layers, extra = compute(cfg)
    cols = ["estimator", "trace_cov", "variance_ratio_to_opd", "snr", "noise_scale_ref", "cosine_to_reference"]
    print(summary[[c for c in cols if c in summary]].to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    layers.to_csv(out / f"{NAME}_layers.csv", index=False, float_format=common.FLOAT_FORMAT)
    extra["layers_csv"] = f"{NAME}_layers.csv"
    fig = (lambda df: figure(df, layers)) if plot else None
    common.finish(NAME, summary, cfg, out_dir, quick, started, fig, extra=extra, seed=cfg["seed"])
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few prompts and rollouts (minutes on a CPU)")
    parser.add_argument("--out", default="figures", help="output folder (default: figures)")
    parser.add_argument("--student", help="student hub id or local directory")
    parser.add_argument("--teacher", help="teacher hub id or local directory")
    parser.add_argument("--prompts", help="JSONL file of {\"prompt\": ...} records (default: addition task)")
    parser.add_argument("--num-prompts", type=int)
    parser.add_argument("--num-rollouts", type=int, help="rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="cpu, cuda, ...")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--random-init", action="store_true", default=None,
                        help="use random tiny Qwen2 models instead of the trained demo pair (smoke test)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 1 for the tiny pair)")
    args = parser.parse_args()
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("quick", "out")}
    started = time.perf_counter()
    df = run(quick=args.quick, out_dir=args.out, config=overrides)
    print(f"{len(df)} rows -> {Path(args.out) / NAME}.csv/.json/.png; {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    main()
