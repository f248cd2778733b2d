"""The distillation loop on untrained tiny models: metrics, checkpoints, NaN skipping, exact resume, DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vopd_analysis.distill import checkpoint as ckpt
from vopd_analysis.distill import command, loop
from vopd_analysis.distill.config import DistillConfig, check_config
from vopd_analysis.distill.metrics import Metrics
from vopd_analysis.errors import InputError
from vopd_analysis.lm import tiny
from vopd_analysis.lock import LOCK

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return tiny.save_random_pair(tmp_path_factory.mktemp("pair"))


def small(pair, out, **overrides):
    """Options for a few fast steps on the random pair."""
    opts = {"--student": pair[0], "--teacher": pair[1], "--out": str(out), "--steps": 3,
            "--prompts-per-step": 4, "--rollouts-per-prompt": 2, "--num-eval": 8, "--eval-every": 2,
            "--save-every": 1, "--keep-checkpoints": 10, "--lr": 0.01}
    opts.update({f"--{k.replace('_', '-')}": v for k, v in overrides.items()})
    return [str(x) for kv in opts.items() for x in kv]


def rows(out, kind="train"):
    return [r for r in map(json.loads, (Path(out) / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def steps_saved(out):
    return [int(p.name.split("-")[1]) for p in ckpt.checkpoint_dirs(out)]


def test_run_writes_metrics_and_checkpoints(pair, tmp_path):
    out = tmp_path / "run"
    assert command.main(small(pair, out, estimator="vopd_topk", k=4)) == 0
    train = rows(out)
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("loss", "reverse_kl", "reverse_kl_sampled", "grad_norm", "tokens_per_s", "time_rollout",
                "time_teacher", "time_student", "peak_memory_mb"):
        assert all(isinstance(r[key], float) for r in train), key
    assert all(r["reverse_kl"] != r["reverse_kl"] for r in train)  # nan: vopd_topk has no full teacher logits
    assert [r["step"] for r in rows(out, "eval")] == [0, 2, 3]
    assert steps_saved(out) == [1, 2, 3]
    assert (out / "metrics.csv").is_file() and (out / "final" / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["estimator_params"] == {"k": 4}
    # the student moved, and the checkpoint holds exactly the final weights
    from transformers import AutoModelForCausalLM
    start = AutoModelForCausalLM.from_pretrained(pair[0]).state_dict()
    final = AutoModelForCausalLM.from_pretrained(out / "checkpoints" / "step-00000003" / "model").state_dict()
    assert any(not torch.equal(start[k], final[k]) for k in start)


def test_user_prompts_jsonl(pair, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"{i:03d}+001=", "answer": str(i + 1)}) + "\n"
                               for i in range(30)))
    out = tmp_path / "run"
    command.main(small(pair, out, prompts=prompts, steps=2, estimator="opd", max_new_tokens=6))
    config = json.loads((out / "config.json").read_text())
    assert config["preset"] is None and config["max_new_tokens"] == 6
    assert len(rows(out)) == 2 and rows(out, "eval")[-1]["eval_accuracy"] == 0.0


def test_refuses_existing_out_dir(pair, tmp_path):
    out = tmp_path / "run"
    command.main(small(pair, out, steps=1, eval_every=0))
    before = (out / "metrics.jsonl").read_text()
    with pytest.raises(InputError, match="already holds a run.*--resume"):
        command.main(small(pair, out, steps=1, eval_every=0))
    assert (out / "metrics.jsonl").read_text() == before
    with pytest.raises(InputError, match="different estimator"):
        command.main(small(pair, out, steps=2, eval_every=0, estimator="opd") + ["--resume"])


def test_bad_configs_are_refused(pair, tmp_path):
    with pytest.raises(InputError, match="unknown estimator"):
        command.main(small(pair, tmp_path / "a", estimator="nope"))
    with pytest.raises(InputError, match="exact tabular"):
        command.main(small(pair, tmp_path / "b", estimator="rtg_oracle"))
    with pytest.raises(InputError, match="unknown"):
        command.main(small(pair, tmp_path / "c", estimator="opd") + ["--param", "gamma=0.5"])


def test_nan_loss_step_is_skipped_without_a_checkpoint(pair, tmp_path, monkeypatch):
    real, calls = loop.estimator_loss, []

    def nan_on_second_step(cfg, batch, params, **kwargs):
        calls.append(1)
        loss = real(cfg, batch, params, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(loop, "estimator_loss", nan_on_second_step)
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="step 2: non-finite"):
        command.main(small(pair, out, eval_every=0))
    train = rows(out)
    assert [r["skipped"] for r in train] == [False, True, False]
    assert train[1]["loss"] != train[1]["loss"]
    assert steps_saved(out) == [1, 3]
    for path in ckpt.checkpoint_dirs(out):
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path / "model")
        assert all(torch.isfinite(p).all() for p in model.parameters())


def test_resume_after_interruption_equals_uninterrupted(pair, tmp_path, monkeypatch):
    full = tmp_path / "full"
    command.main(small(pair, full, steps=5, save_every=2, eval_every=2))

    interrupted = tmp_path / "interrupted"
    real_log = Metrics.log

    def die_after_step_3(self, row):
        real_log(self, row)
        if row["kind"] == "train" and row["step"] == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(Metrics, "log", die_after_step_3)
    # an interrupt that is not a Ctrl-C between steps (a second Ctrl-C, a crash): nothing more is saved
    assert command.main(small(pair, interrupted, steps=5, save_every=2, eval_every=2)) == 130
    monkeypatch.setattr(Metrics, "log", real_log)
    assert [r["step"] for r in rows(interrupted)] == [1, 2, 3] and steps_saved(interrupted) == [2]
    assert not (interrupted / LOCK).exists()   # the lock went with the run

    command.main(["--out", str(interrupted), "--resume"])   # everything else comes from the saved config
    a, b = rows(full), rows(interrupted)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5]     # step 3 redone once, not repeated
    for key in ("loss", "reverse_kl", "grad_norm", "response_tokens"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    assert rows(full, "eval") == rows(interrupted, "eval")


def test_accelerate_launch_two_cpu_processes(pair, tmp_path):
    """Two processes on gloo. (``accelerate launch --cpu --num_processes 2`` starts only one process
    without MPI in accelerate 1.x; ``--multi_gpu`` uses torchrun, and ACCELERATE_USE_CPU keeps it on CPU.)"""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
           "-m", "vopd_analysis.distill.command", *small(pair, out, steps=2, eval_every=2, save_every=2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "ACCELERATE_USE_CPU": "true"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout
    train = rows(out)
    assert [r["step"] for r in train] == [1, 2]
    assert train[0]["response_tokens"] > 0 and rows(out, "eval")[-1]["step"] == 2
    assert steps_saved(out) == [2]
    assert {p.name for p in ckpt.checkpoint_dirs(out)[0].iterdir()} >= {"rng-rank0.pt", "rng-rank1.pt", "state.pt",
                                                                          ckpt.MANIFEST}
    assert ckpt.verify(ckpt.checkpoint_dirs(out)[0]) == []      # both processes' RNG files in the manifest
    assert not (out / LOCK).exists()                        # taken by the main process only, and released


# one non-default value per DistillConfig field: (options, expected field value)
EVERY_OPTION = {
    "student": (["--student", "s/dir"], "s/dir"),
    "teacher": (["--teacher", "t/dir"], "t/dir"),
    "preset": (["--preset", "small"], "small"),
    "prompts": (["--prompts", "p.jsonl"], "p.jsonl"),
    "eval_prompts": (["--eval-prompts", "e.jsonl"], "e.jsonl"),
    "num_eval": (["--num-eval", "7"], 7),
    "estimator": (["--estimator", "vopd_topk"], "vopd_topk"),
    "reduction": (["--reduction", "token_mean"], "token_mean"),
    "steps": (["--steps", "11"], 11),
    "prompts_per_step": (["--prompts-per-step", "6"], 6),
    "rollouts_per_prompt": (["--rollouts-per-prompt", "3"], 3),
    "max_new_tokens": (["--max-new-tokens", "9"], 9),
    "temperature": (["--temperature", "0.7"], 0.7),
    "top_p": (["--top-p", "0.9"], 0.9),
    "lr": (["--lr", "0.002"], 0.002),
    "weight_decay": (["--weight-decay", "0.1"], 0.1),
    "warmup_steps": (["--warmup-steps", "5"], 5),
    "grad_clip": (["--grad-clip", "0"], 0.0),
    "bf16": (["--no-bf16"], False),
    "seed": (["--seed", "3"], 3),
    "eval_every": (["--eval-every", "0"], 0),
    "save_every": (["--save-every", "4"], 4),
    "keep_checkpoints": (["--keep-checkpoints", "1"], 1),
    "out_dir": (["--out", "runs/x"], "runs/x"),
    "cache_dir": (["--cache-dir", "c"], "c"),
    "num_threads": (["--num-threads", "2"], 2),
    "engine": (["--engine", "trl"], "trl"),
    "probe_every": (["--probe-every", "5"], 5),
    "logits": (["--logits", "fused"], "fused"),
    "probe_estimators": (["--probe-estimators", "opd,vopd"], "opd,vopd"),
}


def test_every_config_field_has_one_option_and_round_trips():
    import dataclasses
    fields = {f.name: f for f in dataclasses.fields(DistillConfig)}
    assert set(EVERY_OPTION) == set(fields) - {"estimator_params", "trl_args"}
    parser = command.build_parser()
    dests = [a.dest for a in parser._actions]
    for name in fields:
        assert dests.count(name) == (0 if name in ("estimator_params", "trl_args") else 1), name
    assert set(dests) - set(fields) == {"help", "k", "param", "trl_arg", "resume"}
    for name, (argv, value) in EVERY_OPTION.items():   # each option alone: that field set, the rest defaults
        cfg = command.config_from_args(parser.parse_args(argv))
        assert getattr(cfg, name) == value != fields[name].default, name
        others = {f for f in fields if f != name and not (name == "prompts" and f == "preset")}
        assert all(getattr(cfg, f) == getattr(DistillConfig(), f) for f in others), name
    everything = [x for argv, _ in EVERY_OPTION.values() for x in argv] + ["--k", "4", "--param", "alpha=0.5",
                                                                            "--trl-arg", "use_vllm=true"]
    cfg = command.config_from_args(parser.parse_args(everything))
    assert {name: getattr(cfg, name) for name in EVERY_OPTION} == {n: v for n, (_, v) in EVERY_OPTION.items()}
    assert cfg.estimator_params == {"k": 4, "alpha": 0.5} and cfg.trl_args == {"use_vllm": True}


def test_prompts_without_preset_and_param_shorthand():
    parser = command.build_parser()
    assert command.config_from_args(parser.parse_args(["--prompts", "p.jsonl"])).preset is None
    assert command.config_from_args(parser.parse_args(["--param", "k=4"])).estimator_params == {"k": 4}
    with pytest.raises(InputError, match="contradicts"):
        command.config_from_args(parser.parse_args(["--param", "k=4", "--k", "8"]))
    with pytest.raises(SystemExit):
        parser.parse_args(["--reduction", "sum"])      # choices from the field's metadata
    with pytest.raises(InputError, match="must be an integer.*2.5"):
        check_config(DistillConfig(estimator="vopd_topk", estimator_params={"k": 2.5}), world=1)
    assert check_config(DistillConfig(estimator="seq_rloo", rollouts_per_prompt=3), 1) == {"group_size": 3}


@pytest.mark.parametrize("estimator", ["vopd", "opd_bstar"])
def test_fused_and_materialised_logits_train_alike(pair, tmp_path, estimator):
    """--logits fused (hidden states and lm_head tiles) and materialised give the same float32 run to
    rounding: the first step's loss and gradient norm to 1e-5, the exact reverse KL reported by both."""
    a, b = tmp_path / "materialised", tmp_path / "fused"
    for out, path in ((a, "materialised"), (b, "fused")):
        assert command.main(small(pair, out, estimator=estimator, logits=path, steps=2, eval_every=0)) == 0
    first_a, first_b = rows(a)[0], rows(b)[0]
    for key in ("loss", "grad_norm", "reverse_kl", "reverse_kl_sampled"):
        assert first_b[key] == pytest.approx(first_a[key], rel=1e-5, abs=1e-6), key
    assert first_a["response_tokens"] == first_b["response_tokens"]


def test_the_old_entry_point_names_the_new_one():
    """``python -m vopd_analysis.distill.loop`` (the entry point before distill/command.py) is one line, exit 2."""
    proc = subprocess.run([sys.executable, "-m", "vopd_analysis.distill.loop", "--preset", "tiny"],
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1
    assert "python -m vopd_analysis.distill.command" in proc.stderr
