"""Runs under a launcher: trains with dspref, then checks export and chunked scoring on every rank.

Usage: deepspeed --num_gpus N tests/dist/train_and_check.py RESULT_JSON [dspref train options ...]
Writes RESULT_JSON on rank 0 with the measured differences; the pytest side asserts on them.
"""

import json
import sys

import torch


def naive_logps(model, input_ids, attention_mask, completion_mask):
    """Full [N, T, V] float32 logits, then the completion tokens' log-probs summed per sequence."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits.float()
    token = torch.log_softmax(logits[:, :-1], dim=-1).gather(2, input_ids[:, 1:, None]).squeeze(2)
    return (token * completion_mask[:, 1:]).sum(dim=1)


def rank_batch(rank, vocab):
    """A batch whose completion length differs by rank, so ranks need different numbers of chunks."""
    g = torch.Generator().manual_seed(100 + rank)
    n, t = 3, 20
    ids = torch.randint(4, vocab, (n, t), generator=g)
    attn = torch.ones_like(ids)
    comp = torch.zeros_like(ids)
    comp[:, 6:6 + 4 + 7 * rank] = 1  # rank 0: 4 completion tokens per row, rank 1: 11
    attn[1, 15:] = 0
    comp[1, 15:] = 0
    return ids, attn, comp


def reload_exported(cfg, reward):
    """The exported model as a user loads it: a full model folder, or base + LoRA adapter."""
    import os

    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    auto = AutoModelForSequenceClassification if reward else AutoModelForCausalLM
    if os.path.exists(os.path.join(cfg.output_dir, "adapter_config.json")):
        from peft import PeftModel

        pad = AutoTokenizer.from_pretrained(cfg.output_dir).pad_token_id
        base = auto.from_pretrained(cfg.model_name_or_path, **({"num_labels": 1, "pad_token_id": pad} if reward else {}))
        return PeftModel.from_pretrained(base, cfg.output_dir).float().eval()
    return auto.from_pretrained(cfg.output_dir).float().eval()


def main():
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]  # the deepspeed launcher puts it first
    out_path, argv = argv[0], argv[1:]
    from dspref.config import parse_args
    from dspref.run import train

    cfg, explicit = parse_args(argv)
    result = train(cfg, explicit)
    engine = result.engine
    rank = torch.distributed.get_rank()
    model = engine.ds.module.model
    vocab = model.config.vocab_size
    report = {"step": result.step, "stopped_early": result.stopped_early}

    reward = cfg.method == "reward"
    with torch.no_grad():
        engine.train(False)
        if not reward:
            ids, attn, comp = rank_batch(rank, vocab)
            chunked = engine(input_ids=ids, attention_mask=attn, completion_mask=comp)["logps"]
            naive = naive_logps(model, ids, attn, comp)
            diff = torch.tensor([(chunked - naive).abs().max().item()])
            torch.distributed.all_reduce(diff, op=torch.distributed.ReduceOp.MAX)
            report["chunked_vs_naive_max_abs"] = diff.item()

        if not result.stopped_early:
            probe = torch.arange(4, 4 + 24).remainder(vocab).reshape(2, 12)
            if reward:
                trained = engine(input_ids=probe, attention_mask=torch.ones_like(probe))["rewards"]
            else:
                trained = model(input_ids=probe, use_cache=False).logits.float()
            if rank == 0:
                reloaded = reload_exported(cfg, reward)(input_ids=probe, use_cache=False).logits.float()
                reloaded = reloaded.squeeze(-1) if reward else reloaded
                report["export_max_abs_diff"] = (trained - reloaded).abs().max().item()
                report["export_logits_shape"] = list(reloaded.shape)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(report, f)


if __name__ == "__main__":
    main()
