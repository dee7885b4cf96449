"""The pure parts of benchmarks/run.py (dspref vs TRL): tokenizer, synthetic data, the arithmetic of
the figures, token counting on both sides' batches, and --compare trl without TRL. No training."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _load("run")


def test_tokenizer_vocabulary_is_the_models_and_one_word_is_one_token():
    vocab = run.SHAPES["tiny"]["vocab_size"]
    tokenizer = run.build_tokenizer(vocab)
    assert len(tokenizer) == vocab
    assert (tokenizer.unk_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (vocab - 3, vocab - 2, vocab - 1)
    for k in (1, 7, 256):
        words = " ".join(f"w{(i * 7919) % (vocab - 3)}" for i in range(k))
        ids = tokenizer(words, add_special_tokens=False)["input_ids"]
        assert len(ids) == k and tokenizer.unk_token_id not in ids
        assert len(tokenizer(" " + words)["input_ids"]) == k  # a completion's leading space adds nothing


@pytest.mark.parametrize("max_length", [512, 256, 1024, 4096])
@pytest.mark.parametrize("data_shape", sorted(run.DATA_SHAPES))
@pytest.mark.parametrize("method", run.METHODS)
def test_synthetic_lengths_within_the_stated_ranges(method, data_shape, max_length):
    (p_lo, p_hi), (c_lo, c_hi) = run.data_lengths(data_shape, max_length)
    if max_length == 512:
        assert ((p_lo, p_hi), (c_lo, c_hi)) == run.DATA_SHAPES[data_shape]
    else:  # the same shape, every bound scaled (within a token of rounding)
        scale = max_length / 512
        for got, base in zip((p_lo, p_hi, c_lo, c_hi), (x for pair in run.DATA_SHAPES[data_shape] for x in pair)):
            assert abs(got - base * scale) <= 2
    rows = run.synthetic_rows(method, 200, data_shape, vocab_words=1000, seed=3, max_length=max_length)
    assert rows == run.synthetic_rows(method, 200, data_shape, vocab_words=1000, seed=3, max_length=max_length)
    completions = ("chosen", "rejected") if method in run.PAIRED else ("completion",)
    assert set(rows[0]) == {"prompt", *completions} | (set() if method in run.PAIRED else {"label"})
    prompt_lengths = [len(r["prompt"].split()) for r in rows]
    completion_lengths = [len(r[c].split()) for r in rows for c in completions]
    assert p_lo <= min(prompt_lengths) and max(prompt_lengths) <= p_hi
    assert c_lo <= min(completion_lengths) and max(completion_lengths) <= c_hi
    assert p_hi <= max_length // 2  # the max_prompt_length dspref gets
    assert p_hi + c_hi + 1 <= max_length  # with EOS, every sequence fits max_length untruncated
    if method not in run.PAIRED:
        assert sum(r["label"] for r in rows) == 100  # balanced classes


def test_flop_params_counts_every_multiplied_weight_but_the_input_embedding():
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    for kind, auto in (("causal", AutoModelForCausalLM), ("seq-cls", AutoModelForSequenceClassification)):
        config = run.model_config("tiny", kind)
        with torch.device("meta"):
            model = auto.from_config(config)
        weights = sum(p.numel() for n, p in model.named_parameters() if p.ndim == 2 and "embed_tokens" not in n)
        tied_head = config.vocab_size * config.hidden_size if kind == "causal" else 0  # not a separate parameter
        assert run.flop_params("tiny", kind) == weights + tied_head


def _records(times, tokens):
    return [{"t": t, "trained_tokens": n, "trained_sq": n * 10, "no_grad_tokens": n // 2, "no_grad_sq": n,
             "rss_gib": 1.0 + i, "gpu_gib": None} for i, (t, n) in enumerate(zip(times, tokens))]


def test_summary_window_starts_at_the_end_of_the_warm_up():
    s = run.summarize(_records([10.0, 12.0, 15.0, 16.0], [100, 200, 300, 500]), warmup=1)
    assert s["steps_measured"] == 3 and s["seconds"] == 6.0 and s["trained_tokens"] == 1000
    assert s["tokens_per_second"] == pytest.approx(1000 / 6) and s["seconds_per_step"] == 2.0
    assert s["seconds_to_first_step"] == 10.0 and s["peak_rss_gib"] == 4.0 and s["peak_gpu_gib"] is None
    with pytest.raises(ValueError):
        run.summarize(_records([1.0, 2.0], [1, 1]), warmup=2)


def test_model_flops_by_hand():
    s = {"trained_tokens": 10, "trained_sq": 50, "no_grad_tokens": 4, "no_grad_sq": 8}
    # 6·N·10 + 3·(2·L·w)·50 + 2·N·4 + (2·L·w)·8 with N=100, L=2, w=3 (2·L·w = 12)
    assert run.model_flops(100, 2, 3, s, reference_in_step=False) == 6000 + 1800 + 800 + 96
    # the reference also scores every row: no-grad tokens 2·4 + 10, squares 2·8 + 50
    assert run.model_flops(100, 2, 3, s, reference_in_step=True) == 6000 + 1800 + 2 * 100 * 18 + 12 * 66


def test_table_ratios_are_dspref_over_trl():
    results = [{"method": "cpo", "data_shape": "fixed", "trl_note": "n",
                "dspref": {"tokens_per_second": 300.0, "seconds_per_step": 2.0, "peak_rss_gib": 1.0, "mfu": None},
                "trl": {"tokens_per_second": 200.0, "seconds_per_step": 3.0, "peak_rss_gib": 4.0, "mfu": None}},
               {"method": "bco", "data_shape": "fixed", "trl_note": "no peer: x",
                "dspref": {"tokens_per_second": 50.0, "seconds_per_step": 1.0, "peak_rss_gib": 2.0, "mfu": None}}]
    lines = run.table(results).splitlines()
    assert lines[2] == "| cpo | fixed | 300 | 200 | 1.50 | 2.00 | 3.00 | 0.67 | 1.00 | 4.00 | 0.25 | n |"
    assert lines[3] == "| bco | fixed | 50 | – | – | 1.00 | – | – | 2.00 | – | – | no peer: x |"
    assert len(lines) == 4  # no MFU table without CUDA figures


def test_both_sides_count_trained_and_kl_rows_alike():
    dspref_child, trl_child = _load("child_dspref"), _load("child_trl")
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    # dspref KTO: B=2 trained rows, then 2 KL rows; paired: every row trained
    kto = {"attention_mask": mask, "label": torch.tensor([True, False])}
    assert dspref_child.batch_lengths(kto) == ([3, 2], [4, 1])
    assert dspref_child.batch_lengths({"attention_mask": mask}) == ([3, 2, 4, 1], [])
    assert dspref_child.batch_lengths({"attention_mask": mask, "trained_rows": 3}) == ([3, 2, 4], [1])
    # TRL: KTO 1.16, CPO, BCO 1.13
    assert trl_child.batch_lengths({"attention_mask": mask[:2], "KL_attention_mask": mask[2:]}) == ([3, 2], [4, 1])
    assert trl_child.batch_lengths({"chosen_attention_mask": mask[:2], "rejected_attention_mask": mask[2:],
                                    "prompt_attention_mask": mask[:2]}) == ([3, 2, 4, 1], [])
    bco = {"completion_attention_mask": mask, "prompt_attention_mask": mask}
    assert trl_child.batch_lengths(bco) == ([3, 2, 4, 1], [])


def test_compare_trl_without_trl_names_the_setup_script(tmp_path, capsys):
    venv = tmp_path / "venv-without-trl"
    (venv / "bin").mkdir(parents=True)
    os.symlink(sys.executable, venv / "bin" / "python")  # the CI venv: no trl
    no_trl = [venv] if importlib.util.find_spec("trl") is None else []
    for missing in no_trl + [tmp_path / "absent"]:
        with pytest.raises(SystemExit) as e:
            run.main(["--method", "cpo", "--compare", "trl", "--bench-venv", str(missing),
                      "--work-dir", str(tmp_path / "work")])
        assert "bash benchmarks/setup_bench.sh" in str(e.value.code)
    assert not (tmp_path / "work").exists()  # refused before building anything


@pytest.mark.parametrize("bf16", [False, True])
def test_both_sides_train_in_the_same_precision(tmp_path, bf16):
    a = run.parse(["--method", "cpo"] + (["--bf16"] if bf16 else []))
    paths = [tmp_path / n for n in ("model", "tok", "data.jsonl", "out", "records.jsonl")]
    dspref = run.dspref_command(a, "cpo", *paths)
    assert dspref[dspref.index("--bf16") + 1] == ("true" if bf16 else "false")
    assert dspref[dspref.index("--fp16") + 1] == "false"
    trl = run.trl_command(a, "cpo", *paths, {"default": tmp_path / "venv"})
    assert ("--bf16" in trl) is bf16  # child_trl.py: TRL's bf16=True, else fp32


def test_work_ratio_counts_padding_and_shared_prompts_by_hand():
    work = _load("work_ratio")
    # a pair (prompt 3, chosen 2, rejected 4): TRL pads both rows to 7; dspref runs 3 + 2 + 4 tokens,
    # squares 3² + 2·(2·3 + 2) + 4·(2·3 + 4)
    assert work.batch_work([(3, 2, 4)], paired=True) == ((14, 98), (9, 65))
    # unpaired rows of 5 and 2 tokens: TRL pads to 5
    assert work.batch_work([(2, 3), (1, 1)], paired=False) == ((10, 50), (7, 29))
    assert work.step_flops(10, 5, 2, 3, tokens=4, squares=6) == 8 * 15 * 4 + 4 * 2 * 2 * 3 * 6
    # fixed lengths leave almost nothing to pad: unpaired rows cost the same on both sides
    assert work.work_ratio("kto", "fixed") == pytest.approx(1.0, abs=0.03)
    assert work.work_ratio("cpo", "variable") > work.work_ratio("cpo", "fixed") > 1.2  # the prompt once, no padding
