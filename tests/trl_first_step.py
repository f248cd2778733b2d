"""The first optimizer step's gradient of ``--engine trl``'s trainer, saved for tests/test_trl_engine.py.

    python tests/trl_first_step.py OUT.pt ESTIMATOR PER_DEVICE ACCUM [LOGITS]      # one process
    accelerate launch --multi_gpu --num_processes 2 tests/trl_first_step.py ...    # (ACCELERATE_USE_CPU=true)

The committed tiny pair in float64, 4 fixed prompts of equal length, greedy completions (so that
every launch samples the same tokens) that also end at the first digit 1 (so that completions,
and the two processes' token counts, differ in length), no clipping; the gradient is read before
the optimizer step (after DDP's all-reduce) on the main process.
"""

import sys

import torch


def main(out: str, estimator: str, per_device: int, accum: int, logits: str = "materialised") -> None:
    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DistillationConfig

    from vopd_analysis.distill import stopping, trl_engine
    from vopd_analysis.lm import loading, tasks, tiny

    student, teacher, _ = tiny.load_or_train_pair(verbose=False)
    pair = loading.load_pair(student, teacher, dtype=torch.float64)
    tokenizer = pair.tokenizer
    tokenizer.padding_side = "left"
    pair.student.generation_config.eos_token_id = [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("1")]
    dataset = Dataset.from_list([{"prompt": r["prompt"]} for r in tasks.train_prompts(4, seed=3)])
    args = DistillationConfig(output_dir=out + ".trainer", per_device_train_batch_size=per_device,
                              gradient_accumulation_steps=accum, max_steps=1, use_cpu=True, bf16=False,
                              max_grad_norm=0.0, learning_rate=1e-9, report_to="none", save_strategy="no",
                              gradient_checkpointing=False, max_completion_length=8, shuffle_dataset=False,
                              generation_kwargs={"do_sample": False}, disable_tqdm=True, logging_steps=1)

    class SaveGradient(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            if state.is_world_process_zero:
                torch.save({name.removeprefix("module."): p.grad.detach().clone()
                            for name, p in model.named_parameters() if p.grad is not None}, out)

    trainer = trl_engine.RegistryDistillationTrainer(
        model=pair.student, teacher_model=pair.teacher, args=args, train_dataset=dataset,
        processing_class=tokenizer, estimator=estimator, reduction="token_mean", logits=logits,
        callbacks=[SaveGradient()])
    trainer.train()
    if trainer.accelerator.is_main_process:
        log = trainer.state.log_history[0]
        lengths = torch.tensor([log["completions/min_length"], log["completions/max_length"]])
        torch.save({"gradient": torch.load(out), "completion_length_range": lengths}, out)
    trainer.accelerator.wait_for_everyone()
    stopping.end_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), *sys.argv[5:6])
