"""Shared pieces of the benchmarks: the model they train, launching a run, writing results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def build_model(path: Path, hidden: int, layers: int) -> None:
    """The demo's Llama widened to ``hidden`` x ``layers`` (random, seeded) with the demo tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(ROOT / "launch/demo/model", hidden_size=hidden, num_hidden_layers=layers,
                                        intermediate_size=hidden * 11 // 4, num_attention_heads=8,
                                        num_key_value_heads=8, head_dim=hidden // 8)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(ROOT / "launch/demo/model").save_pretrained(path)


def launch_train(args: list[str], *, out: Path, nprocs: int, cache: Path, port: str) -> tuple[list[dict], str]:
    """``launch/train.py ARGS`` under the deepspeed launcher; returns (metrics rows, "") or ([], error tail)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", DSPREF_CACHE=str(cache), PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs),
                           "--master_port", port, str(ROOT / "launch/train.py")] + args + ["--output_dir", str(out)],
                          env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return [], proc.stderr[-800:]
    return [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()], ""


def write_results(name: str, *, title: str, table: str, payload: dict, folder: Path = RESULTS) -> None:
    """Print the Markdown table; write it (under ``title``) and the raw JSON to ``folder`` (benchmarks/results/)."""
    print(table)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{name}.json").write_text(json.dumps(payload, indent=2))
    (folder / f"{name}.md").write_text(f"{title}\n\n{table}\n")
