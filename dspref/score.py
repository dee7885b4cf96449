"""``dspref score --model DIR --data FILE``: the score a reward model gives every row of a dataset.

The way users check a reward model before they use it: one JSON line per row with the chosen
and rejected scores, and a one-line summary (pairwise accuracy, mean margin). Reads the same
formats as training (explicit / implicit prompt, conversational, pre-tokenized) through the
same data path, and the same scoring module as the trainer.
"""

from __future__ import annotations

import argparse
import json
import os
import sys


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dspref score", description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="exported reward model folder (full model or LoRA adapter)")
    p.add_argument("--data", required=True, nargs="+", help="paired data file(s): JSON/JSONL/Parquet/CSV")
    p.add_argument("--out", default=None, help="JSONL written (default: <first data file stem>.scores.jsonl)")
    p.add_argument("--batch_size", type=int, default=16, help="pairs scored per forward (default: 16)")
    p.add_argument("--trust_remote_code", action="store_true", help="allow model code shipped with the model")
    return p


def load_reward_model(path: str, *, trust_remote_code: bool = False):
    """A one-label classifier from an export: a model folder, or a LoRA adapter over its base model."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if os.path.exists(os.path.join(path, "adapter_config.json")):
        from peft import PeftConfig, PeftModel

        base_path = PeftConfig.from_pretrained(path).base_model_name_or_path
        base = AutoModelForSequenceClassification.from_pretrained(
            base_path, num_labels=1, pad_token_id=tokenizer.pad_token_id, trust_remote_code=trust_remote_code)
        model = PeftModel.from_pretrained(base, path)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(path, trust_remote_code=trust_remote_code)
    return model.eval(), tokenizer


def score_file(model, tokenizer, data: list[str], out_path: str, batch_size: int) -> dict:
    """Score every pair of ``data``; write one JSON line per row to ``out_path``; return the summary."""
    import torch

    from dspref.data.formats import load_sources
    from dspref.data.reward import RewardCollator, build_reward_datasets
    from dspref.logps import RewardScorer

    dataset, _ = build_reward_datasets(load_sources(data), [], tokenizer, max_length=None, eval_split_ratio=0.0,
                                       seed=0)
    collate, scorer = RewardCollator(tokenizer.pad_token_id), RewardScorer(model)
    correct, margin_sum = 0, 0.0
    tmp = out_path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f, torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            batch = collate([dict(r) for r in rows])
            chosen, rejected = scorer(batch["input_ids"], batch["attention_mask"])["rewards"].chunk(2)
            for i, (c, r) in enumerate(zip(chosen.tolist(), rejected.tolist())):
                f.write(json.dumps({"row": start + i, "chosen_score": c, "rejected_score": r, "margin": c - r}) + "\n")
                correct += c > r
                margin_sum += c - r
    os.replace(tmp, out_path)
    n = len(dataset)
    return {"rows": n, "accuracy": correct / max(n, 1), "mean_margin": margin_sum / max(n, 1), "out": out_path}


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    from dspref.data.formats import DataError

    out = args.out or os.path.splitext(os.path.basename(args.data[0]))[0] + ".scores.jsonl"
    try:
        model, tokenizer = load_reward_model(args.model, trust_remote_code=args.trust_remote_code)
        summary = score_file(model, tokenizer, args.data, out, args.batch_size)
    except (DataError, OSError, ValueError) as e:
        print(f"dspref score: error: {str(e).strip().splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"dspref score: {summary['rows']} rows, accuracy {summary['accuracy']:.4f} (chosen > rejected), "
          f"mean margin {summary['mean_margin']:.4f}; scores written to {summary['out']}")
    return 0
