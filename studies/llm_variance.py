"""Gradient variance of OPD estimators on real Hugging Face causal LMs, over independent prompt batches.

The variance probe over batches (``vopd_analysis.lm.probe``, the library behind ``vopd probe``):
for each of ``num_batches`` independent batches (fresh prompts and fresh rollouts, seeded by the
batch index) the student samples rollouts once, and opd, vopd, vopd_topk, opd_bstar,
opd_bstar_topk, iw_opd, full_kl and topk_kl (every top-k estimator at the pair's ``topk``, and
vopd_topk also at the pair's further k) are probed on those same rollouts: the trace of the
covariance of the single-rollout parameter gradient, its per-layer breakdown, the SNR, the
gradient noise scale and the cosine of the mean gradient to the full_kl reference. The ratio
var(estimator)/var(opd) is formed within each batch (a paired comparison on common rollouts) and
reported as its geometric mean over batches with a 95% interval (the t-interval of the log ratios,
exponentiated) and the p-value of H0: ratio = 1; the per-layer ratios likewise. The manifest adds
the paired contrasts (opd_bstar / vopd, ...), the cost-weighted efficiency and its verdict.

Models: ``--pair NAME`` for a preset of the pair registry (``vopd_analysis.lm.presets``: tiny,
the default, writes ``llm_variance.*``; another writes ``llm_variance_<pair>.*``), each checked
against its card; ``--student --teacher`` (anything ``vopd probe`` accepts, with ``--prompts
FILE.jsonl`` cut into consecutive batches; outputs ``llm_variance_custom.*``); or randomly
initialised tiny Qwen2 models with ``--random-init`` (a smoke test that needs no training).
``--params last:N`` restricts the gradient to the last N decoder layers and the final norm.
``--work-dir DIR`` keeps every probed batch there, so a killed probe resumes where it stopped (the
pretrained pairs' full mode uses ``runs/llm_variance_<pair>_full``).

    python -m studies.llm_variance [--quick] [--pair smollm2] [--params last:2] [--student S --teacher T --prompts F]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd

from vopd_analysis import params as prm
from vopd_analysis import provenance, records
from vopd_analysis.errors import InputError
from vopd_analysis.lm import loading, presets, probe, tasks
from vopd_analysis.lm.presets import PRESETS

from . import common

NAME = "llm_variance"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
ESTIMATORS = list(probe.DEFAULT_ESTIMATORS)
DEFAULTS = {
    "quick": {"pair": "tiny", "num_batches": 8, "num_prompts": 4, "num_rollouts": 8, "estimators": ESTIMATORS,
              "num_projections": 0, "seed": 0, "dtype": None, "device": "cpu", "work_dir": None},
    "full": {"pair": "tiny", "num_batches": 16, "num_prompts": 8, "num_rollouts": 16, "estimators": ESTIMATORS,
             "num_projections": 0, "seed": 0, "dtype": None, "device": "cpu", "work_dir": None},
}


def output_name(config: dict) -> str:
    """``config["name"]`` if given, else ``llm_variance`` for the tiny pair and ``llm_variance_<pair>`` for another."""
    if config.get("name"):
        return config["name"]
    return NAME if config["pair"] == "tiny" else f"{NAME}_{config['pair']}"


def estimator_plan(config: dict, vocab_size: int) -> list:
    """The probed estimators: ``config["estimators"]`` with every top-k one at ``topk``, then vopd_topk at
    each k of ``topk_extra`` (labelled ``vopd_topk(k=K)``)."""
    planned = probe.plan(config["estimators"], vocab_size, config["topk"])
    return planned + [probe.Probed(f"vopd_topk(k={k})", "vopd_topk", prm.resolve("vopd_topk", {"k": k}))
                      for k in config.get("topk_extra") or []]


def prompt_source(config: dict):
    """(records, source) for ``probe.batch_prompts``: a JSONL file's records, or the preset's training prompts."""
    if config.get("prompts"):
        return tasks.read_jsonl(config["prompts"]), None
    return None, (PRESETS[config["pair"]].train_prompts if config["pair"] in PRESETS else tasks.train_prompts)


def probe_batch(pair, config: dict, batch: int, records=None):
    """One independent probe of ``config``'s estimators: (per-estimator rows, per-layer rows, mean response
    length), batch-tagged (``probe.probe_batch``)."""
    records, source = (records, None) if records is not None else prompt_source(config)
    prompts = probe.batch_prompts(config, batch, records, source)
    return probe.probe_batch(pair, estimator_plan(config, pair.info.vocab_size), prompts, config, batch)


summarise = probe.summarise


def compute(config: dict, progress: bool = True) -> probe.ProbeTables:
    """Load the pair and probe every batch (``probe.run``)."""
    pair = loading.load_pair(config["student"], config["teacher"], dtype=config["dtype"], device=config["device"])
    records, source = prompt_source(config)
    tables = probe.run(pair, estimator_plan(config, pair.info.vocab_size), config, records, source, progress)
    tables.extra["weights"] = common.weights_sha256({"student": config["student"], "teacher": config["teacher"]})
    return tables


def resolve_models(cfg: dict) -> dict:
    """Fill in the pair of ``cfg["pair"]`` (or random models) when no --student/--teacher is given, and the
    pair's top-k and response length where the config does not set them."""
    if cfg.get("student") or cfg.get("teacher"):
        if not (cfg.get("student") and cfg.get("teacher")):
            raise InputError("give both --student and --teacher, or neither (for a preset's pair)")
        cfg["pair"] = "custom"
    else:
        cfg["student"], cfg["teacher"], cfg["model_source"] = presets.pair_models(cfg["pair"],
                                                                                  cfg.get("random_init", False))
        cfg.setdefault("threads", 1 if cfg["pair"] in ("tiny", "small") else None)   # small models: 1 thread
    for key, value in presets.probe_settings(cfg["pair"]).items():
        cfg.setdefault(key, value)
    return cfg


def run(quick: bool = True, out_dir="figures", config: dict | None = None, plot: bool = True) -> pd.DataFrame:
    started = time.perf_counter()
    cfg = resolve_models(common.make_config(DEFAULTS, quick, config))
    import torch
    torch.set_num_threads(cfg.get("threads") or torch.get_num_threads())
    tables = compute(cfg)
    tables.summary.insert(0, "pair", cfg["pair"])
    print(probe.report(tables))
    probe.write(tables, out_dir, output_name(cfg), cfg, started, quick=quick, plot=plot, repo=common.REPO)
    return tables.summary


# pretrained pairs on a 2-core CPU: the gradient covers the last 2 decoder layers and the final norm (the tied
# embedding / output matrix excluded), each rollout is scored alone (the same gradients, less work per backward),
# and a batch is 2 x 4 rollouts (quick) or 2 x 8 (full); both modes then probe every parameter on the first
# ``check_batches`` batches to show whether the restricted ratios agree with the full-parameter ones. Full mode
# keeps its batches in runs/llm_variance_<pair>_full (and ..._all): a killed study resumes where it stopped.
PRETRAINED = {
    "quick": {"num_batches": 8, "num_prompts": 2, "num_rollouts": 4, "parameters": "last:2", "per_rollout": True,
              "threads": None, "check_batches": 2},
    "full": {"num_batches": 16, "num_prompts": 2, "num_rollouts": 8, "parameters": "last:2", "per_rollout": True,
             "threads": None, "check_batches": 2},
}
CHECK_ESTIMATORS = ["opd", "vopd", "opd_bstar", "full_kl"]


def parameter_check(restricted: pd.DataFrame, full: pd.DataFrame) -> list:
    """Per estimator and batch: the variance ratio to opd with the restricted gradient and with every parameter,
    on the same rollouts (the same batches and seeds), and their quotient."""
    merged = restricted.merge(full, on=["batch", "estimator"], suffixes=("_restricted", "_all"))
    return [{"estimator": r["estimator"], "batch": int(r["batch"]),
             "ratio_restricted": float(r["variance_ratio_to_opd_restricted"]),
             "ratio_all_parameters": float(r["variance_ratio_to_opd_all"]),
             "restricted_over_all": float(r["variance_ratio_to_opd_restricted"] / r["variance_ratio_to_opd_all"])}
            for _, r in merged.iterrows() if r["estimator"] != "opd"]


def run_pretrained(pair: str, quick: bool = True, out_dir="figures", config: dict | None = None,
                   plot: bool = True) -> pd.DataFrame:
    """``llm_variance`` on a pretrained pair with the ``PRETRAINED`` settings, then ``check_parameters``."""
    settings = {**PRETRAINED["quick" if quick else "full"], "pair": pair, **(config or {})}
    settings.setdefault("work_dir", None if quick else f"runs/{NAME}_{pair}_full")
    check = settings.pop("check_batches")
    summary = run(quick=quick, out_dir=out_dir, config=settings, plot=plot)
    if check:
        check_parameters(pair, settings, check, quick, out_dir, plot)
    return summary


def check_parameters(pair: str, settings: dict, batches: int, quick: bool, out_dir, plot: bool = True) -> list:
    """The all-parameter probe of the first ``batches`` batches of a restricted probe already in ``out_dir``
    (``llm_variance_<pair>_all.*``, same settings and seeds, so the same rollouts) and its comparison with the
    restricted ratios (``parameter_check``, added to the restricted probe's manifest)."""
    name = f"{NAME}_{pair}"
    run(quick=quick, out_dir=out_dir, plot=plot,
        config={**settings, "parameters": "all", "num_batches": batches, "estimators": CHECK_ESTIMATORS,
                "topk_extra": [], "name": f"{name}_all",
                "work_dir": settings["work_dir"] and f"{settings['work_dir']}_all"})
    out = Path(out_dir)
    rows = parameter_check(pd.read_csv(out / f"{name}_batches.csv"), pd.read_csv(out / f"{name}_all_batches.csv"))
    manifest = records.read_json(out / f"{name}.json", "the restricted probe's manifest")
    manifest["parameter_check"] = {"all_parameters": f"{name}_all.csv", "batches": batches, "rows": rows}
    provenance.write_json(out / f"{name}.json", manifest)
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda x: f"{x:.4g}"))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few prompts and rollouts (minutes on a CPU)")
    parser.add_argument("--out", help="output folder (default: figures with --quick, figures/full without)")
    parser.add_argument("--pair", help=f"a preset's pair: {', '.join(PRESETS)} (default tiny)")
    parser.add_argument("--student", help="student: a folder, a .gguf file, package:MODULE[/FILE] or a hub id")
    parser.add_argument("--teacher", help="teacher: as --student")
    parser.add_argument("--prompts", help="JSONL file of {\"prompt\": ...} records (default: the preset's prompts)")
    parser.add_argument("--estimators", type=lambda s: [x for x in s.split(",") if x],
                        help="comma-separated estimators (NAME or NAME:PARAM=VALUE)")
    parser.add_argument("--params", dest="parameters",
                        help="the parameters the gradient covers: all (default), last:N or regex:PATTERN")
    parser.add_argument("--num-batches", type=int, help="independent prompt batches (fresh prompts and rollouts)")
    parser.add_argument("--num-prompts", type=int, help="prompts per batch")
    parser.add_argument("--num-rollouts", type=int, help="rollouts per prompt")
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--device", help="cpu, cuda, ...")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--random-init", action="store_true", default=None,
                        help="use random tiny Qwen2 models instead of a preset's pair (smoke test)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default 1 for the tiny and small pairs)")
    parser.add_argument("--name", help="output file stem (default llm_variance[_PAIR])")
    parser.add_argument("--work-dir", help="keep every probed batch here; a rerun with the same settings resumes")
    parser.add_argument("--logits", choices=("auto", "materialised", "fused"),
                        help="per-rollout gradients from materialised logits or from hidden states and lm_head "
                             "tiles (default auto: fused when the estimator has it and rollouts x max new tokens "
                             "x V >= 2^26)")
    args = parser.parse_args()
    args.out = args.out or common.default_out(args.quick)
    overrides = {k: v for k, v in vars(args).items() if v is not None and k not in ("quick", "out")}
    started = time.perf_counter()
    df = run(quick=args.quick, out_dir=args.out, config=overrides)
    name = output_name({"pair": "custom" if args.student else (args.pair or "tiny"), "name": args.name})
    print(f"{len(df)} rows -> {Path(args.out) / name}.csv/.json/.png; {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    from vopd_analysis.errors import exit_with
    exit_with(lambda: main() or 0)
