"""Peak memory and step time with and without gradient checkpointing, side by side, per method.

    python benchmarks/gradient_checkpointing.py [--methods cpo,reward,kto,bco --hidden 768 --layers 6
                                                 --length 256 --steps 8 --nprocs 2]

Synthetic sorting rows with long prompts (about --length tokens per sequence) so activations
matter; the same random-init Llama, ZeRO-3, micro-batch 8, one launch per (method, setting).
Reports peak host RSS and accelerator memory per rank and tokens/s (after 3 warm-up steps);
writes JSON and Markdown to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, build_model, launch_train, write_results  # noqa: E402


def write_rows(path: Path, n: int, length: int, seed: int = 0) -> None:
    """Prompts of ~length digits, chosen = sorted last 6 digits, rejected = a shuffled version."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            digits = [str(rng.randrange(10)) for _ in range(length - 12)]
            tail = digits[-6:]
            chosen = sorted(tail)
            rejected = chosen[:]
            while rejected == chosen:
                rng.shuffle(rejected)
            f.write(json.dumps({"prompt": "sort: " + " ".join(digits) + " =", "chosen": " " + " ".join(chosen),
                                "rejected": " " + " ".join(rejected)}) + "\n")


def run(method, gc, model, data, out, steps, nprocs, length) -> dict:
    args = ["--method", method, "--model_name_or_path", str(model), "--train_file", str(data), "--ds_config",
            str(ROOT / "ds_configs/zero3.json"), "--per_device_train_batch_size", "8", "--learning_rate", "1e-5",
            "--max_steps", str(steps), "--logging_steps", "1", "--max_length", str(length + 16), "--save_steps",
            "100000", "--eval_on_start", "false", "--gradient_checkpointing", "true" if gc else "false"]
    if method != "reward":
        args += ["--max_prompt_length", str(length)]
    rows, error = launch_train(args, out=out, nprocs=nprocs, cache=out.parent / "cache", port="29788")
    if error:
        return {"method": method, "gradient_checkpointing": gc, "error": error}
    train = [r for r in rows if "loss" in r][3:]
    return {"method": method, "gradient_checkpointing": gc,
            "tokens_per_second": sum(r["tokens_per_second"] for r in train) / max(len(train), 1),
            "peak_rss_gib": max(r["peak_rss_gib"] for r in rows if "peak_rss_gib" in r),
            "peak_memory_gib": max(r["peak_memory_gib"] for r in rows if "peak_memory_gib" in r)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--methods", default="cpo,reward,kto,bco")
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--length", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--nprocs", type=int, default=2)
    a = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_model(tmp / "model", a.hidden, a.layers)
        write_rows(tmp / "train.jsonl", 8 * a.nprocs * (a.steps + 1), a.length)
        for method in a.methods.split(","):
            for gc in (False, True):
                results.append(run(method, gc, tmp / "model", tmp / "train.jsonl", tmp / f"{method}-{gc}",
                                   a.steps, a.nprocs, a.length))
                print(json.dumps(results[-1]), flush=True)
    lines = ["| method | gradient checkpointing | tokens/s | peak RSS per rank (GiB) | peak accel. (GiB) |",
             "|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['method']} | {r['gradient_checkpointing']} | failed | | |")
        else:
            lines.append(f"| {r['method']} | {'on' if r['gradient_checkpointing'] else 'off'} | "
                         f"{r['tokens_per_second']:.0f} | {r['peak_rss_gib']:.3f} | {r['peak_memory_gib']:.3f} |")
    write_results("gradient_checkpointing", table="\n".join(lines), payload={"args": vars(a), "results": results},
                  title=f"ZeRO-3, {a.nprocs} ranks, hidden {a.hidden}, {a.layers} layers, ~{a.length}-token sequences, "
                        f"micro-batch 8, {a.steps} steps (`python benchmarks/gradient_checkpointing.py --methods "
                        f"{a.methods}`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
