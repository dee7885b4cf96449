"""Bad input gets one clear line and exit status 2 before any model is loaded; nothing written is lost.

These run in-process (one rank, gloo), so they are quick and can inject failures.
"""

from __future__ import annotations

import errno
import json
import shutil

import pytest
import torch

from conftest import DEMO_MODEL, DS_CONFIGS, base_args, read_metrics, write_jsonl
from dspref import engine as eng
from dspref.run import main


@pytest.fixture
def no_model_load(monkeypatch):
    """Fail the test if a model is constructed: input errors must come first."""
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input error was reported")
    monkeypatch.setattr(eng, "load_model", boom)


def run_main(args, capsys):
    status = main(args)
    return status, capsys.readouterr()


def error_line(captured) -> str:
    lines = [line for line in captured.err.splitlines() if line.startswith("dspref: error:")]
    assert len(lines) == 1, captured.err
    return lines[0]


def write_ds(tmp_path, **changes):
    ds = json.loads((DS_CONFIGS / "zero2.json").read_text())
    for dotted, value in changes.items():
        node = ds
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(ds))
    return path


def test_missing_ds_config(tmp_path, small_data, capsys, no_model_load):
    args = base_args(tmp_path / "out", small_data[0]) + ["--ds_config", str(tmp_path / "nope.json")]
    status, cap = run_main(args, capsys)
    assert status == 2
    assert str(tmp_path / "nope.json") in error_line(cap) and "ds_configs/zero3.json" in error_line(cap)


def test_invalid_ds_json(tmp_path, small_data, capsys, no_model_load):
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2,}}')
    status, cap = run_main(base_args(tmp_path / "out", small_data[0]) + ["--ds_config", str(bad)], capsys)
    assert status == 2 and str(bad) in error_line(cap)


def test_leftover_auto(tmp_path, small_data, capsys, no_model_load):
    ds = write_ds(tmp_path, zero_optimization__allgather_bucket_size="auto")
    status, cap = run_main(base_args(tmp_path / "out", small_data[0]) + ["--ds_config", str(ds)], capsys)
    assert status == 2 and "zero_optimization.allgather_bucket_size" in error_line(cap)


def test_yaml_json_contradiction(tmp_path, small_data, capsys, no_model_load):
    ds = write_ds(tmp_path, train_micro_batch_size_per_gpu=2)
    status, cap = run_main(base_args(tmp_path / "out", small_data[0]) + ["--ds_config", str(ds)], capsys)
    line = error_line(cap)
    assert status == 2 and "per_device_train_batch_size=4" in line and "train_micro_batch_size_per_gpu=2" in line


def test_unknown_option(tmp_path, small_data, capsys, no_model_load):
    status, cap = run_main(base_args(tmp_path / "out", small_data[0]) + ["--lerning_rate", "1"], capsys)
    assert status == 2 and "did you mean 'learning_rate'" in error_line(cap)


def test_missing_model_path(tmp_path, small_data, capsys, no_model_load):
    missing = tmp_path / "no-such-model"
    status, cap = run_main(base_args(tmp_path / "out", small_data[0], model_name_or_path=missing), capsys)
    assert status == 2
    assert error_line(cap) == f"dspref: error: model_name_or_path {str(missing)!r} does not exist"


def test_data_error_before_model(tmp_path, capsys, no_model_load):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "sort: 1 2 =", "choosen": " 1 2", "rejected": " 2 1"}])
    status, cap = run_main(base_args(tmp_path / "out", bad), capsys)
    line = error_line(cap)
    assert status == 2 and "bad.jsonl" in line and "'chosen'" in line


def test_output_dir_below_a_file(tmp_path, small_data, capsys, no_model_load):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    status, cap = run_main(base_args(blocker / "out", small_data[0]), capsys)
    assert status == 2
    assert error_line(cap).startswith(f"dspref: error: cannot create output_dir {str(blocker / 'out')!r}")


def test_output_dir_with_another_run(tmp_path, small_data, capsys, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    status, cap = run_main(base_args(out, small_data[0]), capsys)
    assert status == 2 and "already holds a run" in error_line(cap) and "--overwrite_output_dir" in error_line(cap)
    assert (out / "metrics.jsonl").read_text() == '{"step": 1, "loss": 1.0}\n'  # untouched


def test_tokenizer_without_pad_token_uses_eos(tmp_path, small_data, capsys, caplog):
    model_dir = tmp_path / "model"
    shutil.copytree(DEMO_MODEL, model_dir)
    tok_cfg = json.loads((model_dir / "tokenizer_config.json").read_text())
    tok_cfg.pop("pad_token", None)
    (model_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    out = tmp_path / "out"
    status, cap = run_main(base_args(out, small_data[0], model_name_or_path=model_dir, max_steps=1), capsys)
    assert status == 0, cap.err
    assert "tokenizer has no pad token; using its EOS token '</s>' for padding" in cap.out + caplog.text
    assert read_metrics(out)[-1]["step"] == 1


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, small_data, capsys, monkeypatch):
    out = tmp_path / "out"
    real_save = torch.save

    def failing_save(obj, f, *a, **k):
        if ".tmp-checkpoint-4" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", failing_save)
    status, cap = run_main(base_args(out, small_data[0], max_steps=6, save_steps=2), capsys)
    assert status == 2
    line = error_line(cap)
    assert "saving checkpoint-4 failed" in line and "No space left on device" in line
    assert "checkpoint-2" in line and "is intact" in line
    assert (out / "latest").read_text().strip() == "checkpoint-2"
    assert sorted(p.name for p in out.iterdir() if "checkpoint" in p.name) == ["checkpoint-2"]
    state = json.loads((out / "checkpoint-2" / "dspref_state.json").read_text())
    assert state["step"] == 2


def test_nan_loss_stops_before_the_update(tmp_path, small_data, capsys, monkeypatch):
    from dspref.objectives.cpo import CPOObjective

    real = CPOObjective.compute
    calls = {"n": 0}

    def compute(self, policy, batch, *, train):
        loss, metrics = real(self, policy, batch, train=train)
        if train:
            calls["n"] += 1
            if calls["n"] == 3:
                loss = loss * float("nan")
        return loss, metrics

    monkeypatch.setattr(CPOObjective, "compute", compute)
    out = tmp_path / "out"
    status, cap = run_main(base_args(out, small_data[0], max_steps=6, save_steps=2), capsys)
    assert status == 1
    line = error_line(cap)
    from dspref.loop import train_order

    rows = train_order(64, epoch=0, seed=7, rank=0, world_size=1, micro_batch=4)[2]  # the third micro-batch
    assert line.startswith(f"dspref: error: loss is not finite at step 3 (rank 0: loss nan on training rows {rows}); "
                           "stopped before applying it.")
    assert "last complete checkpoint is" in line and "checkpoint-2" in line
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]


def test_overwrite_keeps_the_old_run_when_the_new_recipe_is_bad(tmp_path, small_data, capsys, no_model_load):
    out = tmp_path / "out"
    out.mkdir()
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (out / "model.safetensors").write_bytes(b"old weights")
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "", "rejected": "r"}])
    status, cap = run_main(base_args(out, bad, overwrite_output_dir="true"), capsys)
    assert status == 2 and "empty" in error_line(cap)
    assert (out / "model.safetensors").read_bytes() == b"old weights"  # nothing removed before inputs passed
    assert (out / "metrics.jsonl").exists()
