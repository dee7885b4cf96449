"""KTO/BCO bad input (one line, exit 2, before any model loads) and BCO's delta across a resume."""

from __future__ import annotations

import json

import pytest

from conftest import DEMO_MODEL, base_args, read_metrics, write_jsonl
from dspref import engine as eng
from dspref.run import main


@pytest.fixture
def no_model_load(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a model was loaded before the input error was reported")
    monkeypatch.setattr(eng, "load_model", boom)


def error_of(args, capsys):
    status = main(args)
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("dspref: error:")]
    assert status == 2 and len(err) == 1, (status, err)
    return err[0]


def test_ref_model_path_that_does_not_exist(tmp_path, small_data, capsys, no_model_load):
    missing = tmp_path / "no-ref"
    line = error_of(base_args(tmp_path / "o", small_data[0], method="kto", ref_model=missing), capsys)
    assert line == f"dspref: error: ref_model {str(missing)!r} does not exist"


def test_reference_with_another_vocabulary(tmp_path, small_data, capsys, no_model_load):
    from transformers import AutoConfig

    other = tmp_path / "other"
    AutoConfig.from_pretrained(DEMO_MODEL, vocab_size=25).save_pretrained(other)
    line = error_of(base_args(tmp_path / "o", small_data[0], method="kto", ref_model=other), capsys)
    assert f"ref_model {str(other)!r} has a vocabulary of 25 tokens but the policy has 19" in line


def test_single_class_data(tmp_path, capsys, no_model_load):
    rows = [{"prompt": f"sort: {i} 1 =", "completion": f" 1 {i}", "label": True} for i in range(2, 9)]
    data = write_jsonl(tmp_path / "one.jsonl", rows)
    line = error_of(base_args(tmp_path / "o", data, method="bco"), capsys)
    assert "has no undesirable rows (label false)" in line


def test_labels_that_are_not_booleans(tmp_path, capsys, no_model_load):
    data = write_jsonl(tmp_path / "l.jsonl", [{"prompt": "sort: 2 1 =", "completion": " 1 2", "label": 1}])
    line = error_of(base_args(tmp_path / "o", data, method="kto"), capsys)
    assert "row 0, column 'label': expected true or false, got int (1)" in line


def test_precompute_with_a_live_engine_placement(tmp_path, small_data, capsys, no_model_load):
    line = error_of(base_args(tmp_path / "o", small_data[0], method="kto", precompute_ref_log_probs="true",
                              ref_offload="true"), capsys)
    assert "precompute_ref_log_probs holds no reference during training, so ref_offload" in line


def test_bco_delta_continues_exactly_after_resume(tmp_path, small_data):
    full, part = tmp_path / "full", tmp_path / "part"
    args = dict(method="bco", max_steps=6, save_steps=3)
    assert main(base_args(full, small_data[0], **args)) == 0
    assert main(base_args(part, small_data[0], stop_after_steps=3, **args)) == 0
    state = json.loads((part / "checkpoint-3" / "dspref_state.json").read_text())
    assert set(state["objective"]["running"]) == {"mean", "var", "count"}
    assert main(base_args(part, small_data[0], resume_from_checkpoint="latest", **args)) == 0
    a = [r for r in read_metrics(full) if "loss" in r]
    b = [r for r in read_metrics(part) if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert y["delta"] == pytest.approx(x["delta"], abs=1e-9) and y["loss"] == pytest.approx(x["loss"], abs=1e-6)


def test_named_reference_adapter(tmp_path, small_data, saved_base):
    """ref_adapter_name: the reference is a second, frozen adapter loaded from ref_adapter_path."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    ref = get_peft_model(AutoModelForCausalLM.from_pretrained(saved_base),
                         LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    ref.save_pretrained(tmp_path / "ref-adapter")  # random B: unlike the base, so rewards start non-zero
    out = tmp_path / "o"
    args = base_args(out, small_data[0], method="kto", model_name_or_path=saved_base, random_init="false",
                     peft_config="{r: 4, lora_alpha: 8, target_modules: all-linear}", max_steps=2,
                     ref_adapter_name="frozen_ref", ref_adapter_path=tmp_path / "ref-adapter")
    assert main(args) == 0
    first = [r for r in read_metrics(out) if "loss" in r][0]
    assert any(abs(first.get(k, 0.0)) > 1e-4 for k in ("rewards/chosen", "rewards/rejected"))
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == 4
    from safetensors.torch import load_file

    before = load_file(tmp_path / "ref-adapter" / "adapter_model.safetensors")
    after = load_file(out / "frozen_ref" / "adapter_model.safetensors")  # PEFT saves extra adapters in subfolders
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
