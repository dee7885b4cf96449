"""The integration path on one CUDA device with ZeRO-3 + CPU offload (skipped without a GPU).

This is the single-GPU set-up users try first: ds_configs/zero3_offload.json, bf16. DeepSpeed
compiles its CPU Adam on first use (about a minute on a fresh machine).
"""

import json

import pytest
import torch

from conftest import base_args, launch, read_metrics

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def test_cpo_zero3_offload_one_gpu(tmp_path, small_data):
    train, evals = small_data
    out = tmp_path / "run"
    result = tmp_path / "result.json"
    args = base_args(out, train, evals, ds_config="zero3_offload.json", max_steps=8, bf16="true",
                     gradient_checkpointing="true", logits_chunk_size=5)
    proc = launch(["tests/dist/train_and_check.py", str(result)] + args, nprocs=1, timeout=900)
    assert proc.returncode == 0, proc.stderr[-6000:]
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert rows[-1]["step"] == 8 and rows[-1]["loss"] < rows[0]["loss"]
    assert rows[-1]["peak_memory_gib"] > 0
    report = json.loads(result.read_text())
    # bf16 engine vs the fp32 reload of its exported bf16 weights, and chunked vs full bf16 logits
    assert report["export_max_abs_diff"] < 1e-2
    assert report["chunked_vs_naive_max_abs"] < 5e-2
