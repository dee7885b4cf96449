"""Peak memory and step time of each reference strategy, side by side, on one model (KTO, 2 ranks).

    python benchmarks/reference_strategies.py [--hidden 512 --layers 6 --steps 30 --nprocs 2]

Each strategy trains the same random-init Llama (built from the demo config, widened) for the
same steps under ZeRO-3 in its own launch (peak RSS is per process). Reports seconds per step
(after a warm-up of 5 steps) and the peak host RSS / accelerator memory per rank, as a Markdown
table and JSON in benchmarks/results/. On a CPU-only machine all memory is host memory.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, build_model, launch_train, write_results  # noqa: E402

LORA = "{r: 8, lora_alpha: 16, target_modules: all-linear}"


def strategies(model: Path) -> dict[str, list[str]]:
    return {
        "sharded (ZeRO-3, policy weights)": [],
        "offloaded (ZeRO-3, params on CPU)": ["--ref_offload", "true"],
        "stage 0 (whole copy per rank)": ["--ref_zero_stage", "0"],
        "quantized (bitsandbytes 8-bit)": ["--ref_load_in_8bit", "true", "--ref_model", str(model)],
        "adapter-disabled (LoRA policy)": ["--peft_config", LORA],
        "precomputed (no reference held)": ["--precompute_ref_log_probs", "true"],
    }


def run(name, extra, model, out, steps, nprocs, cache) -> dict:
    args = ["--method", "kto", "--model_name_or_path", str(model), "--train_file",
            str(ROOT / "launch/demo/data/train.jsonl"), "--ds_config", str(ROOT / "ds_configs/zero3.json"),
            "--per_device_train_batch_size", "16", "--learning_rate", "1e-4", "--max_steps", str(steps),
            "--logging_steps", "1", "--max_length", "64", "--max_prompt_length", "32", "--save_steps", "100000",
            "--eval_on_start", "false"] + extra
    started = time.perf_counter()
    rows, error = launch_train(args, out=out, nprocs=nprocs, cache=cache, port="29777")
    if error:
        return {"strategy": name, "error": error}
    train = [r for r in rows if "loss" in r]
    tokens = sum(r["tokens_per_second"] for r in train[5:]) / max(len(train[5:]), 1)
    per_step = [1.0 / r["tokens_per_second"] for r in train[5:]]  # relative: tokens per step are equal across runs
    return {"strategy": name, "tokens_per_second": tokens, "peak_rss_gib": max(r["peak_rss_gib"] for r in train),
            "peak_memory_gib": max(r["peak_memory_gib"] for r in train), "wall_seconds": time.perf_counter() - started,
            "inverse_throughput": sum(per_step) / max(len(per_step), 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--nprocs", type=int, default=2)
    a = p.parse_args()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = tmp / "model"
        build_model(model, a.hidden, a.layers)
        for i, (name, extra) in enumerate(strategies(model).items()):
            results.append(run(name, extra, model, tmp / f"run{i}", a.steps, a.nprocs, tmp / "cache"))
            print(json.dumps(results[-1]), flush=True)
    base = next((r for r in results if "tokens_per_second" in r), None)
    lines = ["| strategy | tokens/s | step time vs sharded | peak RSS per rank (GiB) | peak accel. (GiB) |",
             "|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['strategy']} | failed | | | |")
            continue
        ratio = r["inverse_throughput"] / base["inverse_throughput"]
        lines.append(f"| {r['strategy']} | {r['tokens_per_second']:.0f} | {ratio:.2f}x | {r['peak_rss_gib']:.3f} | "
                     f"{r['peak_memory_gib']:.3f} |")
    write_results("reference_strategies", table="\n".join(lines), payload={"args": vars(a), "results": results},
                  title=f"KTO, {a.nprocs} ranks, ZeRO-3 policy, hidden {a.hidden}, {a.layers} layers, {a.steps} steps "
                        f"(`python benchmarks/reference_strategies.py`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
