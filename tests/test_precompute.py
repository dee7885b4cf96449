"""Precomputed reference log-probs: cache reuse, invalidation on changed input, rebuild when corrupted."""

from __future__ import annotations

import glob
import json

import pytest

from conftest import base_args, demo_rows, launch, read_metrics, write_jsonl
from dspref.run import main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DSPREF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def kto(out, train, **kw):
    return base_args(out, train, method="kto", max_steps=3, ds_config="zero2.json", precompute_ref_log_probs="true",
                     **kw)


def test_cache_reused_invalidated_and_rebuilt(tmp_path, small_data, cache, caplog):
    caplog.set_level("INFO", logger="dspref")
    assert main(kto(tmp_path / "a", small_data[0])) == 0
    folders = glob.glob(str(cache / "ref_logps" / "*"))
    assert len(folders) == 1 and "computed 3 batches per rank" in caplog.text  # 3 steps, one micro-batch each
    caplog.clear()
    assert main(kto(tmp_path / "b", small_data[0])) == 0
    assert "reusing the cache" in caplog.text
    assert [r["loss"] for r in read_metrics(tmp_path / "a")] == [r["loss"] for r in read_metrics(tmp_path / "b")]

    changed = write_jsonl(tmp_path / "changed.jsonl", demo_rows("train", 60))  # different data: new fingerprint
    caplog.clear()
    assert main(kto(tmp_path / "c", changed)) == 0
    assert "computed" in caplog.text and len(glob.glob(str(cache / "ref_logps" / "*"))) == 2

    rank_file = glob.glob(f"{folders[0]}/rank0.pt")[0]
    with open(rank_file, "wb") as f:
        f.write(b"not a torch file")  # a corrupted cache is rebuilt, never used
    caplog.clear()
    assert main(kto(tmp_path / "d", small_data[0])) == 0
    assert "incomplete or unreadable; rebuilding it" in caplog.text
    assert [r["loss"] for r in read_metrics(tmp_path / "d")] == [r["loss"] for r in read_metrics(tmp_path / "a")]



def test_zero3_reference_engine_is_freed_after_the_precompute_pass(tmp_path, small_data, cache):
    """Under ZeRO-3 the precompute pass's reference engine must not outlive it (it holds a whole model).

    Run in a fresh process: objects that pytest itself keeps (captured log records, tracebacks) must not
    decide the answer."""
    args = base_args(tmp_path / "z3", small_data[0], method="kto", max_steps=2, ds_config="zero3.json",
                     precompute_ref_log_probs="true", eval_on_start="false")
    result = tmp_path / "alive.json"
    proc = launch(["tests/dist/reference_freed.py", str(result), *args], nprocs=1, launcher="python", timeout=300,
                  env={"DSPREF_CACHE": str(cache)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(result.read_text()) == {"engines_built": 1, "alive_at_each_step": [False, False]}
