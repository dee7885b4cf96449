"""TRL side of ``benchmarks/run.py``: TRL's trainer for one method, with per-step records.

    .venv-bench/bin/python benchmarks/child_trl.py --method cpo --model DIR --data ROWS.jsonl \
        --ds-config DS.json --records RECORDS.jsonl --output-dir DIR [--micro-batch 4 ...]

Runs in a TRL venv (benchmarks/setup_bench.sh), never imports dspref. TRL's defaults except what the
benchmark fixes for both sides (batch size, max_length, steps, gradient checkpointing, fp32 or bf16, lr,
no eval, no saving). Its data collator is wrapped to count each micro-batch's trained and no-grad
tokens (:func:`batch_lengths`); a TrainerCallback closes each step at ``on_step_end``.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from step_records import StepRecorder, engine_facts, row_lengths, write_facts  # noqa: E402


def batch_lengths(batch: dict) -> tuple[list[int], list[int]]:
    """(trained row lengths, no-grad row lengths) of one TRL micro-batch, whatever the trainer's layout.

    CPO: ``chosen_attention_mask`` / ``rejected_attention_mask`` (prompt + completion each). KTO 1.16
    and reward: ``attention_mask`` of the trained rows, KTO's KL rows in ``KL_attention_mask``. BCO
    1.13 (and KTO before 1.14): ``completion_attention_mask`` (prompt + completion) and ``KL_...``.
    """
    if "chosen_attention_mask" in batch:
        return row_lengths(batch["chosen_attention_mask"]) + row_lengths(batch["rejected_attention_mask"]), []
    for key in ("completion_attention_mask", "attention_mask"):
        if key in batch:
            kl = batch.get("KL_" + key)
            return row_lengths(batch[key]), row_lengths(kl) if kl is not None else []
    raise SystemExit(f"child_trl: no attention mask among this batch's keys {sorted(batch)}")


def trainer_classes(method: str):
    """(Config, Trainer, model kind) of ``method`` in the installed TRL (CPO moved to trl.experimental in 1.x)."""
    import trl

    if method == "cpo":
        from trl.experimental.cpo import CPOConfig, CPOTrainer

        return CPOConfig, CPOTrainer, "causal"
    if method == "kto":
        return trl.KTOConfig, trl.KTOTrainer, "causal"
    if method == "reward":
        return trl.RewardConfig, trl.RewardTrainer, "seq-cls"
    if method == "bco":
        try:
            from trl import BCOConfig, BCOTrainer
        except ImportError:
            from trl.experimental.bco import BCOConfig, BCOTrainer
        return BCOConfig, BCOTrainer, "causal"
    raise SystemExit(f"child_trl: unknown method {method!r}")


def main() -> int:
    p = argparse.ArgumentParser()
    for name in ("--method", "--model", "--tokenizer", "--data", "--records", "--output-dir"):
        p.add_argument(name, required=True)
    p.add_argument("--ds-config", default=None, help="DeepSpeed JSON; none: plain Trainer (no DeepSpeed)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="bf16 instead of fp32 (as dspref's --bf16 true)")
    a = p.parse_args()
    recorder = StepRecorder(a.records)

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer, TrainerCallback

    Config, Trainer, kind = trainer_classes(a.method)
    fixed = dict(output_dir=a.output_dir, per_device_train_batch_size=a.micro_batch, gradient_accumulation_steps=1,
                 max_steps=a.steps, max_length=a.max_length, gradient_checkpointing=True, bf16=a.bf16, fp16=False,
                 learning_rate=a.learning_rate, lr_scheduler_type="linear", warmup_steps=0, seed=a.seed,
                 logging_steps=1, save_strategy="no", eval_strategy="no", report_to=[], disable_tqdm=True,
                 dataloader_num_workers=0, use_cpu=not torch.cuda.is_available(), deepspeed=a.ds_config)
    if a.method == "kto":
        fixed["loss_type"] = "kto"
    config = Config(**fixed)
    tokenizer = AutoTokenizer.from_pretrained(a.tokenizer)
    if kind == "seq-cls":
        model = AutoModelForSequenceClassification.from_pretrained(a.model, num_labels=1)
    else:
        model = AutoModelForCausalLM.from_pretrained(a.model)
    data = load_dataset("json", data_files=a.data, split="train")
    extra = {}
    if a.method == "bco":  # BCO 1.13 refuses to copy the policy into a reference under ZeRO-3: load it, as it asks
        extra["ref_model"] = AutoModelForCausalLM.from_pretrained(a.model)
    trainer = Trainer(model=model, args=config, train_dataset=data, processing_class=tokenizer, **extra)

    collate = trainer.data_collator

    def counted(features):
        batch = collate(features)
        recorder.batch(*batch_lengths(batch))
        return batch

    class StepEnd(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if recorder.steps == 0:
                write_facts(a.records, engine_facts(trainer.model_wrapped))
            recorder.step_end()

    trainer.data_collator = counted
    trainer.add_callback(StepEnd())
    trainer.train()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # as dspref: skip interpreter teardown of the process group's C++ threads


if __name__ == "__main__":
    main()
