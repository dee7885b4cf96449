"""Reward modeling: score position, export and reload, LoRA + ZeRO-3 + gradient checkpointing."""

from __future__ import annotations

import json
import math

import pytest
import torch

from conftest import DEMO_MODEL, base_args, launch, read_metrics

SCRIPT = "tests/dist/train_and_check.py"


def _check(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\\nSTDOUT:\\n{proc.stdout[-3000:]}\\nSTDERR:\\n{proc.stderr[-5000:]}"


def tiny_classifier(pad_token_id):
    from transformers import AutoConfig, AutoModelForSequenceClassification

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(DEMO_MODEL, num_labels=1, pad_token_id=pad_token_id)
    return AutoModelForSequenceClassification.from_config(config).eval()


def test_score_is_read_at_last_non_pad_token_left_or_right_padding():
    from dspref.data.reward import RewardCollator
    from dspref.logps import RewardScorer

    scorer = RewardScorer(tiny_classifier(pad_token_id=3))
    seqs = [[1, 6, 7, 12, 9, 8, 9, 12, 2], [1, 6, 7, 10, 8, 10, 2]]
    alone = torch.stack([scorer(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))["rewards"][0]
                         for s in seqs])
    for side in ("right", "left"):
        batch = RewardCollator(3, padding_side=side)([{"chosen_ids": seqs[0], "rejected_ids": seqs[1]}])
        with torch.no_grad():
            scores = scorer(batch["input_ids"], batch["attention_mask"])["rewards"]
        assert torch.allclose(scores, alone, atol=1e-6), (side, scores, alone)


def test_pad_equal_to_eos_reads_the_token_before_the_eos():
    """A tokenizer without a pad token pads with EOS (id 2): the appended EOS then counts as padding."""
    from dspref.logps import RewardScorer

    scorer = RewardScorer(tiny_classifier(pad_token_id=2))
    with_eos = torch.tensor([[1, 6, 7, 12, 9, 8, 9, 12, 2]])
    before_eos = with_eos[:, :-1]
    with torch.no_grad():
        a = scorer(with_eos, torch.ones_like(with_eos))["rewards"]
        b = scorer(before_eos, torch.ones_like(before_eos))["rewards"]
    assert torch.allclose(a, b, atol=1e-6)


def test_model_with_more_than_one_label_is_refused(tmp_path, small_data, capsys):
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    from dspref.run import main

    path = tmp_path / "two-labels"
    config = AutoConfig.from_pretrained(DEMO_MODEL, num_labels=2)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    AutoTokenizer.from_pretrained(DEMO_MODEL).save_pretrained(path)
    status = main(base_args(tmp_path / "out", small_data[0], method="reward", model_name_or_path=path,
                            max_prompt_length="none"))
    err = capsys.readouterr().err
    assert status == 2
    assert f"model_name_or_path {str(path)!r} is a sequence classifier with 2 labels; a reward model has exactly one" in err


def test_merged_lora_export_loads_as_a_plain_model(tmp_path, small_data, saved_base):
    """One rank, ZeRO-2: merge_peft_adapter writes a plain classifier with the trained scores."""
    from transformers import AutoModelForSequenceClassification

    from dspref.config import parse_args
    from dspref.run import train

    out = tmp_path / "out"
    cfg, explicit = parse_args(base_args(out, small_data[0], method="reward", model_name_or_path=saved_base,
                                         random_init="false", max_prompt_length="none", max_steps=3,
                                         merge_peft_adapter="true",
                                         peft_config="{r: 4, lora_alpha: 8, target_modules: all-linear}"))
    result = train(cfg, explicit)
    assert not (out / "adapter_config.json").exists() and (out / "model.safetensors").exists()
    probe = torch.arange(4, 16).reshape(1, 12)
    with torch.no_grad():
        result.engine.train(False)
        trained = result.engine(input_ids=probe, attention_mask=torch.ones_like(probe))["rewards"]
        reloaded = AutoModelForSequenceClassification.from_pretrained(out).eval()(input_ids=probe).logits.squeeze(-1)
    assert torch.allclose(trained, reloaded, atol=1e-5), (trained, reloaded)

    # `dspref score` on the export: one line per row, the same scores as the model gives directly
    from dspref.cli import main as cli_main

    scores = tmp_path / "scores.jsonl"
    assert cli_main(["score", "--model", str(out), "--data", str(small_data[1]), "--out", str(scores)]) == 0
    lines = [json.loads(x) for x in scores.read_text().splitlines()]
    assert [x["row"] for x in lines] == list(range(16))
    first = json.loads(small_data[1].read_text().splitlines()[0])
    ids = result.tokenizer(first["prompt"] + first["chosen"] + "</s>", return_tensors="pt").input_ids
    with torch.no_grad():
        direct = AutoModelForSequenceClassification.from_pretrained(out).eval()(input_ids=ids).logits.item()
    assert lines[0]["chosen_score"] == pytest.approx(direct, abs=1e-5)
    assert lines[0]["margin"] == pytest.approx(lines[0]["chosen_score"] - lines[0]["rejected_score"])


@pytest.mark.slow
def test_reward_zero3_two_ranks_export_identical_scores(tmp_path, small_data):
    train, evals = small_data
    out, result = tmp_path / "run", tmp_path / "result.json"
    args = base_args(out, train, evals, method="reward", ds_config="zero3.json", max_steps=10,
                     max_prompt_length="none", learning_rate="3e-3")
    _check(launch([SCRIPT, str(result)] + args, nprocs=2))
    rows = [r for r in read_metrics(out) if "loss" in r]
    assert rows[-1]["step"] == 10
    assert sum(r["loss"] for r in rows[-3:]) < sum(r["loss"] for r in rows[:3])
    for key in ("accuracy", "margin", "rewards/chosen", "rewards/rejected"):
        assert math.isfinite(rows[-1][key])
    evals_rows = [r for r in read_metrics(out) if "eval_loss" in r]
    assert [r["step"] for r in evals_rows] == [0, 10] and "eval_accuracy" in evals_rows[-1]
    report = json.loads(result.read_text())
    assert report["export_max_abs_diff"] < 1e-5
    config = json.loads((out / "config.json").read_text())
    assert config["num_labels"] == 1 if "num_labels" in config else len(config["id2label"]) == 1
    assert config["pad_token_id"] == 3


@pytest.mark.slow
def test_reward_lora_zero3_gradient_checkpointing_two_ranks(tmp_path, small_data, saved_base):
    train, evals = small_data
    out, result = tmp_path / "run", tmp_path / "result.json"
    args = base_args(out, train, evals, method="reward", ds_config="zero3.json", max_steps=6,
                     max_prompt_length="none", model_name_or_path=saved_base, random_init="false",
                     gradient_checkpointing="true", peft_config="{r: 4, lora_alpha: 8, target_modules: all-linear}")
    _check(launch([SCRIPT, str(result)] + args, nprocs=2))
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["task_type"] == "SEQ_CLS" and adapter["r"] == 4
    from safetensors.torch import load_file

    weights = load_file(out / "adapter_model.safetensors")
    assert any("score" in k for k in weights), list(weights)[:5]  # the new head is trained and saved
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())  # adapters moved off zero
    report = json.loads(result.read_text())
    assert report["export_max_abs_diff"] < 1e-5
