"""What the estimators see on each pair of the registry at the start of distillation.

For each preset's pair (``tiny``: 3-digit addition, 16 tokens; ``small``: Python documentation,
8,192 tokens; ``smollm2``: pretrained SmolLM2-135M-Instruct and its layer-pruned student, 49,152
tokens; ``gemma3``: pretrained Gemma 3 270M and its student, 262,144 tokens) and each of
``num_batches`` independent batches (the preset's training prompts drawn
with seed ``1000 seed + batch``, fresh rollouts with the same seed), the committed student samples
``num_rollouts`` responses of the preset's length per prompt, and at every sampled token
``vopd_analysis.lm.distribution_statistics`` measures, with teacher and student both conditioned
on the student's own prefix:

* the teacher's entropy H(pi_T) (nats), beside log V, the entropy of a uniform teacher;
* the probability mass of its 1, 16 and 256 most likely tokens (1 when k >= V);
* the per-token reverse KL(pi || pi_T) (nats), and the student's entropy.

Each statistic is the mean over a batch's tokens; the table gives, per pair, the mean over
batches with a Student-t 95% interval (``vopd_analysis.stats.mean_interval``). The tabular
studies show that the vocabulary and the teacher's sharpness decide whether vOPD's baseline
helps; this table places the real pairs on those axes.

``pair_statistics_entropy.csv`` bins the visited states by the teacher's entropy and gives, per pair,
batch and bin, the sums over the bin's states of the logit-space one-token score variance with no
baseline (opd), vOPD's KL baseline and the optimal b* (``entropy_binned_score_variance``), which
``vocab_effect`` compares across vocabularies at equal teacher entropy.

Full mode keeps each batch's statistics in ``runs/pair_statistics_full``, so a killed run resumes.

    python -m studies.pair_statistics [--quick]
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from vopd_analysis import records, stats
from vopd_analysis.lm import loading
from vopd_analysis.lm.presets import PRESETS
from vopd_analysis.lm.statistics import distribution_statistics

from . import common

NAME = "pair_statistics"
READS = ()   # the studies whose outputs this one reads (run_all runs them first)
STATS = {"teacher_entropy": "teacher entropy (nats)", "teacher_top1_mass": "teacher top-1 mass",
         "teacher_top16_mass": "teacher top-16 mass", "teacher_top256_mass": "teacher top-256 mass",
         "reverse_kl": "reverse KL per token (nats)", "student_entropy": "student entropy (nats)",
         "teacher_token_logprob": "teacher log-prob of sampled token (nats)"}
DEFAULTS = {
    "quick": {"pairs": ["tiny", "small", "smollm2", "gemma3"], "num_batches": 6, "num_prompts": 8, "num_rollouts": 4,
              "seed": 0, "work_dir": None},
    "full": {"pairs": ["tiny", "small", "smollm2", "gemma3"], "num_batches": 16, "num_prompts": 8, "num_rollouts": 4,
             "seed": 0, "work_dir": "runs/pair_statistics_full"},
}


def batch_statistics(pair, preset, config: dict, batch: int) -> dict:
    """``distribution_statistics`` of one independent batch of the preset's training prompts."""
    seed = 1000 * config["seed"] + batch
    prompts = [r["prompt"] for r in preset.train_prompts(config["num_prompts"], seed)]
    return distribution_statistics(pair.student, pair.teacher, pair.tokenizer, prompts, config["num_rollouts"],
                                   preset.max_new_tokens, seed=seed, vocab_size=pair.info.vocab_size)


def stored_batch_statistics(pair, preset, name: str, config: dict, batch: int) -> dict:
    """``batch_statistics``, kept in ``work_dir/<pair>/batch-NNNN.json`` when the config has a ``work_dir`` and
    read back from there on a rerun with the same settings (a killed full run resumes where it stopped)."""
    if not config.get("work_dir"):
        return batch_statistics(pair, preset, config, batch)
    path = Path(config["work_dir"]) / name / f"batch-{batch:04d}.json"
    key = {"pair": name, "batch": batch, **{k: config[k] for k in ("num_prompts", "num_rollouts", "seed")}}
    return records.stored_or_computed(path, key, "stored pair statistics",
                                      lambda: batch_statistics(pair, preset, config, batch))


def compute(config: dict):
    """One row per pair: mean over batches and 95% t-interval of every statistic; per-batch values to the manifest."""
    rows, per_batch, weights, bins = [], [], {}, []
    for name in config["pairs"]:
        preset = PRESETS[name]
        student, teacher = preset.sources(None, False)
        pair = loading.load_pair(student, teacher)
        batches = [stored_batch_statistics(pair, preset, name, config, b) for b in range(config["num_batches"])]
        bins += [{"pair": name, "vocab_size": pair.info.vocab_size, "batch": b, **row}
                 for b, s in enumerate(batches) for row in s.pop("by_entropy")]
        per_batch += [{"pair": name, "batch": b, **s} for b, s in enumerate(batches)]
        V = pair.info.vocab_size
        row = {"pair": name, "vocab_size": V, "log_vocab": math.log(V), "batches": len(batches),
               "prompts_per_batch": config["num_prompts"], "rollouts_per_prompt": config["num_rollouts"],
               "response_tokens": preset.max_new_tokens,
               "tokens_per_batch": sum(s["tokens"] for s in batches) / len(batches)}
        for key in STATS:
            interval = stats.mean_interval([s[key] for s in batches])
            row.update(zip((f"{key}_mean", f"{key}_low", f"{key}_high"), interval))
        rows.append(row)
        weights[name] = common.weights_sha256({"student": student, "teacher": teacher})
    return pd.DataFrame(rows), {"per_batch": per_batch, "weights": weights, "machine": common.machine(),
                                "entropy_bins": bins}


def report(df: pd.DataFrame, config: dict) -> common.Report:
    def cell(r, key):
        return f"{r[key + '_mean']:.3g} [{r[key + '_low']:.3g}, {r[key + '_high']:.3g}]"

    table = pd.DataFrame([{"pair": r["pair"], "V": r["vocab_size"], "log V": f"{r['log_vocab']:.3g}",
                           **{label: cell(r, key) for key, label in STATS.items()}} for _, r in df.iterrows()])
    return common.Report(text=f"mean over {config['num_batches']} prompt batches [95% t-interval]\n"
                              + table.T.to_string(header=False),
                         markdown=common.markdown_table(table))


def figure(df: pd.DataFrame):
    """(a) teacher and student entropy against log V, (b) teacher top-k mass, (c) reverse KL per token;
    mean over batches with its 95% t-interval."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    pairs = list(df["pair"])
    x = range(len(pairs))

    def bars(ax, keys, labels):
        width = 0.8 / len(keys)
        for i, (key, label) in enumerate(zip(keys, labels)):
            mean = df[f"{key}_mean"]
            pos = [j + (i - (len(keys) - 1) / 2) * width for j in x]
            ax.bar(pos, mean, width, yerr=[mean - df[f"{key}_low"], df[f"{key}_high"] - mean], capsize=3, label=label)
        ax.set_xticks(list(x), [f"{p} (V={v:,})" for p, v in zip(pairs, df["vocab_size"])])

    bars(axes[0], ["teacher_entropy", "student_entropy"], ["teacher", "student"])
    axes[0].scatter(list(x), df["log_vocab"], marker="_", s=600, color="k", zorder=3, label="log V (uniform)")
    axes[0].set_ylabel("nats")
    axes[0].set_title("entropy of the next-token distribution")
    axes[0].legend(fontsize=8)
    bars(axes[1], ["teacher_top1_mass", "teacher_top16_mass", "teacher_top256_mass"], ["top-1", "top-16", "top-256"])
    axes[1].set_ylim(0, 1.05)
    axes[1].set_title("teacher probability in its k most likely tokens")
    axes[1].legend(fontsize=8)
    bars(axes[2], ["reverse_kl"], ["KL(student || teacher)"])
    axes[2].set_ylabel("nats per token")
    axes[2].set_title("per-token reverse KL on student samples")
    fig.suptitle("the pairs at the start of distillation: mean over prompt batches, 95% t-interval",
                 fontsize=10)
    fig.tight_layout()
    return fig


def run(quick: bool = True, out_dir="figures", config=None, plot: bool = True) -> pd.DataFrame:
    bins = []

    def computed(cfg):
        table, extra = compute(cfg)
        bins.extend(extra.pop("entropy_bins"))
        return table, {**extra, "entropy_csv": f"{NAME}_entropy.csv"}
    df = common.run_study(NAME, DEFAULTS, computed, figure, report=report, quick=quick, out_dir=out_dir,
                          config=config, plot=plot, seed="seed")
    pd.DataFrame(bins).to_csv(Path(out_dir) / f"{NAME}_entropy.csv", index=False, float_format=common.FLOAT_FORMAT)
    return df


if __name__ == "__main__":
    common.main(run, __doc__)
