"""Shared fixtures: the shipped tiny model/tokenizer, small data files, launcher helpers.

Nothing here touches a model hub: the model is built from launch/demo/model/config.json with
random weights, and the tokenizer ships in that folder.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DEMO_MODEL = ROOT / "launch" / "demo" / "model"
DEMO_DATA = ROOT / "launch" / "demo" / "data"
DS_CONFIGS = ROOT / "ds_configs"

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("OMP_NUM_THREADS", "1")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def demo_rows(split: str, n: int) -> list[dict]:
    lines = (DEMO_DATA / f"{split}.jsonl").read_text().splitlines()[:n]
    return [json.loads(line) for line in lines]


def base_args(output_dir, train_file, eval_file=None, ds_config="zero2.json", **overrides) -> list[str]:
    """CLI args for a short CPU run on the shipped tiny model."""
    opts = {
        "model_name_or_path": str(DEMO_MODEL), "random_init": "true", "train_file": str(train_file),
        "output_dir": str(output_dir), "ds_config": str(DS_CONFIGS / ds_config), "per_device_train_batch_size": "4",
        "per_device_eval_batch_size": "8", "learning_rate": "1e-3", "max_steps": "6", "logging_steps": "1",
        "save_steps": "1000", "max_length": "64", "max_prompt_length": "32", "seed": "7",
    }
    if eval_file is not None:
        opts["eval_file"] = str(eval_file)
    opts.update({k: str(v) for k, v in overrides.items()})
    args = []
    for k, v in opts.items():
        args += [f"--{k}", v]
    return args


def launch(script_args: list[str], *, nprocs: int, launcher: str = "deepspeed", timeout: int = 600,
           env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``launch/train.py`` (or another script) under a launcher with ``nprocs`` CPU ranks."""
    cmd, full_env = launch_command(script_args, nprocs=nprocs, launcher=launcher, env=env)
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)


def start(script_args: list[str], *, nprocs: int, launcher: str = "deepspeed", env: dict | None = None,
          log_path=None) -> subprocess.Popen:
    """:func:`launch` without waiting (output to ``log_path``): for tests that signal or kill ranks."""
    cmd, full_env = launch_command(script_args, nprocs=nprocs, launcher=launcher, env=env)
    out = open(log_path, "w") if log_path else subprocess.DEVNULL
    return subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT, text=True)


def launch_command(script_args: list[str], *, nprocs: int, launcher: str, env: dict | None) -> tuple[list, dict]:
    # In-process tests have joined a process group in this pytest process: its rendezvous
    # variables must not leak into a child (it would reuse a port that is already taken).
    dist_vars = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    full_env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    full_env.update({"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), **(env or {})})
    port = str(free_port())
    if launcher == "deepspeed":
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(nprocs), "--master_port", port]
    elif launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
               "--master_port", port]
    else:
        cmd = [sys.executable]
    return cmd + script_args, full_env


def run_many(tmp, specs: dict[str, list], *, nprocs: int = 2, timeout: int = 900) -> dict:
    """Several trainings (name -> CLI args) one after another in one 2-rank launch (tests/dist/run_many.py):
    name -> {"rows": metrics rows, "step": N} or {"error": ..., "trace": ...}."""
    spec_file, result = Path(tmp) / "specs.json", Path(tmp) / "result.json"
    spec_file.write_text(json.dumps({k: [str(x) for x in v] for k, v in specs.items()}))
    proc = launch(["tests/dist/run_many.py", str(result), str(spec_file)], nprocs=nprocs, timeout=timeout,
                  env={"DSPREF_CACHE": str(Path(tmp) / "cache")})
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(result.read_text())


def read_metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def save_tiny_bert(folder) -> str:
    """A tiny random BERT (the UDM prompt embedder in tests) with the demo's word-level tokenizer, saved to ``folder``."""
    import shutil

    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=19, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=3, type_vocab_size=2)
    BertModel(config).save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, Path(folder) / name)
    return str(folder)


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """(train.jsonl with 64 demo rows, eval.jsonl with 16 rows)."""
    d = tmp_path_factory.mktemp("data")
    return write_jsonl(d / "train.jsonl", demo_rows("train", 64)), write_jsonl(d / "eval.jsonl", demo_rows("eval", 16))


@pytest.fixture(scope="session")
def saved_base(tmp_path_factory):
    """The demo's tiny Llama with random (seeded) weights saved as a real model folder (+ tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = tmp_path_factory.mktemp("base") / "model"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DEMO_MODEL)).save_pretrained(path)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(path)
    return path


def wait_for(predicate, what: str, *, timeout: float = 240, interval: float = 0.05, logs=()):
    """Poll ``predicate`` until it returns something truthy (returned); on timeout fail, with the
    tails of ``logs`` (paths) in the message."""
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    tails = "\n".join(f"--- {p}\n{p.read_text()[-3000:] if p.exists() else '(none)'}" for p in logs)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}\n{tails}")
