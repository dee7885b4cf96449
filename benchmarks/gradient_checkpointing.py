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
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from reference_strategies import build_model  # noqa: E402  (the same model builder)


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
            str(ROOT / "ds_configs/zero3.json"), "--output_dir", str(out), "--per_device_train_batch_size", "8",
            "--learning_rate", "1e-5", "--max_steps", str(steps), "--logging_steps", "1", "--max_length",
            str(length + 16), "--save_steps", "100000", "--eval_on_start", "false", "--gradient_checkpointing",
            "true" if gc else "false"]
    if method != "reward":
        args += ["--max_prompt_length", str(length)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), DSPREF_CACHE=str(out.parent / "cache"))
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs),
                           "--master_port", "29788", str(ROOT / "launch/train.py")] + args, env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0:
        return {"method": method, "gradient_checkpointing": gc, "error": proc.stderr[-600:]}
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
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
    table = "\n".join(lines)
    print(table)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "gradient_checkpointing.json").write_text(json.dumps({"args": vars(a), "results": results}, indent=2))
    (out / "gradient_checkpointing.md").write_text(
        f"ZeRO-3, {a.nprocs} ranks, hidden {a.hidden}, {a.layers} layers, ~{a.length}-token sequences, micro-batch 8, "
        f"{a.steps} steps (`python benchmarks/gradient_checkpointing.py --methods {a.methods}`)\n\n{table}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
