"""How much less work dspref's batches ask of the model than TRL's, on run.py's synthetic rows.

    python benchmarks/work_ratio.py [--max-length 512 --micro-batch 4 --steps 8]

For each method and data shape: the model FLOPs of one policy forward + backward with gradient
checkpointing (8·N per token: forward, recompute, backward ×2; attention 4 passes over the causal
half of T²) summed over the benchmark's micro-batches, TRL's way and dspref's way:

- TRL pads every row of a micro-batch to the longest one (CPO and reward put chosen and rejected
  rows in one padded batch; KTO and BCO pad their completion rows).
- dspref packs without padding and, for paired rows (CPO, reward), runs the shared prompt once:
  a pair costs prompt + chosen + rejected tokens, each completion attending to the prompt and itself.

The ratio is what dspref's speed-up would be if both sides ran the same operations equally fast
and nothing else took time: an estimate of the ceiling of run.py's tokens/s ratio, not a
measurement. Left out: the optimizer step and ZeRO-3's work (the same on both sides, so they pull
the measured ratio below this one), KTO's KL rows and TRL's in-step reference forwards (work
dspref also avoids, so KTO and BCO can go above it).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402


def step_flops(n_body: int, n_head: int, layers: int, width: int, tokens: int, squares: int) -> float:
    """Policy forward + backward under gradient checkpointing: 8·N per token, attention 4 causal passes."""
    return 8 * (n_body + n_head) * tokens + 4 * 2 * layers * width * squares


def batch_work(lengths: list[tuple[int, ...]], paired: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """((tokens, Σ attended T²) as TRL pads them, (tokens, Σ T²) as dspref packs them) for one micro-batch.

    ``lengths``: per row (prompt, chosen, rejected) when ``paired``, else (prompt, completion); token
    counts, completions with their EOS. T² counts the causal half twice over (as a full square):
    only ratios are used."""
    if paired:
        seqs = [p + c for p, c, _ in lengths] + [p + r for p, _, r in lengths]
        packed = sum(p + c + r for p, c, r in lengths)
        # each completion's queries see the prompt and themselves; the prompt's queries see the prompt
        packed_sq = sum(p * p + c * (2 * p + c) + r * (2 * p + r) for p, c, r in lengths)
    else:
        seqs = [p + c for p, c in lengths]
        packed, packed_sq = sum(seqs), sum(s * s for s in seqs)
    longest = max(seqs)
    return (len(seqs) * longest, len(seqs) * longest * longest), (packed, packed_sq)


def work_ratio(method: str, data_shape: str, *, shape: str = "tiny", max_length: int = 512, micro_batch: int = 4,
               steps: int = 8, seed: int = 0) -> float:
    """TRL's model FLOPs over dspref's, on the rows run.py trains on (the same seed and count)."""
    s = run.SHAPES[shape]
    kind = "seq-cls" if method == "reward" else "causal"
    n_all = run.flop_params(shape, kind)
    n_head = s["hidden_size"] * (s["vocab_size"] if kind == "causal" else 1)
    width = s["hidden_size"]
    rows = run.synthetic_rows(method, micro_batch * steps, data_shape, s["vocab_size"] - len(run.SPECIALS), seed,
                              max_length)
    paired = method in run.PAIRED
    trl = dspref = 0.0
    for start in range(0, len(rows), micro_batch):
        lengths = []
        for r in rows[start:start + micro_batch]:
            completions = ("chosen", "rejected") if paired else ("completion",)
            lengths.append((len(r["prompt"].split()), *(len(r[c].split()) + 1 for c in completions)))
        (t_tok, t_sq), (d_tok, d_sq) = batch_work(lengths, paired)
        trl += step_flops(n_all - n_head, n_head, s["num_hidden_layers"], width, t_tok, t_sq)
        dspref += step_flops(n_all - n_head, n_head, s["num_hidden_layers"], width, d_tok, d_sq)
    return trl / dspref


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-shape", default="tiny", choices=sorted(run.SHAPES))
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=8, help="micro-batches (run.py: --warmup + --steps)")
    a = p.parse_args(argv)
    print("| method | data | TRL / dspref model FLOPs (policy forward + backward) |\n|---|---|---|")
    for method in run.METHODS:
        for data_shape in run.DATA_SHAPES:
            r = work_ratio(method, data_shape, shape=a.model_shape, max_length=a.max_length,
                           micro_batch=a.micro_batch, steps=a.steps)
            print(f"| {method} | {data_shape} | {r:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
