"""Tests for the reward-modeling data path (dspref.data.reward): layouts, margin, pre-tokenized masks,
dropping over-long rows, eval split and the collator.

Two local tokenizers: the byte-level BPE one of tests/test_data.py (<s>=0, </s>=1, <pad>=2; its fixture
and pinned ids are imported from there) and the shipped word-level demo tokenizer in launch/demo/model
(<s>=1, </s>=2, <pad>=3; words are split on whitespace, so its ids are easy to read).
"""

import json
import logging
import re

import pytest
import torch
from datasets import Dataset
from test_data import (  # noqa: F401  (tok and _datasets_cache are fixtures)
    BLUE,
    BLUE_IDS,
    CHAT_PROMPT_IDS,
    GREEN,
    GREEN_IDS,
    SKY_PROMPT_IDS,
    TEXT_ROW,
    USER,
    _datasets_cache,
    tok,
)
from transformers import AutoTokenizer

from conftest import DEMO_MODEL
from dspref.data.formats import DataError, Source, load_sources
from dspref.data.reward import RewardCollator, RewardFormat, build_reward_datasets, detect_reward_format

# demo tokenizer ids
D_BOS, D_EOS, D_PAD = 1, 2, 3
SORT, COLON, EQ = 6, 7, 8
DIGIT = {str(d): 9 + d for d in range(10)}  # "0" -> 9 ... "9" -> 18
USER_TOKEN, ASSISTANT_TOKEN = 4, 5

REWARD_LAYOUTS = (
    "prompt/chosen/rejected (explicit prompt), chosen/rejected (implicit prompt), "
    "prompt_ids/chosen_ids/rejected_ids (pre-tokenized) or input_ids_chosen/input_ids_rejected with optional "
    "attention_mask_chosen/attention_mask_rejected (pre-tokenized, TRL reward names); plus an optional 'margin'"
)


@pytest.fixture(scope="module")
def demo_tok():
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (D_BOS, D_EOS, D_PAD)
    return tokenizer


def digits(text):
    return [DIGIT[d] for d in text.split()]


def src(rows, name="train.jsonl"):
    return Source(name=name, dataset=Dataset.from_list(rows))


def build(sources, tokenizer, eval_sources=(), max_length=None, eval_split_ratio=0.0, seed=0, **kwargs):
    sources = [src(sources)] if isinstance(sources[0], dict) else sources
    return build_reward_datasets(
        sources, list(eval_sources), tokenizer, max_length=max_length, eval_split_ratio=eval_split_ratio,
        seed=seed, **kwargs,
    )  # fmt: skip


def rows_of(sources, tokenizer, **kwargs):
    train, evaluation = build(sources, tokenizer, **kwargs)
    assert evaluation is None
    return train.to_list()


def check_error(tokenizer, sources, message, **kwargs):
    with pytest.raises(DataError, match="^" + re.escape(message) + "$"):
        build(sources, tokenizer, **kwargs)


def pair(chosen, rejected, **extra):
    return {"chosen_ids": chosen, "rejected_ids": rejected, **extra}


def reward_ids(chosen, rejected, chosen_mask=None, rejected_mask=None, **extra):
    row = {"input_ids_chosen": chosen, "input_ids_rejected": rejected}
    if chosen_mask is not None or rejected_mask is not None:
        row["attention_mask_chosen"] = [1] * len(chosen) if chosen_mask is None else chosen_mask
        row["attention_mask_rejected"] = [1] * len(rejected) if rejected_mask is None else rejected_mask
    return {**row, **extra}


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# --------------------------------------------------------------------------------------------------
# Text layouts: full sequence = prompt_ids + chosen_ids of the paired path
# --------------------------------------------------------------------------------------------------

DEMO_ROW = {"prompt": "sort: 6 0 3 7 8 0 =", "chosen": " 0 0 3 6 7 8", "rejected": " 3 8 0 7 0 6"}
DEMO_PROMPT_IDS = [D_BOS, SORT, COLON] + digits("6 0 3 7 8 0") + [EQ]


def test_plain_text_demo_tokenizer_exact_ids_with_eos(demo_tok):
    source = src([DEMO_ROW])
    assert detect_reward_format(source) == RewardFormat("explicit", False)
    train, evaluation = build([source], demo_tok)
    assert evaluation is None and train.column_names == ["chosen_ids", "rejected_ids"]
    chosen = DEMO_PROMPT_IDS + digits("0 0 3 6 7 8") + [D_EOS]
    rejected = DEMO_PROMPT_IDS + digits("3 8 0 7 0 6") + [D_EOS]
    assert train.to_list() == [pair(chosen, rejected)]
    # the EOS is the tokenizer's own: ids equal tokenizing prompt + chosen + "</s>"
    assert chosen == demo_tok(DEMO_ROW["prompt"] + DEMO_ROW["chosen"] + "</s>")["input_ids"]
    assert rejected == demo_tok(DEMO_ROW["prompt"] + DEMO_ROW["rejected"] + "</s>")["input_ids"]


def test_eos_already_present_is_not_doubled(demo_tok):
    row = {"prompt": "sort: 2 1 =", "chosen": " 1 2</s>", "rejected": " 2 1"}
    prompt = [D_BOS, SORT, COLON] + digits("2 1") + [EQ]
    assert rows_of([row], demo_tok) == [pair(prompt + digits("1 2") + [D_EOS], prompt + digits("2 1") + [D_EOS])]


def test_bpe_explicit_ids_pinned_and_cross_boundary_merge(tok):
    rows = [TEXT_ROW, {"prompt": "The cat sat on the m", "chosen": "at.", "rejected": "at"}]
    out = rows_of(rows, tok)
    assert out[0] == pair(SKY_PROMPT_IDS + BLUE_IDS, SKY_PROMPT_IDS + GREEN_IDS)
    # "m" + "at." merge into Ġmat: the full sequence is the plain tokenization of the joined text
    full = [tok(text)["input_ids"] for text in ("The cat sat on the mat.</s>", "The cat sat on the mat</s>")]
    assert out[1] == pair(*full)


def test_implicit_text_prompt(tok):
    sky = "What color is the sky?"
    rows = [{"chosen": f"{sky} The sky is blue.", "rejected": f"{sky} The grass is green."}]
    source = src(rows)
    assert detect_reward_format(source) == RewardFormat("implicit", False)
    # prompt + completion is the whole chosen / rejected text, plus EOS
    assert rows_of([source], tok) == [pair(SKY_PROMPT_IDS + BLUE_IDS, SKY_PROMPT_IDS + GREEN_IDS)]


@pytest.mark.parametrize(
    "row, kind",
    [
        ({"prompt": USER, "chosen": BLUE, "rejected": GREEN}, "explicit"),
        ({"chosen": USER + BLUE, "rejected": USER + GREEN}, "implicit"),
        ({"prompt": "What color is the sky?", "chosen": USER + BLUE, "rejected": USER + GREEN}, "implicit"),
    ],
    ids=["explicit", "implicit", "string-prompt"],
)
def test_conversational_full_sequences(tok, row, kind):
    source = src([row])
    assert detect_reward_format(source) == RewardFormat(kind, True)
    out = rows_of([source], tok)
    # the template ends each turn with </s>; nothing is appended
    assert out == [pair(CHAT_PROMPT_IDS + BLUE_IDS, CHAT_PROMPT_IDS + GREEN_IDS)]
    assert out[0]["chosen_ids"] == tok.apply_chat_template(USER + BLUE, tokenize=True, return_dict=True)["input_ids"]


def test_conversational_demo_tokenizer(demo_tok):
    user = [{"role": "user", "content": "sort: 2 1 ="}]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": "1 2"}],
             "rejected": [{"role": "assistant", "content": "2 1"}]}]  # fmt: skip
    prompt = [USER_TOKEN, SORT, COLON] + digits("2 1") + [EQ, ASSISTANT_TOKEN]
    assert rows_of(rows, demo_tok) == [pair(prompt + digits("1 2"), prompt + digits("2 1"))]


def test_chat_template_argument(tok):
    template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    out = rows_of([{"prompt": USER, "chosen": BLUE, "rejected": GREEN}], tok, chat_template=template)
    assert out[0]["chosen_ids"] == [316, 321, 268, 265, 277, 33, 1, 261, 277, 268, 320, 16, 1]


# --------------------------------------------------------------------------------------------------
# Pre-tokenized layouts
# --------------------------------------------------------------------------------------------------


def test_paired_pretokenized_is_concatenated(tok):
    rows = [{"prompt_ids": [0, 10, 11], "chosen_ids": [12, 1], "rejected_ids": [13]}]
    source = src(rows)
    assert detect_reward_format(source) == RewardFormat("pretokenized", False)
    assert rows_of([source], tok) == [pair([0, 10, 11, 12, 1], [0, 10, 11, 13])]


def test_reward_pretokenized_without_masks(tok):
    source = src([reward_ids([0, 5, 6, 1], [0, 7])])
    assert detect_reward_format(source) == RewardFormat("reward_pretokenized", masks=False)
    assert rows_of([source], tok) == [pair([0, 5, 6, 1], [0, 7])]


def test_reward_pretokenized_masks_strip_trailing_padding(tok, tmp_path):
    rows = [
        reward_ids([0, 5, 6, 1], [0, 7, 2, 2], [1, 1, 1, 1], [1, 1, 0, 0]),  # rejected right-padded with <pad>
        reward_ids([0, 8], [0, 9, 1], [1, 1], [1, 1, 1]),
    ]
    path = write_jsonl(tmp_path / "tok.jsonl", rows)
    sources = load_sources([path])
    assert detect_reward_format(sources[0]) == RewardFormat("reward_pretokenized", masks=True)
    assert rows_of(sources, tok) == [pair([0, 5, 6, 1], [0, 7]), pair([0, 8], [0, 9, 1])]


def test_reward_pretokenized_whole_float_ids(tok, tmp_path):
    path = write_jsonl(tmp_path / "f.jsonl", [reward_ids([0, 5.0], [0, 7], [1.0, 1.0], [1, 1])])
    assert rows_of(load_sources([path]), tok) == [pair([0, 5], [0, 7])]


def test_mask_length_mismatch(tok):
    rows = [reward_ids([0, 5], [0, 7], [1, 1], [1, 1]), reward_ids([0, 5, 6, 7, 8, 1], [0, 7], [1] * 5, [1, 1])]
    message = (
        "train.jsonl row 1, column 'attention_mask_chosen': 5 entries but 'input_ids_chosen' has 6. "
        "Fix: give 'attention_mask_chosen' one 0/1 entry per token of 'input_ids_chosen', "
        "or drop both attention_mask columns."
    )
    check_error(tok, rows, message)


def test_mask_zero_before_one(tok):
    rows = [reward_ids([0, 5], [2, 2, 0, 7], [1, 1], [0, 0, 1, 1])]  # left padding left in the data
    message = (
        "train.jsonl row 0, column 'attention_mask_rejected': 0 at position 0 is followed by 1 at position 2; "
        "only trailing 0s (right padding) can be stripped. Fix: remove the padded or masked tokens from "
        "'input_ids_rejected' and 'attention_mask_rejected' (e.g. tokenize without left padding)."
    )
    check_error(tok, rows, message)


def test_mask_all_zero(tok):
    message = (
        "train.jsonl row 0, column 'attention_mask_chosen': every entry is 0, so no token is left. "
        "Fix: remove the row, or set 'attention_mask_chosen' to 1 on its tokens."
    )
    check_error(tok, [reward_ids([2, 2], [0, 7], [0, 0], [1, 1])], message)


def test_mask_not_zeros_and_ones(tok):
    message = (
        "train.jsonl row 0, column 'attention_mask_chosen': expected a list of 0s and 1s, got [1, 2]. "
        "Fix: store 'attention_mask_chosen' as lists of 0/1 (1 on every token), or drop both attention_mask columns."
    )
    check_error(tok, [reward_ids([0, 5], [0, 7], [1, 2], [1, 1])], message)


def test_reward_ids_are_checked_like_paired_ids(tok):
    message = (
        f"train.jsonl row 0, column 'input_ids_rejected': token id {len(tok)} at position 1 is out of range "
        f"(the tokenizer has {len(tok)} tokens). Fix: re-tokenize the data with the model's tokenizer."
    )
    check_error(tok, [reward_ids([0, 5], [0, len(tok)])], message)


def test_one_mask_column_without_the_other(tok):
    rows = [{"input_ids_chosen": [0, 5], "input_ids_rejected": [0, 7], "attention_mask_chosen": [1, 1]}]
    columns = ["input_ids_chosen", "input_ids_rejected", "attention_mask_chosen"]
    message = (
        f"train.jsonl: missing column(s) ['attention_mask_rejected']; found columns {columns}; "
        f"expected {REWARD_LAYOUTS}. Fix: add or rename the columns."
    )
    check_error(tok, rows, message)


def test_mistyped_reward_column(tok):
    rows = [{"input_ids_choosen": [0, 5], "input_ids_rejected": [0, 7]}]
    message = (
        "train.jsonl: column 'input_ids_choosen' is not a known column; did you mean 'input_ids_chosen'? "
        f"Found columns ['input_ids_choosen', 'input_ids_rejected']; expected {REWARD_LAYOUTS}. "
        "Fix: rename 'input_ids_choosen' to 'input_ids_chosen'."
    )
    check_error(tok, rows, message)


def test_no_known_layout(tok):
    message = (
        "train.jsonl: missing column(s) ['rejected']; found columns ['chosen', 'score']; "
        f"expected {REWARD_LAYOUTS}. Fix: add or rename the columns."
    )
    check_error(tok, [{"chosen": "a", "score": 1.0}], message)


def test_paired_validation_is_reused(tok):
    rows = [TEXT_ROW, {**TEXT_ROW, "chosen": ""}]
    message = (
        "train.jsonl row 1, column 'chosen': empty completion. Fix: remove the row or give it a non-empty 'chosen'."
    )
    check_error(tok, rows, message)
    empty = Source("empty.jsonl", Dataset.from_dict({"input_ids_chosen": [], "input_ids_rejected": []}))
    check_error(tok, [empty], "empty.jsonl: has no rows. Fix: remove it from the data files or add rows.")


# --------------------------------------------------------------------------------------------------
# Margin
# --------------------------------------------------------------------------------------------------


def test_margin_is_carried_as_float(tok, tmp_path):
    path = write_jsonl(tmp_path / "m.jsonl", [{**TEXT_ROW, "margin": 2}, {**TEXT_ROW, "margin": 0.5}])
    sources = load_sources([path])
    assert detect_reward_format(sources[0]) == RewardFormat("explicit", False, margin=True)
    train, _ = build(sources, tok)
    assert train.column_names == ["chosen_ids", "rejected_ids", "margin"]
    full = pair(SKY_PROMPT_IDS + BLUE_IDS, SKY_PROMPT_IDS + GREEN_IDS)
    assert train.to_list() == [{**full, "margin": 2.0}, {**full, "margin": 0.5}]
    assert all(isinstance(row["margin"], float) for row in train.to_list())


def test_margin_with_reward_pretokenized(tok):
    assert rows_of([reward_ids([0, 5], [0, 7], margin=-1.5)], tok) == [pair([0, 5], [0, 7], margin=-1.5)]


def test_margin_in_some_sources_only(tok):
    with_margin = src([{**TEXT_ROW, "margin": 1.0}], "a.jsonl")
    without = src([TEXT_ROW], "b.jsonl")
    message = (
        "the 'margin' column is in ['a.jsonl'] but not in ['b.jsonl']. "
        "Fix: give every data file (train and eval) a 'margin' column, or drop it from all of them."
    )
    check_error(tok, [with_margin, without], message)
    eval_source = src([{**TEXT_ROW, "margin": 1.0}], "c.jsonl")  # train and eval must agree too
    check_error(tok, [without], message.replace("a.jsonl", "c.jsonl"), eval_sources=[eval_source])


@pytest.mark.parametrize(
    "values, row, got",
    [
        ([1.0, None], 1, "None"),
        (["high", "1"], 0, "str ('high')"),  # Arrow makes the whole column str (or bool)
        ([True, False], 0, "bool (True)"),
        ([1.0, float("nan")], 1, "float (nan)"),
        ([1.0, float("-inf")], 1, "float (-inf)"),
    ],
    ids=["none", "string", "bool", "nan", "inf"],
)
def test_margin_bad_values(tok, values, row, got):
    rows = [{**TEXT_ROW, "margin": value} for value in values]
    message = (
        f"train.jsonl row {row}, column 'margin': expected a finite number, got {got}. "
        "Fix: make 'margin' a number, or drop the column."
    )
    check_error(tok, rows, message)


def test_mistyped_margin_column(tok):
    message = (
        "train.jsonl: column 'margins' is not a known column; did you mean 'margin'? "
        "Fix: rename 'margins' to 'margin'."
    )
    check_error(tok, [{**TEXT_ROW, "margins": 1.0}], message)


# --------------------------------------------------------------------------------------------------
# Length rule: over-long rows are dropped, not truncated
# --------------------------------------------------------------------------------------------------

# longer sequence per row: 3, 4 (rejected), 5 (chosen), 2
BY_LENGTH = [
    reward_ids([0, 5, 1], [0, 1]),
    reward_ids([0, 5], [0, 6, 7, 1]),
    reward_ids([0, 5, 6, 7, 1], [0, 1]),
    reward_ids([0, 1], [0, 1]),
]


def test_rows_longer_than_max_length_are_dropped(tok, caplog):
    with caplog.at_level(logging.INFO, logger="dspref.data"):
        out = rows_of(BY_LENGTH, tok, max_length=3)
    assert out == [pair([0, 5, 1], [0, 1]), pair([0, 1], [0, 1])]  # length == max_length is kept
    assert "train.jsonl: 2 of 4 rows dropped (longer than max_length=3)" in caplog.text


def test_drop_count_per_source_and_no_limit(tok, caplog):
    a, b = src(BY_LENGTH[:2], "a.jsonl"), src(BY_LENGTH[2:], "b.jsonl")
    with caplog.at_level(logging.INFO, logger="dspref.data"):
        train, _ = build([a, b], tok, max_length=4)
    assert len(train) == 3
    assert "a.jsonl: 0 of 2 rows dropped (longer than max_length=4)" in caplog.text
    assert "b.jsonl: 1 of 2 rows dropped (longer than max_length=4)" in caplog.text
    assert len(build([a, b], tok, max_length=None)[0]) == 4


def test_text_rows_dropped_in_tokens(demo_tok):
    short = {"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"}  # 9 tokens with BOS and EOS
    out = rows_of([DEMO_ROW, short], demo_tok, max_length=9)
    assert [len(row["chosen_ids"]) for row in out] == [9]


def test_all_rows_dropped(tok):
    message = (
        "a.jsonl, b.jsonl: all 4 rows dropped (longer than max_length=1; the shortest row needs 2 tokens). "
        "Fix: raise max_length to at least 2, or set it to None for no limit."
    )
    check_error(tok, [src(BY_LENGTH[:2], "a.jsonl"), src(BY_LENGTH[2:], "b.jsonl")], message, max_length=1)


def test_bad_max_length(tok):
    check_error(tok, BY_LENGTH, "max_length must be a positive integer or None, got 0. Fix: set max_length >= 1.",
                max_length=0)  # fmt: skip


def test_several_workers(tok):
    out = rows_of(BY_LENGTH * 2, tok, max_length=4, num_proc=2)
    assert len(out) == 6 and all(max(len(r["chosen_ids"]), len(r["rejected_ids"])) <= 4 for r in out)


# --------------------------------------------------------------------------------------------------
# Train / eval
# --------------------------------------------------------------------------------------------------

TEN = [reward_ids([0, 10 + i], [0, 1], margin=float(i)) for i in range(10)]


def test_eval_split_after_dropping_keeps_margin(tok):
    rows = TEN + [reward_ids([0, 5, 6, 7, 8], [0, 1], margin=99.0)]  # dropped before the split
    train, evaluation = build(rows, tok, max_length=4, eval_split_ratio=0.25, seed=3)
    assert (len(train), len(evaluation)) == (7, 3)
    assert evaluation.column_names == ["chosen_ids", "rejected_ids", "margin"]
    margins = sorted(r["margin"] for r in train.to_list() + evaluation.to_list())
    assert margins == [float(i) for i in range(10)]
    again = build(rows, tok, max_length=4, eval_split_ratio=0.25, seed=3)
    assert again[1].to_list() == evaluation.to_list()


def test_eval_sources_win_over_split(tok):
    train, evaluation = build(
        TEN, tok, eval_sources=[src([reward_ids([0, 3], [0, 4], margin=1)], "eval.jsonl")], eval_split_ratio=0.5
    )
    assert len(train) == 10 and evaluation.to_list() == [pair([0, 3], [0, 4], margin=1.0)]


def test_eval_split_ratio_checked(tok):
    message = (
        "eval_split_ratio must be in [0, 1), got 1.0. "
        "Fix: use e.g. 0.05 to hold out 5% of the train rows, or 0 for none."
    )
    check_error(tok, TEN, message, eval_split_ratio=1.0)


def test_every_source_is_validated_before_any_tokenization(tok, monkeypatch):
    import dspref.data.reward as reward_module

    calls = []
    monkeypatch.setattr(reward_module, "_tokenize_source", lambda *a, **k: calls.append(a))
    bad = src([reward_ids([0, 5], [0, 7], [1], [1, 1])], "bad.jsonl")
    with pytest.raises(DataError, match=re.escape("bad.jsonl row 0, column 'attention_mask_chosen': 1 entries")):
        build([src([TEXT_ROW], "good.jsonl")], tok, eval_sources=[bad])
    assert calls == []


# --------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------

BATCH = [pair([5, 6, 7], [8]), pair([9], [10, 11])]


def test_collator_right_padding():
    batch = RewardCollator(pad_token_id=3)(BATCH)
    assert set(batch) == {"input_ids", "attention_mask"}
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [9, 3, 3], [8, 3, 3], [10, 11, 3]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [1, 0, 0], [1, 0, 0], [1, 1, 0]]))
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long


def test_collator_left_padding_with_margin():
    rows = [{**row, "margin": m} for row, m in zip(BATCH, [1, 0.25])]
    batch = RewardCollator(pad_token_id=3, padding_side="left")(rows)
    assert set(batch) == {"input_ids", "attention_mask", "margin"}
    assert torch.equal(batch["input_ids"], torch.tensor([[5, 6, 7], [3, 3, 9], [3, 3, 8], [3, 10, 11]]))
    assert torch.equal(batch["attention_mask"], torch.tensor([[1, 1, 1], [0, 0, 1], [0, 0, 1], [0, 1, 1]]))
    assert batch["margin"].dtype == torch.float32 and batch["margin"].tolist() == [1.0, 0.25]


def test_collator_right_padding_with_margin_and_left_without():
    rows = [{**row, "margin": -2.0} for row in BATCH]
    right = RewardCollator(0)(rows)
    assert right["input_ids"].tolist() == [[5, 6, 7], [9, 0, 0], [8, 0, 0], [10, 11, 0]]
    assert right["margin"].tolist() == [-2.0, -2.0]
    left = RewardCollator(0, padding_side="left")(BATCH)
    assert set(left) == {"input_ids", "attention_mask"}
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9], [0, 0, 8], [0, 10, 11]]


def test_collator_argument_errors():
    with pytest.raises(ValueError, match="needs a pad_token_id"):
        RewardCollator(None)
    with pytest.raises(ValueError, match=re.escape("padding_side must be 'right' or 'left', got 'middle'.")):
        RewardCollator(0, padding_side="middle")


def test_collator_on_built_dataset(demo_tok):
    train, _ = build([DEMO_ROW, {"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"}], demo_tok)
    batch = RewardCollator(demo_tok.pad_token_id)([train[0], train[1]])
    assert batch["input_ids"].shape == (4, 17)
    short = [D_BOS, SORT, COLON] + digits("2 1") + [EQ] + digits("1 2") + [D_EOS]
    assert batch["input_ids"][1].tolist() == short + [D_PAD] * 8
    assert batch["attention_mask"].sum(dim=1).tolist() == [17, 9, 17, 9]
