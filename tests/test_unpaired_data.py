"""Tests for the unpaired data path of KTO and BCO (dspref.data.unpaired): layouts, paired -> unpaired order,
label validation, tokenization, truncation, eval split, class balance and the collator with KTO's KL rows.

Tokenizers: the shipped word-level demo tokenizer in launch/demo/model (<s>=1, </s>=2, <pad>=3, <unk>=0; words
are split on whitespace and punctuation, digit d is 9 + d, so its ids are easy to read) and, for merges across
the prompt/completion boundary, the byte-level BPE tokenizer of tests/test_data.py (<s>=0, </s>=1, <pad>=2).

Checked against TRL 1.16 (run from a separate virtualenv, not a dependency; the values are pinned here):
`KTOTrainer._prepare_dataset` (called unbound on a stub trainer with a `KTOConfig`) gave the same prompt_ids,
completion_ids, labels and row order for every text, conversational, implicit and paired row set tokenized
below (PAIRED3, UNPAIRED_TEXT, CONV, the BPE merge rows, max_length=None); its `DataCollatorForUnpairedPreference`
gave the same main and KL tensors as `UnpairedCollator` (TRL pads main and KL rows to separate widths; ours stacks
them in one (2B, T) batch, equal after stripping the padding columns); `unpair_preference_dataset` on 2500 rows
gave [c0..c999, r0..r999, c1000..c1999, r1000..r1999, c2000.., r2000..]; and `maybe_apply_chat_template` gave
the same rendered prompt as prompt_text.
"""

import json
import logging
import re

import pytest
import torch
from datasets import Dataset
from test_data import BLUE, CHAT_PROMPT_IDS, USER, _datasets_cache, tok  # noqa: F401  (fixtures)
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from conftest import DEMO_MODEL
from dspref.data.formats import DataError, Source, load_sources
from dspref.data.unpaired import (
    UnpairedCollator,
    UnpairedFormat,
    build_unpaired_datasets,
    check_balance,
    class_counts,
    detect_unpaired_format,
)

BOS, EOS, PAD, UNK = 1, 2, 3, 0
USER_TOKEN, ASSISTANT_TOKEN, SORT, COLON, EQ = 4, 5, 6, 7, 8
NO_LIMITS = dict(max_length=None, max_prompt_length=None, max_completion_length=None, truncation_mode="keep_end")
COLUMNS = ["prompt_ids", "completion_ids", "label"]


@pytest.fixture(scope="module")
def demo_tok():
    tokenizer = AutoTokenizer.from_pretrained(str(DEMO_MODEL))
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, PAD)
    return tokenizer


def d(text):
    """Ids of space-separated digits in the demo vocabulary."""
    return [9 + int(c) for c in text.split()]


def sort_prompt(digits):
    """<s> sort : <digits> ="""
    return [BOS, SORT, COLON] + d(digits) + [EQ]


def src(rows, name="train.jsonl"):
    return Source(name=name, dataset=Dataset.from_list(rows))


def build(sources, tokenizer, eval_sources=(), eval_split_ratio=0.0, seed=0, **kwargs):
    sources = [src(sources)] if isinstance(sources[0], dict) else sources
    options = {**NO_LIMITS, **kwargs}
    return build_unpaired_datasets(
        sources, list(eval_sources), tokenizer, eval_split_ratio=eval_split_ratio, seed=seed, **options
    )


def rows_of(sources, tokenizer, **kwargs):
    train, evaluation = build(sources, tokenizer, **kwargs)
    assert evaluation is None
    expected = COLUMNS + (["prompt_text"] if kwargs.get("keep_prompt_text") else [])
    assert train.column_names == expected
    return train.to_list()


def row(prompt_ids, completion_ids, label):
    return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "label": label}


def check_error(tokenizer, sources, message, **kwargs):
    with pytest.raises(DataError, match="^" + re.escape(message) + "$"):
        build(sources, tokenizer, **kwargs)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --------------------------------------------------------------------------------------------------
# Unpaired layouts
# --------------------------------------------------------------------------------------------------

UNPAIRED_TEXT = [
    {"prompt": "sort: 2 1 =", "completion": " 1 2", "label": True},
    {"prompt": "sort: 3 1 =", "completion": " 3 1</s>", "label": False},  # EOS present: not doubled
    # "sort: 2 1" + "2 =": "12" is one (unknown) word, so the prompt's last token is not a prefix of the full
    # tokenization; the completion starts where they diverge (TRL's common_prefix_length)
    {"prompt": "sort: 2 1", "completion": "2 =", "label": False},
    {"prompt": "sort: 5 4 =", "completion": " 4 5", "label": True},
]


def test_unpaired_text_ids_pinned(demo_tok):
    source = src(UNPAIRED_TEXT)
    assert detect_unpaired_format(source) == UnpairedFormat("unpaired", False)
    assert rows_of([source], demo_tok) == [
        row(sort_prompt("2 1"), d("1 2") + [EOS], True),
        row(sort_prompt("3 1"), d("3 1") + [EOS], False),
        row([BOS, SORT, COLON, 11], [UNK, EQ, EOS], False),
        row(sort_prompt("5 4"), d("4 5") + [EOS], True),
    ]


CONV = [
    {"prompt": [{"role": "user", "content": "sort: 2 1 ="}], "completion": [{"role": "assistant", "content": "1 2"}],
     "label": True},
    {"prompt": [{"role": "user", "content": "sort: 4 1 ="}], "completion": [{"role": "assistant", "content": "4 1"}],
     "label": False},
]  # fmt: skip


def test_unpaired_conversational_ids_and_prompt_text(demo_tok):
    source = src(CONV)
    assert detect_unpaired_format(source) == UnpairedFormat("unpaired", True)
    out = rows_of([source], demo_tok, keep_prompt_text=True)
    # <|user|> sort : 2 1 = <|assistant|> | 1 2   (the demo template adds no BOS and no EOS)
    assert out == [
        {**row([USER_TOKEN, SORT, COLON] + d("2 1") + [EQ, ASSISTANT_TOKEN], d("1 2"), True),
         "prompt_text": "<|user|> sort: 2 1 = <|assistant|>"},
        {**row([USER_TOKEN, SORT, COLON] + d("4 1") + [EQ, ASSISTANT_TOKEN], d("4 1"), False),
         "prompt_text": "<|user|> sort: 4 1 = <|assistant|>"},
    ]  # fmt: skip


def test_prompt_text_bpe_chat_template_and_plain_text(tok, demo_tok):
    out = rows_of([{"prompt": USER, "completion": BLUE, "label": True}], tok, keep_prompt_text=True)
    assert out[0]["prompt_ids"] == CHAT_PROMPT_IDS
    assert out[0]["prompt_text"] == "<s>user: What color is the sky?</s>assistant:"  # = TRL maybe_apply_chat_template
    out = rows_of(UNPAIRED_TEXT[:1], demo_tok, keep_prompt_text=True)
    assert out[0]["prompt_text"] == "sort: 2 1 ="
    # pre-tokenized rows: the decoded prompt ids, special tokens kept
    out = rows_of([row(sort_prompt("2 1"), d("1 2"), True)], demo_tok, keep_prompt_text=True)
    assert out[0]["prompt_text"] == "<s> sort : 2 1 ="


def test_unpaired_pretokenized_used_as_given(demo_tok):
    rows = [row([BOS, 10, 11], [12, EOS], True), row([5], [6], False)]
    source = src(rows)
    assert detect_unpaired_format(source) == UnpairedFormat("unpaired_pretokenized", False)
    assert rows_of([source], demo_tok) == rows


# --------------------------------------------------------------------------------------------------
# Paired sources -> unpaired rows (TRL's unpair_preference_dataset)
# --------------------------------------------------------------------------------------------------

PAIRED3 = [
    {"prompt": "sort: 2 1 =", "chosen": " 1 2", "rejected": " 2 1"},
    {"prompt": "sort: 3 1 =", "chosen": " 1 3", "rejected": " 3 1"},
    {"prompt": "sort: 5 4 =", "chosen": " 4 5", "rejected": " 5 4"},
]


def test_paired_file_unpaired_in_trl_order(demo_tok, tmp_path):
    """[c0, c1, c2, r0, r1, r2]: the chosen rows of a map batch, then its rejected rows (TRL 1.16 order)."""
    (source,) = load_sources([write_jsonl(tmp_path / "paired.jsonl", PAIRED3)])
    assert detect_unpaired_format(source) == UnpairedFormat("explicit", False)
    assert rows_of([source], demo_tok) == [
        row(sort_prompt("2 1"), d("1 2") + [EOS], True),
        row(sort_prompt("3 1"), d("1 3") + [EOS], True),
        row(sort_prompt("5 4"), d("4 5") + [EOS], True),
        row(sort_prompt("2 1"), d("2 1") + [EOS], False),
        row(sort_prompt("3 1"), d("3 1") + [EOS], False),
        row(sort_prompt("5 4"), d("5 4") + [EOS], False),
    ]


@pytest.mark.parametrize("num_proc", [None, 2])
def test_unpair_order_per_batch_of_1000_rows(demo_tok, num_proc):
    """TRL's batched map unpairs 1000 rows at a time; the order does not depend on num_proc here."""
    n = 1001

    def number(i):  # i as digit ids: 1000 -> [10, 9, 9, 9]
        return [9 + int(c) for c in str(i)]

    paired = [
        {"prompt_ids": [BOS], "chosen_ids": number(i) + [EOS], "rejected_ids": number(i) + [UNK]} for i in range(n)
    ]
    out = rows_of(paired, demo_tok, num_proc=num_proc)
    got = [(int("".join(str(t - 9) for t in r["completion_ids"][:-1])), r["label"]) for r in out]
    expected = [(i, True) for i in range(1000)] + [(i, False) for i in range(1000)] + [(1000, True), (1000, False)]
    assert got == expected
    assert [r["completion_ids"][-1] for r in out] == [EOS if label else UNK for _, label in expected]


@pytest.mark.parametrize(
    "paired, kind, conversational",
    [
        ([{"chosen": "sort: 2 1 = 1 2", "rejected": "sort: 2 1 = 2 1"}], "implicit", False),
        ([{"prompt_ids": sort_prompt("2 1"), "chosen_ids": d("1 2") + [EOS], "rejected_ids": d("2 1") + [EOS]}],
         "pretokenized", False),
    ],
    ids=["implicit", "pretokenized"],
)  # fmt: skip
def test_other_paired_layouts(demo_tok, paired, kind, conversational):
    source = src(paired)
    assert detect_unpaired_format(source) == UnpairedFormat(kind, conversational)
    # implicit: the shared prefix "sort: 2 1 =" is the prompt, the space goes to the completions
    assert rows_of([source], demo_tok) == [
        row(sort_prompt("2 1"), d("1 2") + [EOS], True),
        row(sort_prompt("2 1"), d("2 1") + [EOS], False),
    ]


def test_conversational_paired_layout(demo_tok):
    user = [{"role": "user", "content": "sort: 2 1 ="}]
    paired = [{"prompt": user, "chosen": [{"role": "assistant", "content": "1 2"}],
               "rejected": [{"role": "assistant", "content": "2 1"}]}]  # fmt: skip
    source = src(paired)
    assert detect_unpaired_format(source) == UnpairedFormat("explicit", True)
    prompt = [USER_TOKEN, SORT, COLON] + d("2 1") + [EQ, ASSISTANT_TOKEN]
    out = rows_of([source], demo_tok, keep_prompt_text=True)
    assert out == [
        {**row(prompt, d("1 2"), True), "prompt_text": "<|user|> sort: 2 1 = <|assistant|>"},
        {**row(prompt, d("2 1"), False), "prompt_text": "<|user|> sort: 2 1 = <|assistant|>"},
    ]


def test_each_completion_is_split_on_its_own(tok):
    """The chosen row's boundary does not depend on its rejected partner (TRL's KTO tokenizes rows alone; the
    paired path would cut both at the shorter common prefix)."""
    paired = [{"prompt": "The cat sat on the m", "chosen": "at.", "rejected": " dog."}]
    out = rows_of(paired, tok)
    assert out == [
        # "m" + "at." merge into Ġmat: the prompt stops at Ġthe, the completion is Ġmat . </s>
        row([0, 261, 310, 306, 299, 265], [302, 16, 1], True),
        # no merge: the prompt keeps its Ġ m; the completion is Ġdog . </s>
        row([0, 261, 310, 306, 299, 265, 223, 79], [318, 16, 1], False),
    ]
    for r, text in zip(out, ("The cat sat on the mat.</s>", "The cat sat on the m dog.</s>")):
        assert r["prompt_ids"] + r["completion_ids"] == tok(text)["input_ids"]


def test_sources_of_several_layouts_are_concatenated(demo_tok, tmp_path):
    files = [
        write_jsonl(tmp_path / "a.jsonl", UNPAIRED_TEXT[:1]),
        write_jsonl(tmp_path / "b.jsonl", PAIRED3[:1]),
        write_jsonl(tmp_path / "c.jsonl", [row([BOS], [9], False)]),
    ]
    assert rows_of(load_sources(files), demo_tok, keep_prompt_text=True) == [
        {**row(sort_prompt("2 1"), d("1 2") + [EOS], True), "prompt_text": "sort: 2 1 ="},
        {**row(sort_prompt("2 1"), d("1 2") + [EOS], True), "prompt_text": "sort: 2 1 ="},
        {**row(sort_prompt("2 1"), d("2 1") + [EOS], False), "prompt_text": "sort: 2 1 ="},
        {**row([BOS], [9], False), "prompt_text": "<s>"},
    ]


# --------------------------------------------------------------------------------------------------
# Validation: exact messages
# --------------------------------------------------------------------------------------------------

UNPAIRED_LAYOUTS = (
    "prompt/completion/label (unpaired), prompt_ids/completion_ids/label (pre-tokenized unpaired), or a paired "
    "layout: prompt/chosen/rejected (explicit prompt), chosen/rejected (implicit prompt) or "
    "prompt_ids/chosen_ids/rejected_ids (pre-tokenized)"
)
LABEL_FIX = "Fix: make 'label' true (desirable) or false (undesirable)."


@pytest.mark.parametrize(
    "labels, bad_row, got",
    [
        ([1, 0], 0, "int (1)"),
        (["true", "false"], 0, "str ('true')"),
        ([True, None], 1, "None"),
    ],
    ids=["int", "string", "missing"],
)
def test_label_must_be_a_bool(demo_tok, tmp_path, labels, bad_row, got):
    rows = [{**UNPAIRED_TEXT[0], "label": label} for label in labels]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    message = f"{path} row {bad_row}, column 'label': expected true or false, got {got}. {LABEL_FIX}"
    check_error(demo_tok, load_sources([path]), message)


def test_label_checked_in_pretokenized_rows(demo_tok):
    message = f"train.jsonl row 0, column 'label': expected true or false, got float (1.0). {LABEL_FIX}"
    check_error(demo_tok, [src([row([BOS], [9], 1.0), row([BOS], [9], 1.0)])], message)


def test_missing_label_column(demo_tok):
    message = (
        f"train.jsonl: missing column(s) ['label']; found columns ['prompt', 'completion']; "
        f"expected {UNPAIRED_LAYOUTS}. Fix: add or rename the columns."
    )
    check_error(demo_tok, [{"prompt": "sort: 1 =", "completion": " 1"}], message)


def test_mistyped_label_column(demo_tok):
    message = (
        "train.jsonl: column 'labels' is not a known column; did you mean 'label'? "
        f"Found columns ['prompt', 'completion', 'labels']; expected {UNPAIRED_LAYOUTS}. "
        "Fix: rename 'labels' to 'label'."
    )
    check_error(demo_tok, [{"prompt": "sort: 1 =", "completion": " 1", "labels": True}], message)


def test_no_known_layout(demo_tok):
    message = (
        f"train.jsonl: missing column(s) ['prompt', 'completion', 'label']; found columns ['text']; "
        f"expected {UNPAIRED_LAYOUTS}. Fix: add or rename the columns."
    )
    check_error(demo_tok, [{"text": "sort: 1 = 1"}], message)


def test_incomplete_paired_layout_gets_the_paired_message(demo_tok):
    message = (
        "train.jsonl: missing column(s) ['rejected']; found columns ['prompt', 'chosen']; expected "
        "prompt/chosen/rejected (explicit prompt), chosen/rejected (implicit prompt) or "
        "prompt_ids/chosen_ids/rejected_ids (pre-tokenized). Fix: add or rename the columns."
    )
    check_error(demo_tok, [{"prompt": "a", "chosen": "b"}], message)


def test_value_checks_are_the_paired_paths(demo_tok):
    check_error(
        demo_tok, [UNPAIRED_TEXT[0], {**UNPAIRED_TEXT[0], "completion": ""}],
        "train.jsonl row 1, column 'completion': empty completion. "
        "Fix: remove the row or give it a non-empty 'completion'.",
    )  # fmt: skip
    check_error(
        demo_tok, [{**CONV[0], "completion": [{"role": "bot", "content": "1"}]}],
        "train.jsonl row 0, column 'completion': message 0 has role 'bot'; allowed roles are system, user, "
        "assistant, tool. Fix: change the role to one of them.",
    )  # fmt: skip
    check_error(
        demo_tok, [{**CONV[0], "prompt": "sort: 1 ="}],
        "train.jsonl row 0, column 'prompt': expected a list of messages, got str ('sort: 1 ='). "
        """Fix: make every 'prompt' value a list like [{"role": "user", "content": "..."}].""",
    )  # fmt: skip
    n = len(demo_tok)
    check_error(
        demo_tok, [row([BOS], [9, n], True)],
        f"train.jsonl row 0, column 'completion_ids': token id {n} at position 1 is out of range "
        f"(the tokenizer has {n} tokens). Fix: re-tokenize the data with the model's tokenizer.",
    )  # fmt: skip
    check_error(
        demo_tok, [{"chosen": "sort: 1 = 1", "rejected": "no"}],
        "train.jsonl row 0, columns 'chosen' and 'rejected': no shared prefix, so no prompt can be extracted. "
        "Fix: add a 'prompt' column, or make 'chosen' and 'rejected' both start with the prompt.",
    )  # fmt: skip


def test_conversational_rows_need_a_chat_template(demo_tok):
    plain = PreTrainedTokenizerFast(tokenizer_object=demo_tok.backend_tokenizer, eos_token="</s>", pad_token="<pad>")
    message = (
        "train.jsonl: the rows are conversational but the tokenizer has no chat template. "
        "Fix: set chat_template_path to a Jinja chat template file."
    )
    check_error(plain, CONV, message)


def test_empty_source_and_no_sources(demo_tok):
    empty = Source("empty.jsonl", Dataset.from_dict({"prompt": [], "completion": [], "label": []}))
    check_error(demo_tok, [empty], "empty.jsonl: has no rows. Fix: remove it from the data files or add rows.")
    with pytest.raises(DataError, match=re.escape("no data given. Fix: pass data files or a dataset name.")):
        build_unpaired_datasets([], [], demo_tok, eval_split_ratio=0, seed=0, **NO_LIMITS)


def test_every_source_is_validated_before_any_tokenization(demo_tok, monkeypatch):
    import dspref.data.unpaired as unpaired_module

    calls = []
    monkeypatch.setattr(unpaired_module, "_tokenize_sources", lambda *a, **k: calls.append(a))
    good, bad = src(UNPAIRED_TEXT, "good.jsonl"), src([{**UNPAIRED_TEXT[0], "label": 1}], "bad.jsonl")
    message = f"bad.jsonl row 0, column 'label': expected true or false, got int (1). {LABEL_FIX}"
    with pytest.raises(DataError, match=re.escape(message)):
        build([good], demo_tok, eval_sources=[bad])
    assert calls == []


# --------------------------------------------------------------------------------------------------
# Truncation (the paired path's rules on one completion; pre-tokenized rows make lengths easy to read)
# --------------------------------------------------------------------------------------------------

LONG = row([BOS, 10, 11, 12, 13], [14, 15, 16, EOS], True)  # prompt 5 tokens, completion 4


@pytest.mark.parametrize(
    "limits, expected",
    [
        (dict(max_completion_length=3), row([BOS, 10, 11, 12, 13], [14, 15, 16], True)),
        (dict(max_length=7, max_prompt_length=3, truncation_mode="keep_end"),
         row([11, 12, 13], [14, 15, 16, EOS], True)),
        (dict(max_length=7, max_prompt_length=3, truncation_mode="keep_start"),
         row([BOS, 10, 11], [14, 15, 16, EOS], True)),
        (dict(max_length=6, max_prompt_length=3), row([11, 12, 13], [14, 15, 16], True)),
        (dict(max_length=7), row([BOS, 10, 11, 12, 13], [14, 15], True)),
        (dict(max_length=9, max_prompt_length=3), LONG),
    ],
    ids=["completion", "keep_end", "keep_start", "prompt-then-completion", "completion-only", "fits"],
)  # fmt: skip
def test_truncation_rules(demo_tok, limits, expected):
    assert rows_of([LONG], demo_tok, **limits) == [expected]


def test_truncated_count_is_logged(demo_tok, caplog):
    rows = [LONG, row([BOS], [9, EOS], False), row([BOS, 10, 11, 12, 13, 14], [17], False)]
    with caplog.at_level(logging.INFO, logger="dspref.data"):
        out = rows_of(rows, demo_tok, max_length=6, max_prompt_length=4, truncation_mode="keep_start")
    assert out == [row([BOS, 10, 11, 12], [14, 15], True), rows[1], row([BOS, 10, 11, 12], [17], False)]
    assert "train.jsonl: 2 of 3 rows truncated" in caplog.text
    with caplog.at_level(logging.INFO, logger="dspref.data"):
        rows_of(PAIRED3, demo_tok, max_completion_length=2)  # every completion is 3 tokens
    assert "train.jsonl: 6 of 6 rows truncated" in caplog.text


def test_text_rows_truncated_in_tokens(demo_tok):
    out = rows_of(UNPAIRED_TEXT[:1], demo_tok, max_length=6, max_prompt_length=4)
    # <s> sort : 2 1 = (6) + 1 2 </s> (3) > 6 -> prompt keeps its last 4, completion cut to 6 - 4 = 2
    assert out == [row([COLON] + d("2 1") + [EQ], d("1 2"), True)]


def test_row_that_cannot_fit(demo_tok):
    message = (
        "train.jsonl row 1, column 'completion_ids': no completion token left after truncation (prompt 5 tokens, "
        "max_length 5, max_prompt_length None). Fix: raise max_length or lower max_prompt_length."
    )
    check_error(demo_tok, [row([BOS], [9], True), LONG], message, max_length=5)
    message = (
        "train.jsonl row 1, column 'chosen': no completion token left after truncation (prompt 6 tokens, "
        "max_length 6, max_prompt_length None). Fix: raise max_length or lower max_prompt_length."
    )
    rows = [{"prompt": "sort: 2 =", "chosen": " 2", "rejected": " 3"}, PAIRED3[0]]  # prompts of 5 and 6 tokens
    check_error(demo_tok, rows, message, max_length=6)


# --------------------------------------------------------------------------------------------------
# Train / eval
# --------------------------------------------------------------------------------------------------

TEN = [row([BOS, 9 + i], [9], i % 2 == 0) for i in range(10)]


def test_eval_split_and_eval_sources(demo_tok):
    train, evaluation = build(TEN, demo_tok, eval_split_ratio=0.25, seed=3)
    assert (len(train), len(evaluation)) == (7, 3)
    assert sorted(map(str, train.to_list() + evaluation.to_list())) == sorted(map(str, TEN))
    again = build(TEN, demo_tok, eval_split_ratio=0.25, seed=3)
    assert again[0].to_list() == train.to_list() and again[1].to_list() == evaluation.to_list()
    train, evaluation = build(TEN, demo_tok, eval_sources=[src(PAIRED3[:1], "eval.jsonl")], eval_split_ratio=0.5)
    assert len(train) == 10 and [r["label"] for r in evaluation.to_list()] == [True, False]


def test_eval_split_ratio_checked(demo_tok):
    message = (
        "eval_split_ratio must be in [0, 1), got 1.0. "
        "Fix: use e.g. 0.05 to hold out 5% of the train rows, or 0 for none."
    )
    with pytest.raises(DataError, match=re.escape(message)):
        build(TEN, demo_tok, eval_split_ratio=1.0)


# --------------------------------------------------------------------------------------------------
# Class counts and balance
# --------------------------------------------------------------------------------------------------


def test_class_counts(demo_tok):
    implicit = src([{"chosen": "sort: 2 1 = 1 2", "rejected": "sort: 2 1 = 2 1"}], "implicit.jsonl")
    train, _ = build([src(PAIRED3), implicit], demo_tok)
    assert class_counts(train) == (4, 4)
    assert class_counts(Dataset.from_list(TEN)) == (5, 5)
    assert class_counts(Dataset.from_list(UNPAIRED_TEXT[:1])) == (1, 0)


def test_check_balance_fine():
    assert check_balance(3, 3, 1.0, 1.0) is None
    assert check_balance(4, 3, 1.0, 1.0) is None  # ratio 4/3: the upper end
    assert check_balance(10, 30, 1.0, 0.3333) is None  # the weight the warning below suggests


def test_check_balance_warning_prints_the_weights():
    assert check_balance(10, 30, 1.0, 1.0) == (
        "class balance: 10 desirable and 30 undesirable rows with desirable_weight=1 and undesirable_weight=1 give "
        "desirable_weight*n_desirable / (undesirable_weight*n_undesirable) = 0.3333, outside the range [1, 4/3] "
        "recommended by the KTO paper (Eq. 8). Fix: keep desirable_weight=1 and set undesirable_weight=0.3333 "
        "(ratio 1), or any undesirable_weight in [0.25, 0.3333]; or keep undesirable_weight=1 and set "
        "desirable_weight in [3, 4]. Change one weight, not both."
    )
    assert check_balance(30, 10, 1.0, 1.0) == (
        "class balance: 30 desirable and 10 undesirable rows with desirable_weight=1 and undesirable_weight=1 give "
        "desirable_weight*n_desirable / (undesirable_weight*n_undesirable) = 3, outside the range [1, 4/3] "
        "recommended by the KTO paper (Eq. 8). Fix: keep desirable_weight=1 and set undesirable_weight=3 "
        "(ratio 1), or any undesirable_weight in [2.25, 3]; or keep undesirable_weight=1 and set "
        "desirable_weight in [0.3334, 0.4444]. Change one weight, not both."
    )
    # equal counts but unequal weights (TRL only checks when the counts differ)
    assert check_balance(3, 3, 2.0, 1.0).endswith(
        "Fix: keep desirable_weight=2 and set undesirable_weight=2 (ratio 1), or any undesirable_weight in "
        "[1.5, 2]; or keep undesirable_weight=1 and set desirable_weight in [1, 1.333]. Change one weight, not both."
    )


def test_check_balance_missing_class():
    message = (
        "the training data has no undesirable rows (label false); KTO/BCO need both. Fix: add rows with label "
        "false (undesirable completions) next to the desirable ones, or give paired data (prompt/chosen/rejected), "
        "which yields both."
    )
    with pytest.raises(DataError, match="^" + re.escape(message) + "$"):
        check_balance(5, 0, 1.0, 1.0)
    message = (
        "the training data has no desirable rows (label true); KTO/BCO need both. Fix: add rows with label "
        "true (desirable completions) next to the undesirable ones, or give paired data (prompt/chosen/rejected), "
        "which yields both."
    )
    with pytest.raises(DataError, match="^" + re.escape(message) + "$"):
        check_balance(0, 5, 1.0, 1.0)


# --------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------

BATCH = [row([5, 6, 7], [8, EOS], True), row([10], [11], False), row([12, 13], [14, 15, EOS], False)]


def test_collator_without_kl_exact_tensors():
    batch = UnpairedCollator(PAD, with_kl=False)(BATCH)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "label"}
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2], [10, 11, 3, 3, 3], [12, 13, 14, 15, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1, 1], [0, 1, 0, 0, 0], [0, 0, 1, 1, 1]]
    assert batch["label"].dtype == torch.bool and batch["label"].tolist() == [True, False, False]
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "attention_mask", "completion_mask"))


def test_collator_kl_rows_rotate_like_trl():
    """KL row i = prompt_i + completion_{i-1}, the first prompt with the last completion. TRL 1.16
    (`KTOTrainer._prepare_dataset.add_kl_completion_ids`: `[completion_ids[-1]] + completion_ids[:-1]` per chunk of
    per_device_train_batch_size rows) gave these KL_input_ids / KL_completion_mask for the same three rows with
    per_device_train_batch_size=3. B = 3 pins the direction (with B = 2 both rotations agree)."""
    batch = UnpairedCollator(PAD, with_kl=True)(BATCH)
    assert batch["input_ids"].tolist() == [
        [5, 6, 7, 8, 2, 3],
        [10, 11, 3, 3, 3, 3],
        [12, 13, 14, 15, 2, 3],
        [5, 6, 7, 14, 15, 2],  # prompt 0 + completion 2
        [10, 8, 2, 3, 3, 3],  # prompt 1 + completion 0
        [12, 13, 11, 3, 3, 3],  # prompt 2 + completion 1
    ]
    assert batch["attention_mask"].tolist() == [
        [1, 1, 1, 1, 1, 0], [1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0], [1, 1, 1, 0, 0, 0],
    ]  # fmt: skip
    assert batch["completion_mask"].tolist() == [
        [0, 0, 0, 1, 1, 0], [0, 1, 0, 0, 0, 0], [0, 0, 1, 1, 1, 0],
        [0, 0, 0, 1, 1, 1], [0, 1, 1, 0, 0, 0], [0, 0, 1, 0, 0, 0],
    ]  # fmt: skip
    assert batch["label"].tolist() == [True, False, False]  # (B,): one label per row, not per KL row


def test_collator_kl_rows_cut_to_max_length(demo_tok):
    """TRL's collator keeps the first max_length tokens of each sequence; a KL row (a long prompt with another
    row's long completion) can exceed max_length although every row fits. Same tensors as TRL 1.16 on these rows
    (max_length=13, per_device_train_batch_size=3)."""
    rows = [
        {"prompt": "sort: 2 1 =", "completion": " 1 2", "label": True},
        {"prompt": "sort: 4 =", "completion": " 9 8 7 6 5 4 3", "label": False},  # 5 + 8 = 13 tokens
        {"prompt": "sort: 9 8 7 6 5 =", "completion": " 5", "label": True},  # 9 + 2 tokens
    ]
    dataset, _ = build(rows, demo_tok, max_length=13)
    batch = UnpairedCollator(PAD, with_kl=True, max_length=13)(dataset.to_list())
    kl_ids = batch["input_ids"][3:].tolist()
    assert kl_ids == [
        sort_prompt("2 1") + [14, EOS] + [PAD] * 5,
        sort_prompt("4") + d("1 2") + [EOS] + [PAD] * 5,
        sort_prompt("9 8 7 6 5") + d("9 8 7 6"),  # 9 + 8 tokens cut to 13
    ]
    assert batch["completion_mask"][5].tolist() == [0] * 9 + [1] * 4
    assert batch["input_ids"].shape == (6, 13)


def test_collator_kl_needs_two_rows():
    message = "UnpairedCollator: a micro-batch of 1 has no mismatched pair for the KL term"
    with pytest.raises(ValueError, match=re.escape(message)):
        UnpairedCollator(PAD, with_kl=True)(BATCH[:1])
    assert UnpairedCollator(PAD, with_kl=False)(BATCH[:1])["input_ids"].tolist() == [[5, 6, 7, 8, 2]]


def test_collator_on_built_dataset_with_prompt_text(demo_tok):
    dataset, _ = build(PAIRED3[:2], demo_tok, keep_prompt_text=True)
    batch = UnpairedCollator(demo_tok.pad_token_id, with_kl=True)(dataset.select(range(2)).to_list())
    assert batch["input_ids"].tolist() == [
        sort_prompt("2 1") + d("1 2") + [EOS],
        sort_prompt("3 1") + d("1 3") + [EOS],
        sort_prompt("2 1") + d("1 3") + [EOS],
        sort_prompt("3 1") + d("1 2") + [EOS],
    ]
    assert batch["label"].tolist() == [True, True]
