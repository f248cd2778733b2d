"""--engine trl: the registry's estimators inside TRL 1.16's DistillationTrainer (vopd_analysis/distill/trl_engine.py)."""

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("trl")

from vopd_analysis import estimators as est  # noqa: E402
from vopd_analysis.distill import checkpoint as ckpt  # noqa: E402
from vopd_analysis.distill import command, trl_engine, trl_trainer  # noqa: E402  # noqa: E402
from vopd_analysis.distill.config import check_values  # noqa: E402
from vopd_analysis.errors import InputError  # noqa: E402
from vopd_analysis.lm import fused_score as fs  # noqa: E402
from vopd_analysis.lm import loading, tasks, tiny  # noqa: E402
from vopd_analysis.lm import rollouts as ro
from vopd_analysis.lm import scoring as sc
from vopd_analysis.lm.smoke import SMOKE_CHARS  # noqa: E402
from vopd_analysis.lock import LOCK  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PARITY = ("opd", "vopd", "vopd_topk", "full_kl", "opd_bstar")


@pytest.fixture(scope="module")
def pair64(one_thread):
    student, teacher, _ = tiny.load_or_train_pair(verbose=False)
    pair = loading.load_pair(student, teacher, dtype=torch.float64)
    pair.tokenizer.padding_side = "left"
    return pair


def trl_args(tmp_path, **kw):
    from trl import DistillationConfig
    settings = dict(output_dir=str(tmp_path / "trainer"), per_device_train_batch_size=4, max_steps=1, use_cpu=True,
                    bf16=False, report_to="none", save_strategy="no", gradient_checkpointing=False,
                    max_completion_length=8, disable_tqdm=True)
    return DistillationConfig(**{**settings, **kw})


def dataset(n=4):
    from datasets import Dataset
    return Dataset.from_list([{"prompt": r["prompt"]} for r in tasks.train_prompts(n, seed=3)])


@pytest.fixture(scope="module")
def rollouts(pair64):
    """Sampled rollouts, cut to lengths 8, 3, 8, 5, 1, 6 (right-padded responses, so masked positions)."""
    prompts = [r["prompt"] for r in tasks.train_prompts(3, seed=11)]
    out = ro.generate_rollouts(pair64.student, pair64.tokenizer, prompts, 2, 8, seed=5, vocab_size=16)
    W = out.prompt_width
    for row, length in enumerate((8, 3, 8, 5, 1, 6)):
        out.response_mask[row, W + length:] = 0
        out.attention_mask[row, W + length:] = 0
        out.input_ids[row, W + length:] = pair64.tokenizer.pad_token_id
    assert out.response_mask.sum(1).tolist() == [8, 3, 8, 5, 1, 6]
    return out


def trl_inputs(rollouts) -> dict:
    """The micro-batch TRL would hand to compute_loss for these rollouts."""
    W = rollouts.prompt_width
    return {"prompt_ids": rollouts.input_ids[:, :W], "prompt_mask": rollouts.attention_mask[:, :W],
            "completion_ids": rollouts.input_ids[:, W:], "completion_mask": rollouts.response_mask[:, W:],
            "num_items_in_batch": rollouts.response_mask.sum()}


def gradient(model, loss) -> dict:
    model.zero_grad(set_to_none=True)
    loss.backward()
    out = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


@pytest.mark.parametrize("method", sorted(trl_trainer.OVERRIDDEN))
def test_trl_private_methods_keep_the_signatures_we_override(method):
    """RegistryDistillationTrainer overrides private methods of trl.DistillationTrainer; a TRL release that
    renames one or changes its parameters fails here, naming the method, instead of silently at training."""
    import inspect

    from trl import DistillationTrainer
    expected = trl_trainer.OVERRIDDEN[method]
    theirs = getattr(DistillationTrainer, method, None)
    assert theirs is not None, (f"trl.DistillationTrainer.{method} no longer exists; RegistryDistillationTrainer "
                                f"(vopd_analysis/distill/trl_trainer.py) overrides it")
    got = tuple(inspect.signature(theirs).parameters)
    assert got == expected, (f"trl.DistillationTrainer.{method} now takes {got}, but RegistryDistillationTrainer's "
                             f"override (vopd_analysis/distill/trl_trainer.py) expects {expected}")
    ours = tuple(inspect.signature(getattr(trl_trainer.RegistryDistillationTrainer, method)).parameters)
    assert ours == expected, f"RegistryDistillationTrainer.{method} takes {ours}, OVERRIDDEN says {expected}"


@pytest.mark.parametrize("logits", ["materialised", "fused"])
@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean"])
@pytest.mark.parametrize("name", PARITY)
def test_trl_gradient_equals_surrogate_loss(pair64, rollouts, tmp_path, name, reduction, logits):
    """float64: TRL's compute_loss on the rollouts' micro-batch has surrogate_loss's gradient (same
    normalisation: N = the batch's unmasked tokens, or its sequences), on the materialised and on
    the fused path."""
    assert fs.has_fused_form(name)
    trainer = trl_engine.RegistryDistillationTrainer(
        model=pair64.student, teacher_model=pair64.teacher, args=trl_args(tmp_path), train_dataset=dataset(),
        processing_class=pair64.tokenizer, estimator=name, reduction=reduction, logits=logits)
    trainer.model.train()
    got = gradient(trainer.model, trainer.compute_loss(trainer.model, trl_inputs(rollouts)))
    batch = sc.score(pair64.student, pair64.teacher, rollouts, [name], vocab_size=16)
    want = gradient(pair64.student, est.surrogate_loss(name, batch, reduction=reduction))
    assert max_difference(got, want) < 1e-10


def test_fused_needs_a_fused_form(pair64, tmp_path):
    with pytest.raises(InputError, match="estimator 'k3' has no fused form"):
        trl_engine.RegistryDistillationTrainer(
            model=pair64.student, teacher_model=pair64.teacher, args=trl_args(tmp_path), train_dataset=dataset(),
            processing_class=pair64.tokenizer, estimator="k3", logits="fused")


def test_full_kl_equals_trl_own_reverse_kl(pair64, rollouts, tmp_path):
    """The registry's full_kl (token mean) is TRL's own loss at beta = 1 (reverse KL, temperature 1),
    value and gradient: an independent implementation of the same objective. TRL's chunked kernel
    accumulates in float32 even for float64 models, so the tolerance is float32's (1e-6 relative)."""
    from trl import DistillationTrainer
    inputs = trl_inputs(rollouts)
    own = DistillationTrainer(model=pair64.student, teacher_model=pair64.teacher, args=trl_args(tmp_path, beta=1.0),
                              train_dataset=dataset(), processing_class=pair64.tokenizer)
    own.model.train()
    loss_own = own.compute_loss(own.model, inputs)
    want = gradient(own.model, loss_own)
    ours = trl_engine.RegistryDistillationTrainer(
        model=pair64.student, teacher_model=pair64.teacher, args=trl_args(tmp_path), train_dataset=dataset(),
        processing_class=pair64.tokenizer, estimator="full_kl", reduction="token_mean")
    ours.model.train()
    loss_ours = ours.compute_loss(ours.model, inputs)
    got = gradient(ours.model, loss_ours)
    assert loss_own.dtype == torch.float32
    assert abs(float(loss_ours) - float(loss_own)) < 1e-6 * abs(float(loss_own))
    scale = max(float(g.abs().max()) for g in want.values())
    assert max_difference(got, {k: v.double() for k, v in want.items()}) < 1e-6 * scale


def first_step(out: Path, estimator: str, per_device: int, accum: int, processes: int = 1,
               logits: str = "materialised") -> dict:
    script = str(REPO / "tests" / "trl_first_step.py")
    args = [str(out), estimator, str(per_device), str(accum), logits]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    if processes == 1:
        cmd = [sys.executable, script, *args]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "29533", script, *args]
        env["ACCELERATE_USE_CPU"] = "true"
    proc = subprocess.run(cmd, cwd=out.parent, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return torch.load(out)


def test_two_processes_and_accumulation_give_the_one_process_gradient(tmp_path):
    """The global batch of 4 greedy completions of lengths 1..7: one process (batch 4), one process
    with 2 accumulation steps of 2, and 2 gloo processes of 2 (materialised, and fused under DDP)
    give the same first-step gradient (float64): TRL's num_items_in_batch normalises by the global
    token count."""
    one = first_step(tmp_path / "one.pt", "vopd", 4, 1)
    accumulated = first_step(tmp_path / "accum.pt", "vopd", 2, 2)
    two = first_step(tmp_path / "two.pt", "vopd", 2, 1, processes=2)
    two_fused = first_step(tmp_path / "two_fused.pt", "vopd", 2, 1, processes=2, logits="fused")
    assert max_difference(one["gradient"], two_fused["gradient"]) < 1e-10
    low, high = one["completion_length_range"].tolist()
    assert low < high                                  # unequal token counts: a mean of means would differ
    assert max_difference(one["gradient"], accumulated["gradient"]) < 1e-10
    assert max_difference(one["gradient"], two["gradient"]) < 1e-10
    assert max(float(g.abs().max()) for g in one["gradient"].values()) > 1e-3


# ----------------------------------------------------------------------------- vopd distill --engine trl

def options(out, *extra, steps=2):
    return ["--engine", "trl", "--preset", "tiny", "--steps", str(steps), "--prompts-per-step", "4",
            "--rollouts-per-prompt", "2", "--eval-every", "2", "--num-eval", "8", "--save-every", "1",
            "--out", str(out), *extra]


def rows(out, kind="train"):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == kind]


def test_cli_writes_the_builtin_schema_and_resumes(one_thread, tmp_path):
    builtin = tmp_path / "builtin"
    command.main(["--preset", "tiny", "--steps", "1", "--prompts-per-step", "4", "--rollouts-per-prompt", "2",
               "--eval-every", "1", "--num-eval", "8", "--out", str(builtin)])
    out = tmp_path / "trl"
    assert command.main(options(out, "--estimator", "opd_bstar")) == 0
    train = rows(out)
    assert [r["step"] for r in train] == [1, 2]
    assert set(train[0]) == set(rows(builtin)[0])
    assert set(rows(out, "eval")[0]) == set(rows(builtin, "eval")[0])
    assert [r["step"] for r in rows(out, "eval")] == [0, 2]
    assert train[0]["response_tokens"] > 0 and train[0]["reverse_kl"] == train[0]["reverse_kl"]   # opd_bstar keeps full logits
    summary = json.loads((out / "summary.json").read_text())
    assert set(json.loads((builtin / "summary.json").read_text())) <= set(summary)
    assert summary["engine"].startswith("trl 1.16") and summary["steps_done"] == 2
    assert summary["label"] == "trl:opd_bstar"                # vopd compare tells the engines apart
    from vopd_analysis.distill import compare
    assert set(compare.load_runs([builtin, out])["label"]) == {"vopd", "trl:opd_bstar"}
    assert (out / "final" / "config.json").is_file() and (out / "metrics.csv").is_file()
    # resume from the step-2 Trainer checkpoint to step 3: rows 1..3, the first two unchanged
    assert command.main(options(out, "--estimator", "opd_bstar", "--resume", steps=3)) == 0
    again = rows(out)
    assert [r["step"] for r in again] == [1, 2, 3] and again[:2] == train
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 2
    assert command.main(options(out, "--estimator", "opd_bstar", "--resume", steps=3)) == 0      # finished: nothing to do
    assert len(rows(out)) == 3


def test_trl_args_reach_the_trainer(one_thread, tmp_path):
    cfg = command.config_from_args(command.build_parser().parse_args(options(
        tmp_path / "x", "--trl-arg", "gradient_accumulation_steps=2", "--trl-arg", 'report_to="none"')))
    assert cfg.trl_args == {"gradient_accumulation_steps": 2, "report_to": "none"}
    check_values(cfg)
    cfg.max_new_tokens = 8
    args = trl_engine.trl_config(cfg, world=1)
    assert args.gradient_accumulation_steps == 2 and args.per_device_train_batch_size == 4   # 4 x 2 rows / 2
    assert args.max_steps == 2 and args.learning_rate == cfg.lr and args.adam_beta2 == 0.95


# ----------------------------------------------------------------------------- bad input, before any model

@pytest.fixture
def no_model_loads(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the input was checked")
    monkeypatch.setattr(loading, "load_pair", refuse)
    monkeypatch.setattr(loading, "load_model", refuse)


def refused(argv, match):
    with pytest.raises(InputError, match=match) as info:
        command.main(argv)
    assert "\n" not in str(info.value)
    return info


def test_trl_version_outside_the_tested_range(no_model_loads, tmp_path, monkeypatch):
    from importlib import metadata
    real = metadata.version
    monkeypatch.setattr(metadata, "version", lambda name: "1.17.2" if name == "trl" else real(name))
    refused(options(tmp_path / "r"), r"tested with trl>=1\.16\.0,<1\.17\.0, but trl 1\.17\.2 is installed")
    assert not (tmp_path / "r").exists()


def test_vocabulary_mismatch(no_model_loads, tmp_path):
    student, _ = tiny.save_random_pair(tmp_path / "a", chars=SMOKE_CHARS)
    _, teacher = tiny.save_random_pair(tmp_path / "b", chars=SMOKE_CHARS[::-1])
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": "ab"}) + "\n" for _ in range(20)))
    refused(["--engine", "trl", "--student", student, "--teacher", teacher, "--prompts", str(prompts),
             "--max-new-tokens", "4", "--out", str(tmp_path / "r")], "tokenizers differ")
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("estimator, match", [
    ("vopd", "needs the teacher's full logits, which a teacher server"),
    ("vopd_topk", "needs the teacher's log-probs on the student's top-k"),
    ("opd", "teacher servers are not supported yet"),
])
def test_signal_a_teacher_server_cannot_give(no_model_loads, tmp_path, estimator, match):
    refused(options(tmp_path / "r", "--estimator", estimator, "--teacher", "http://localhost:8000"), match)


@pytest.mark.parametrize("argv, match", [
    (["--estimator", "seq_rloo"], "needs K rollouts of each prompt together"),
    (["--trl-arg", "learning_rate=0.1"], "--trl-arg learning_rate: set it with --lr"),
    (["--trl-arg", "gradient_acumulation_steps=2"], "not a field of trl.DistillationConfig"),
    (["--trl-arg", "gradient_accumulation_steps=3"], "must be divisible by processes x gradient_accumulation_steps"),
    (["--logits", "fused", "--estimator", "k3"], "--logits fused: estimator 'k3' has no fused form"),
    (["--trl-arg", "gradient_accumulation_steps=0"], "--trl-arg gradient_accumulation_steps must be at least 1, got 0"),
    (["--trl-arg", "gradient_accumulation_steps=abc"],
     "--trl-arg gradient_accumulation_steps=\"abc\": trl.DistillationConfig's gradient_accumulation_steps must be an "
     "integer"),
    (["--trl-arg", "gradient_accumulation_steps=2.5"], "gradient_accumulation_steps=2.5: .* must be an integer"),
    (["--trl-arg", "lr_scheduler_type=bogus"],
     "--trl-arg lr_scheduler_type=\"bogus\": trl.DistillationConfig refuses it: ValueError: bogus is not a valid "
     "SchedulerType"),
    pytest.param(["--trl-arg", "report_to=wandb"], r"--trl-arg report_to: wandb is not installed \(pip install wandb\)",
                 marks=pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")),
])
def test_other_refusals(no_model_loads, tmp_path, argv, match):
    refused(options(tmp_path / "r", *argv), match)


def test_trl_arg_needs_the_trl_engine(tmp_path):
    refused(["--preset", "tiny", "--trl-arg", "report_to=none", "--out", str(tmp_path / "r")],
            "--trl-arg needs --engine trl")


def test_variance_probe_callback_logs_with_the_step(one_thread, tmp_path):
    """--probe-every 1: every train row carries each probed estimator's statistics, computed on that
    step's rollouts; the probe leaves the training gradient as it was (the loss curve matches a run
    without it)."""
    plain, probed = tmp_path / "plain", tmp_path / "probed"
    assert command.main(options(plain, "--eval-every", "0")) == 0
    assert command.main(options(probed, "--eval-every", "0", "--probe-every", "1",
                             "--probe-estimators", "opd,vopd")) == 0
    a, b = rows(plain), rows(probed)
    for key in ("loss", "grad_norm", "reverse_kl_sampled"):
        assert [r[key] for r in a] == [r[key] for r in b], key
    for row in b:
        for name in ("opd", "vopd"):
            assert row[f"probe/{name}/trace_cov"] > 0 and -1 <= row[f"probe/{name}/cosine"] <= 1
        assert "probe/opd_bstar/trace_cov" not in row


def test_variance_probe_statistics_match_the_probe_module(pair64, rollouts, tmp_path):
    """The callback's trace and SNR are GradientMoments' over rollout_gradients of the same rollouts."""
    from vopd_analysis.lm import variance
    trainer = trl_engine.RegistryDistillationTrainer(
        model=pair64.student, teacher_model=pair64.teacher, args=trl_args(tmp_path), train_dataset=dataset(),
        processing_class=pair64.tokenizer, estimator="vopd")
    probe = trl_engine.VarianceProbeCallback(["opd", "vopd"], every=1, trainer=trainer)
    trainer.last_rollouts = rollouts
    named = variance.trainable_parameters(pair64.student)
    before = [torch.full_like(p, 0.5) for _, p in named]
    for (_, p), g in zip(named, before):
        p.grad = g.clone()
    probe.on_pre_optimizer_step(trainer.args, trainer.state, None)
    assert all(torch.equal(p.grad, g) for (_, p), g in zip(named, before))     # training gradient restored
    params = {n: est.get(n).params() for n in ("opd", "vopd", "full_kl")}
    moments = {n: variance.GradientMoments(sum(p.numel() for _, p in named), num_projections=0) for n in params}
    for name, g in variance.rollout_gradients(pair64.student, pair64.teacher, rollouts, params, named, vocab_size=16):
        moments[name].update(g)
    logged = trainer._metrics["train"]
    for name in ("opd", "vopd"):
        assert logged[f"probe/{name}/trace_cov"] == [pytest.approx(moments[name].trace(), rel=1e-12)]
        assert logged[f"probe/{name}/snr"] == [pytest.approx(moments[name].snr(), rel=1e-12)]
    assert logged["probe/vopd/trace_cov"][0] < logged["probe/opd/trace_cov"][0]
    for _, p in named:
        p.grad = None


def test_shipped_accelerate_configs_parse():
    """The README's accelerate configs are valid accelerate ClusterConfigs (they are not run here: no GPU)."""
    from accelerate.commands.config.config_args import ClusterConfig
    folder = REPO / "vopd_analysis" / "distill" / "accelerate_configs"
    configs = {p.stem: ClusterConfig.from_yaml_file(str(p)) for p in folder.glob("*.yaml")}
    assert set(configs) == {"one_gpu", "eight_gpus_ddp", "eight_gpus_zero2"}
    assert [configs[n].num_processes for n in ("one_gpu", "eight_gpus_ddp", "eight_gpus_zero2")] == [1, 8, 8]
    assert configs["eight_gpus_zero2"].deepspeed_config["zero_stage"] == 2
    assert all(c.mixed_precision == "bf16" for c in configs.values())


def test_gradient_checkpointing_gives_the_same_gradient(pair64, rollouts, tmp_path):
    """With TRL's gradient checkpointing on (as Trainer.train turns it on), the loss's gradient is unchanged."""
    trainer = trl_engine.RegistryDistillationTrainer(
        model=pair64.student, teacher_model=pair64.teacher, args=trl_args(tmp_path), train_dataset=dataset(),
        processing_class=pair64.tokenizer, estimator="opd_bstar")
    trainer.model.train()
    plain = gradient(trainer.model, trainer.compute_loss(trainer.model, trl_inputs(rollouts)))
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    try:
        assert trainer.model.is_gradient_checkpointing
        checkpointed = gradient(trainer.model, trainer.compute_loss(trainer.model, trl_inputs(rollouts)))
    finally:
        trainer.model.gradient_checkpointing_disable()
    assert max_difference(plain, checkpointed) < 1e-10


def test_ctrl_c_checkpoints_the_step_and_exits_130(one_thread, tmp_path, monkeypatch, capsys):
    """A Ctrl-C during step 2 (StopOnSignal.requested from then on): step 2 finishes, its Trainer
    checkpoint is written, the run exits with 130 and one line saying how to resume; --resume ends it."""
    out = tmp_path / "run"
    real = trl_trainer.StopOnRequest

    class CtrlCAtStep2(real):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                self.stop.requested_at = 0.0
            return super().on_step_end(args, state, control, **kw)

    monkeypatch.setattr(trl_trainer, "StopOnRequest", CtrlCAtStep2)
    argv = options(out, "--save-every", "0", "--eval-every", "0", steps=4)
    assert command.main(argv) == 130
    assert "interrupted after step 2 of 4" in capsys.readouterr().out
    assert [r["step"] for r in rows(out)] == [1, 2] and not (out / "summary.json").exists()
    assert (out / "checkpoints" / "checkpoint-2" / trl_trainer.ROWS_FILE).is_file()
    assert not (out / LOCK).exists()
    monkeypatch.setattr(trl_trainer, "StopOnRequest", real)
    assert command.main([*argv, "--resume"]) == 0
    assert [r["step"] for r in rows(out)] == [1, 2, 3, 4] and (out / "summary.json").is_file()


def test_non_finite_loss_skips_the_update(one_thread, tmp_path, monkeypatch):
    """A NaN loss at step 2: that update is dropped (the student after step 2 is the one after step 1),
    the row says skipped, and training goes on."""
    from safetensors.torch import load_file
    cls = trl_trainer.RegistryDistillationTrainer
    real, calls = cls._compute_loss, []

    def nan_on_second_step(self, *args):
        loss, entropy, n = real(self, *args)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 2 else loss), entropy, n

    monkeypatch.setattr(cls, "_compute_loss", nan_on_second_step)
    out = tmp_path / "run"
    with pytest.warns(RuntimeWarning, match="step 2: non-finite loss or gradient; the update was skipped"):
        assert command.main(options(out, "--eval-every", "0", "--keep-checkpoints", "0", steps=3)) == 0
    assert [r["skipped"] for r in rows(out)] == [False, True, False]
    assert json.loads((out / "summary.json").read_text())["skipped_steps"] == 1

    def weights(step):
        return load_file(out / "checkpoints" / f"checkpoint-{step}" / "model.safetensors")

    one, two, three = weights(1), weights(2), weights(3)
    assert all(torch.equal(one[k], two[k]) for k in one) and not all(torch.equal(two[k], three[k]) for k in two)


def test_accumulation_rows_match_one_micro_batch(one_thread, tmp_path):
    """--trl-arg gradient_accumulation_steps=2 halves the micro-batch; the step rows (loss, tokens,
    gradient norm, sampled reverse KL) are those of the run without accumulation, to float32 round-off."""
    plain, accumulated = tmp_path / "plain", tmp_path / "accum"
    assert command.main(options(plain, "--eval-every", "0")) == 0
    assert command.main(options(accumulated, "--eval-every", "0", "--trl-arg", "gradient_accumulation_steps=2")) == 0
    first_plain, first_accum = rows(plain)[0], rows(accumulated)[0]
    assert first_plain["response_tokens"] == first_accum["response_tokens"] == 64
    for key in ("loss", "grad_norm", "reverse_kl", "reverse_kl_sampled"):
        assert first_accum[key] == pytest.approx(first_plain[key], rel=1e-5), key


def test_sigterm_stops_like_ctrl_c_with_status_143(one_thread, tmp_path, monkeypatch, capsys):
    """A SIGTERM during step 2 (a scheduler's stop): step 2 finishes and is checkpointed, status 143."""
    out = tmp_path / "run"
    real = trl_trainer.StopOnRequest

    class SigtermAtStep2(real):
        def on_step_end(self, args, state, control, **kw):
            if state.global_step == 2:
                os.kill(os.getpid(), signal.SIGTERM)      # caught by stopping.StopOnSignal around trainer.train
            return super().on_step_end(args, state, control, **kw)

    monkeypatch.setattr(trl_trainer, "StopOnRequest", SigtermAtStep2)
    assert command.main(options(out, "--save-every", "0", "--eval-every", "0", steps=4)) == 143
    printed = capsys.readouterr()
    assert "interrupted by SIGTERM after step 2 of 4: checkpoint" in printed.out and "SIGTERM: finishing" in printed.err
    assert ckpt.verify(out / "checkpoints" / "checkpoint-2") == []         # the Trainer checkpoint has a manifest
    assert not (out / LOCK).exists()


def test_damaged_trainer_checkpoint_falls_back_to_the_newest_intact_one(one_thread, tmp_path, capsys):
    out = tmp_path / "run"
    assert command.main(options(out, "--eval-every", "0", steps=2)) == 0
    first = rows(out)
    (out / "summary.json").unlink()                                        # as if stopped after its last step
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    with pytest.raises(InputError, match=r"--steps 1 is below the 2 steps the run in .* has done \(checkpoint "
                                         r"checkpoint-2\)"):
        command.main(options(out, "--eval-every", "0", "--resume", steps=1))
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before
    weights = out / "checkpoints" / "checkpoint-2" / "model.safetensors"
    size = weights.stat().st_size
    weights.write_bytes(weights.read_bytes()[:size // 2])
    capsys.readouterr()
    assert command.main(options(out, "--eval-every", "0", "--resume", steps=3)) == 0
    err = capsys.readouterr().err
    assert (f"warning: checkpoint {out / 'checkpoints' / 'checkpoint-2'} is damaged (model.safetensors: "
            f"{size // 2:,} bytes, expected {size:,}); set aside as checkpoint-2.corrupt, resuming from "
            "checkpoint-1") in err
    assert [r["step"] for r in rows(out)] == [1, 2, 3] and rows(out)[0] == first[0]
    assert json.loads((out / "summary.json").read_text())["resumed_from_step"] == 1


def test_trainer_checkpoint_without_manifest(tmp_path):
    """Written before manifests: loaded unverified if its rows are there, else incomplete; garbage rows are one line."""
    procs = type("Procs", (), {"is_main_process": True, "num_processes": 1})()
    root = tmp_path / "checkpoints"
    for step in (1, 2):
        (root / f"checkpoint-{step}").mkdir(parents=True)
    (root / "checkpoint-1" / trl_trainer.ROWS_FILE).write_text('[{"kind": "train", "step": 1}]')
    latest, step, got = trl_engine.resume_point(tmp_path, procs)      # checkpoint-2 has no rows: incomplete
    assert (Path(latest).name, step, got) == ("checkpoint-1", 1, [{"kind": "train", "step": 1}])
    assert (root / "checkpoint-2.corrupt").is_dir()
    (root / "checkpoint-1" / trl_trainer.ROWS_FILE).write_text("garbage")
    with pytest.raises(InputError, match=r"the checkpoint's metrics rows .*checkpoint-1/vopd_rows\.json is not JSON"):
        trl_engine.resume_point(tmp_path, procs)
