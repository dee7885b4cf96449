"""Tests for the paired-preference data path: loading, format detection, validation, tokenization,
truncation, eval split and collation.

A small byte-level BPE tokenizer is trained here from a few sentences (nothing is downloaded). Its
special tokens are <s>=0, </s>=1, <pad>=2; its post-processor prepends <s>.

The pinned token ids below were checked by hand against the token strings (given in the comments), and
they are identical to what TRL 1.16 `DPOTrainer._prepare_dataset` produces for the same rows and
tokenizer (`max_length=None`), including the cross-boundary merge cases, the implicit-prompt rows and the
conversational rows.
"""

import json
import logging
import re
import subprocess
import sys

import datasets
import pytest
import torch
from datasets import Dataset, DatasetDict
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from dspref.data.collate import PairedCollator
from dspref.data.formats import DataError, PairedFormat, Source, detect_paired_format, load_sources
from dspref.data.tokenize import build_paired_datasets, tokenize_paired

SENTENCES = [
    "The cat sat on the mat.",
    "The dog ate the bone.",
    "Hello world, hello there.",
    "What color is the sky? The sky is blue.",
    "The grass is green.",
    "user: hi",
    "assistant: hello",
]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
NO_LIMITS = dict(max_length=None, max_prompt_length=None, max_completion_length=None, truncation_mode="keep_end")

BOS, EOS, PAD = 0, 1, 2

# "What color is the sky?" -> <s> What Ġcolor Ġis Ġthe Ġsky ?
SKY_PROMPT_IDS = [BOS, 316, 321, 268, 265, 277, 33]
# " The sky is blue." + </s> -> ĠThe Ġsky Ġis Ġblue . </s>
BLUE_IDS = [298, 277, 268, 320, 16, EOS]
# " The grass is green." + </s> -> ĠThe Ġgrass Ġis Ġgreen . </s>
GREEN_IDS = [298, 312, 268, 322, 16, EOS]
# chat template, prompt with generation prompt -> <s> user : Ġ What Ġcolor Ġis Ġthe Ġsky ? </s> assistant :
CHAT_PROMPT_IDS = [BOS, 295, 28, 223, 316, 321, 268, 265, 277, 33, EOS, 323, 28]

USER = [{"role": "user", "content": "What color is the sky?"}]
BLUE = [{"role": "assistant", "content": "The sky is blue."}]
GREEN = [{"role": "assistant", "content": "The grass is green."}]


@pytest.fixture(scope="module")
def tok():
    """Byte-level BPE tokenizer trained on SENTENCES, BOS post-processor, small chat template."""
    model = Tokenizer(models.BPE())
    model.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    model.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=360,
        special_tokens=["<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    model.train_from_iterator(SENTENCES, trainer)
    model.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=model, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = CHAT_TEMPLATE
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, PAD)
    return tokenizer


@pytest.fixture(autouse=True)
def _datasets_cache(tmp_path, monkeypatch):
    """Keep datasets' file caches inside the test's tmp dir."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_cache"))


def src(rows, name="train.jsonl"):
    return Source(name=name, dataset=Dataset.from_list(rows))


def run(rows_or_sources, tok, **kwargs):
    """Tokenize rows (one in-memory source) or a list of sources; return (list of row dicts, stats)."""
    sources = rows_or_sources if isinstance(rows_or_sources[0], Source) else [src(rows_or_sources)]
    dataset, stats = tokenize_paired(sources, tok, **{**NO_LIMITS, **kwargs})
    assert dataset.column_names == ["prompt_ids", "chosen_ids", "rejected_ids"]
    return dataset.to_list(), stats


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def ids(prompt, chosen, rejected):
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


# --------------------------------------------------------------------------------------------------
# Standard (plain text) rows
# --------------------------------------------------------------------------------------------------


def test_explicit_text_ids_pinned(tok):
    rows = [
        {"prompt": "What color is the sky?", "chosen": " The sky is blue.", "rejected": " The grass is green."},
        # EOS already present on 'rejected': not doubled
        {"prompt": "Hello ", "chosen": "world", "rejected": "there.</s>"},
        {"prompt": "The cat sat on the m", "chosen": "at.", "rejected": "at"},
    ]
    out, stats = run(rows, tok)
    assert out == [
        ids(SKY_PROMPT_IDS, BLUE_IDS, GREEN_IDS),
        # "Hello " alone is <s> Hello Ġ, but "Hello world" is <s> Hello Ġworld: the space merges into the
        # completion's first token, so the prompt stops at the last shared token -> <s> Hello | Ġworld </s>
        ids([BOS, 315], [319, EOS], [305, 16, EOS]),  # rejected: Ġthere . </s>
        # "...the m" alone ends Ġthe Ġ m; with "at." the three become Ġmat -> prompt ends at Ġthe
        ids([BOS, 261, 310, 306, 299, 265], [302, 16, EOS], [302, EOS]),  # The Ġcat Ġsat Ġon Ġthe | Ġmat . </s>
    ]
    assert stats == {"rows": 3, "truncated": 0, "dropped": 0}


def test_prompt_plus_completion_is_the_full_tokenization(tok):
    """The merge rule keeps prompt_ids + chosen_ids equal to tokenizing prompt + chosen + EOS."""
    rows = [{"prompt": "The cat sat on the m", "chosen": "at.", "rejected": "at"}]
    (row,), _ = run(rows, tok)
    assert row["prompt_ids"] + row["chosen_ids"] == tok("The cat sat on the mat.</s>")["input_ids"]
    assert row["prompt_ids"] + row["rejected_ids"] == tok("The cat sat on the mat</s>")["input_ids"]


def test_chosen_identical_to_rejected_is_allowed(tok):
    rows = [{"prompt": "What color is the sky?", "chosen": " The sky is blue.", "rejected": " The sky is blue."}]
    out, _ = run(rows, tok)
    assert out == [ids(SKY_PROMPT_IDS, BLUE_IDS, BLUE_IDS)]


def test_implicit_text_prompt_extraction(tok):
    rows = [
        # shared prefix "What color is the sky? The " -> the space before the first difference goes to the
        # completions (as TRL's extract_prompt): prompt "What color is the sky? The"
        {"chosen": "What color is the sky? The sky is blue.", "rejected": "What color is the sky? The grass is green."},
        # one is a prefix of the other: the prompt stops one character short ("Hello worl")
        {"chosen": "Hello world", "rejected": "Hello world!"},
    ]
    source = src(rows)
    assert detect_paired_format(source) == PairedFormat("implicit", False)
    out, _ = run([source], tok)
    assert out == [
        ids(SKY_PROMPT_IDS + [298], [277, 268, 320, 16, EOS], [312, 268, 322, 16, EOS]),
        ids([BOS, 315], [319, EOS], [319, 3, EOS]),  # <s> Hello | Ġworld </s> / Ġworld ! </s>
    ]


# --------------------------------------------------------------------------------------------------
# Conversational and pre-tokenized rows
# --------------------------------------------------------------------------------------------------


def test_conversational_explicit_ids_pinned(tok):
    source = src([{"prompt": USER, "chosen": BLUE, "rejected": GREEN}])
    assert detect_paired_format(source) == PairedFormat("explicit", True)
    out, _ = run([source], tok)
    # completion: ĠThe Ġsky Ġis Ġblue . </s> -- the </s> comes from the template, none is appended
    assert out == [ids(CHAT_PROMPT_IDS, BLUE_IDS, GREEN_IDS)]


def test_conversational_implicit_prompt_is_the_shared_messages(tok):
    rows = [{"chosen": USER + BLUE, "rejected": USER + GREEN}]
    source = src(rows)
    assert detect_paired_format(source) == PairedFormat("implicit", True)
    out, _ = run([source], tok)
    assert out == [ids(CHAT_PROMPT_IDS, BLUE_IDS, GREEN_IDS)]


def test_string_prompt_with_conversational_completions_is_implicit(tok):
    """UltraFeedback style: the string prompt is ignored, the prompt comes from the shared messages."""
    source = src([{"prompt": "What color is the sky?", "chosen": USER + BLUE, "rejected": USER + GREEN}])
    assert detect_paired_format(source) == PairedFormat("implicit", True)
    out, _ = run([source], tok)
    assert out == [ids(CHAT_PROMPT_IDS, BLUE_IDS, GREEN_IDS)]


def test_chat_template_argument_replaces_the_tokenizers(tok):
    template = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}"
    out, _ = run([{"prompt": USER, "chosen": BLUE, "rejected": GREEN}], tok, chat_template=template)
    # What Ġcolor Ġis Ġthe Ġsky ? </s> | The Ġsky Ġis Ġblue . </s>   (no BOS: this template has none)
    prompt = [316, 321, 268, 265, 277, 33, EOS]
    assert out == [ids(prompt, [261, 277, 268, 320, 16, EOS], [261, 312, 268, 322, 16, EOS])]


def test_message_extra_keys_set_to_none_by_arrow_are_dropped(tok):
    """Arrow gives every message every key of the column; the template must not see name=None."""
    template = "{% for m in messages %}{% if 'name' in m %}NAME{% endif %}{{ m['content'] }}{% endfor %}"
    rows = [{"prompt": [{"role": "user", "content": "Hello", "name": "x"}], "chosen": BLUE, "rejected": GREEN}]
    (row,), _ = run(rows, tok, chat_template=template)
    assert tok.decode(row["chosen_ids"]) == "The sky is blue."


def test_no_bos_when_the_tokenizer_adds_none(tok):
    backend = Tokenizer.from_str(tok.backend_tokenizer.to_str())
    backend.post_processor = processors.ByteLevel(trim_offsets=False)  # adds no special tokens
    plain = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    out, _ = run([TEXT_ROW], plain)
    assert out == [ids(SKY_PROMPT_IDS[1:], BLUE_IDS, GREEN_IDS)]


def test_pretokenized_rows_used_as_given(tok):
    rows = [ids([BOS, 10, 11], [12, EOS], [13, 14]), ids([5], [6], [7])]
    source = src(rows)
    assert detect_paired_format(source) == PairedFormat("pretokenized", False)
    out, _ = run([source], tok)
    assert out == rows


# --------------------------------------------------------------------------------------------------
# Loading files
# --------------------------------------------------------------------------------------------------

TEXT_ROW = {"prompt": "What color is the sky?", "chosen": " The sky is blue.", "rejected": " The grass is green."}
TEXT_IDS = ids(SKY_PROMPT_IDS, BLUE_IDS, GREEN_IDS)


def test_load_every_file_kind_and_mix_them(tok, tmp_path):
    jsonl = write_jsonl(tmp_path / "a.jsonl", [TEXT_ROW])
    array = tmp_path / "b.json"
    array.write_text(json.dumps([{"chosen": USER + BLUE, "rejected": USER + GREEN}]))
    parquet = str(tmp_path / "c.parquet")
    Dataset.from_list([ids([5], [6], [7])]).to_parquet(parquet)
    csv = str(tmp_path / "d.csv")
    Dataset.from_list([TEXT_ROW]).to_csv(csv, index=False)
    saved = str(tmp_path / "e_saved")
    Dataset.from_list([{"prompt": USER, "chosen": BLUE, "rejected": GREEN}]).save_to_disk(saved)
    saved_dict = str(tmp_path / "f_dict")
    splits = {"train": Dataset.from_list([ids([8], [9], [10])]), "test": Dataset.from_list([TEXT_ROW])}
    DatasetDict(splits).save_to_disk(saved_dict)
    files = [jsonl, str(array), parquet, csv, saved, saved_dict]
    sources = load_sources(files, split="test")
    assert [s.name for s in sources] == files
    kinds = [detect_paired_format(s) for s in sources]
    assert [(k.kind, k.conversational) for k in kinds] == [
        ("explicit", False), ("implicit", True), ("pretokenized", False),
        ("explicit", False), ("explicit", True), ("explicit", False),
    ]  # fmt: skip
    out, stats = run(sources, tok)
    chat = ids(CHAT_PROMPT_IDS, BLUE_IDS, GREEN_IDS)
    assert out == [TEXT_IDS, chat, ids([5], [6], [7]), TEXT_IDS, chat, TEXT_IDS]
    assert stats == {"rows": 6, "truncated": 0, "dropped": 0}


def test_load_sources_accepts_none_and_a_single_path(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [TEXT_ROW, TEXT_ROW])
    assert load_sources(None) == []
    (source,) = load_sources(path)
    assert source.name == path and len(source.dataset) == 2


def test_load_missing_file(tmp_path):
    path = str(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match=re.escape(f"{path}: file not found. Fix: check the path")):
        load_sources([path])


def test_load_unknown_extension(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("hello")
    message = (
        f"{path}: unsupported file extension '.txt'. Fix: use one of .json, .jsonl, .parquet, .csv, "
        "or a folder written by Dataset.save_to_disk."
    )
    with pytest.raises(DataError, match=re.escape(message)):
        load_sources([str(path)])


def test_load_dataset_dict_without_the_split(tmp_path):
    path = str(tmp_path / "dd")
    DatasetDict({"train": Dataset.from_list([TEXT_ROW])}).save_to_disk(path)
    with pytest.raises(DataError, match=re.escape(f"{path}: has no split 'eval'; found splits ['train']. Fix: ")):
        load_sources([path], split="eval")


# --------------------------------------------------------------------------------------------------
# Truncation (pre-tokenized rows make the lengths easy to read)
# --------------------------------------------------------------------------------------------------

# prompt 5 tokens, chosen 4, rejected 2
LONG = ids([BOS, 10, 11, 12, 13], [20, 21, 22, EOS], [30, EOS])


def test_max_completion_length_keeps_the_start(tok):
    out, stats = run([LONG], tok, max_completion_length=3)
    assert out == [ids([BOS, 10, 11, 12, 13], [20, 21, 22], [30, EOS])]
    assert stats["truncated"] == 1


def test_prompt_cut_keep_end(tok):
    # 5 + 4 > 7 -> prompt cut to its last 3 tokens; 3 + 4 fits
    out, _ = run([LONG], tok, max_length=7, max_prompt_length=3, truncation_mode="keep_end")
    assert out == [ids([11, 12, 13], [20, 21, 22, EOS], [30, EOS])]


def test_prompt_cut_keep_start(tok):
    out, _ = run([LONG], tok, max_length=7, max_prompt_length=3, truncation_mode="keep_start")
    assert out == [ids([BOS, 10, 11], [20, 21, 22, EOS], [30, EOS])]


def test_prompt_not_cut_when_the_row_fits(tok):
    out, stats = run([LONG], tok, max_length=9, max_prompt_length=3)
    assert out == [LONG] and stats["truncated"] == 0


def test_completions_cut_after_prompt(tok):
    # prompt cut to 3, 3 + 4 > 6 still -> completions cut to 6 - 3 = 3
    out, _ = run([LONG], tok, max_length=6, max_prompt_length=3, truncation_mode="keep_end")
    assert out == [ids([11, 12, 13], [20, 21, 22], [30, EOS])]


def test_completions_cut_without_max_prompt_length(tok):
    out, _ = run([LONG], tok, max_length=7)
    assert out == [ids([BOS, 10, 11, 12, 13], [20, 21], [30, EOS])]


def test_all_rules_together_and_truncated_count(tok, caplog):
    rows = [LONG, ids([BOS, 10], [20, EOS], [30, EOS]), ids([BOS, 10, 11, 12, 13, 14, 15], [20], [30])]
    with caplog.at_level(logging.INFO, logger="dspref.data"):
        limits = dict(max_length=6, max_prompt_length=4, max_completion_length=3, truncation_mode="keep_start")
        out, stats = run(rows, tok, **limits)
    assert out == [
        ids([BOS, 10, 11, 12], [20, 21], [30, EOS]),  # completion 4 -> 3, prompt 5 -> 4, completions -> 2
        ids([BOS, 10], [20, EOS], [30, EOS]),  # fits
        ids([BOS, 10, 11, 12], [20], [30]),  # prompt 7 -> 4
    ]
    assert stats == {"rows": 3, "truncated": 2, "dropped": 0}
    assert "train.jsonl: 2 of 3 rows truncated" in caplog.text


def test_text_rows_are_truncated_in_tokens(tok):
    out, stats = run([TEXT_ROW], tok, max_length=8, max_prompt_length=4, truncation_mode="keep_end")
    # prompt <s> What Ġcolor Ġis Ġthe Ġsky ? -> last 4: Ġis Ġthe Ġsky ? ; completions cut to 8 - 4 = 4
    assert out == [ids([268, 265, 277, 33], BLUE_IDS[:4], GREEN_IDS[:4])]
    assert stats["truncated"] == 1


def test_row_that_cannot_fit(tok):
    rows = [ids([BOS, 10], [20], [30]), LONG]
    message = (
        "train.jsonl row 1, column 'chosen': no completion token left after truncation (prompt 5 tokens, "
        "max_length 5, max_prompt_length None). Fix: raise max_length or lower max_prompt_length."
    )
    with pytest.raises(DataError, match=re.escape(message)):
        run(rows, tok, max_length=5)


def test_row_index_is_right_with_several_workers(tok):
    rows = [ids([BOS, 10], [20], [30])] * 5 + [LONG]
    out, stats = run(rows[:5], tok, max_length=4, num_proc=2)
    assert out == rows[:5] and stats["rows"] == 5
    with pytest.raises(DataError, match=re.escape("train.jsonl row 5, column 'chosen': no completion token left")):
        run(rows, tok, max_length=5, num_proc=2)


def test_bad_truncation_options(tok):
    message = (
        "truncation_mode must be 'keep_end' or 'keep_start', got 'middle'. "
        "Fix: set truncation_mode to one of them."
    )
    with pytest.raises(DataError, match=re.escape(message)):
        run([LONG], tok, truncation_mode="middle")
    message = "max_length must be a positive integer or None, got 0. Fix: set max_length >= 1."
    with pytest.raises(DataError, match=re.escape(message)):
        run([LONG], tok, max_length=0)


# --------------------------------------------------------------------------------------------------
# Validation: exact messages
# --------------------------------------------------------------------------------------------------

LAYOUTS = (
    "prompt/chosen/rejected (explicit prompt), chosen/rejected (implicit prompt) "
    "or prompt_ids/chosen_ids/rejected_ids (pre-tokenized)"
)


def check_error(tok, rows_or_sources, message, **kwargs):
    with pytest.raises(DataError, match="^" + re.escape(message) + "$"):
        run(rows_or_sources, tok, **kwargs)


def test_missing_column(tok):
    message = (
        f"train.jsonl: missing column(s) ['rejected']; found columns ['prompt', 'chosen']; expected {LAYOUTS}. "
        "Fix: add or rename the columns."
    )
    check_error(tok, [{"prompt": "a", "chosen": "b"}], message)


def test_mistyped_column(tok):
    message = (
        "train.jsonl: column 'choosen' is not a known column; did you mean 'chosen'? "
        f"Found columns ['prompt', 'choosen', 'rejected']; expected {LAYOUTS}. Fix: rename 'choosen' to 'chosen'."
    )
    check_error(tok, [{"prompt": "a", "choosen": "b", "rejected": "c"}], message)


def test_mistyped_prompt_is_not_taken_for_an_implicit_dataset(tok):
    message = (
        "train.jsonl: column 'promt' is not a known column; did you mean 'prompt'? "
        f"Found columns ['promt', 'chosen', 'rejected']; expected {LAYOUTS}. Fix: rename 'promt' to 'prompt'."
    )
    check_error(tok, [{"promt": "a b", "chosen": "a c", "rejected": "a d"}], message)


def test_extra_columns_are_ignored(tok):
    rows = [{**TEXT_ROW, "prompt_id": "abc", "score_chosen": 1.0}]
    out, _ = run(rows, tok)
    assert out == [TEXT_IDS]


def test_wrong_type_number_instead_of_string(tok, tmp_path):
    path = write_jsonl(tmp_path / "train.jsonl", [TEXT_ROW, TEXT_ROW, TEXT_ROW, {**TEXT_ROW, "chosen": 3}])
    message = (
        f"{path} row 3, column 'chosen': expected a string, got int (3). "
        "Fix: make every 'chosen' value a string (or every text column a list of messages)."
    )
    check_error(tok, load_sources([path]), message)


def test_wrong_type_string_instead_of_conversation(tok, tmp_path):
    rows = [{"prompt": USER, "chosen": BLUE, "rejected": GREEN}, {"prompt": "hi", "chosen": BLUE, "rejected": GREEN}]
    path = write_jsonl(tmp_path / "conv.jsonl", rows)
    message = (
        f"{path} row 1, column 'prompt': expected a list of messages, got str ('hi'). "
        """Fix: make every 'prompt' value a list like [{"role": "user", "content": "..."}]."""
    )
    check_error(tok, load_sources([path]), message)


def test_conversation_that_is_not_a_list_of_dicts(tok, tmp_path):
    rows = [{"prompt": USER, "chosen": BLUE, "rejected": GREEN}, {"prompt": USER, "chosen": ["hi"], "rejected": GREEN}]
    path = write_jsonl(tmp_path / "conv.jsonl", rows)
    message = (
        f"{path} row 1, column 'chosen': message 0 is a str, not a dict. "
        """Fix: make every 'chosen' value a list like [{"role": "user", "content": "..."}]."""
    )
    check_error(tok, load_sources([path]), message)


@pytest.mark.parametrize("column", ["prompt", "chosen", "rejected"])
def test_empty_string(tok, column):
    what = "prompt" if column == "prompt" else "completion"
    rows = [TEXT_ROW, {**TEXT_ROW, column: ""}]
    message = (
        f"train.jsonl row 1, column '{column}': empty {what}. "
        f"Fix: remove the row or give it a non-empty '{column}'."
    )
    check_error(tok, rows, message)


def test_empty_conversation(tok):
    rows = [{"prompt": USER, "chosen": BLUE, "rejected": GREEN}, {"prompt": USER, "chosen": BLUE, "rejected": []}]
    message = (
        "train.jsonl row 1, column 'rejected': empty completion. "
        "Fix: remove the row or give it a non-empty 'rejected'."
    )
    check_error(tok, rows, message)


def test_empty_conversation_in_the_first_row(tok):
    rows = [{"prompt": USER, "chosen": [], "rejected": GREEN}, {"prompt": USER, "chosen": BLUE, "rejected": GREEN}]
    message = (
        "train.jsonl row 0, column 'chosen': empty completion. "
        "Fix: remove the row or give it a non-empty 'chosen'."
    )
    check_error(tok, rows, message)


def test_bad_role(tok):
    rows = [{"prompt": USER, "chosen": [{"role": "bot", "content": "x"}], "rejected": GREEN}]
    message = (
        "train.jsonl row 0, column 'chosen': message 0 has role 'bot'; allowed roles are system, user, assistant, "
        "tool. Fix: change the role to one of them."
    )
    check_error(tok, rows, message)


def test_missing_content(tok):
    rows = [{"prompt": USER + [{"role": "assistant"}], "chosen": BLUE, "rejected": GREEN}]
    message = (
        "train.jsonl row 0, column 'prompt': message 1 has no 'content'. "
        "Fix: give every message a 'content' string."
    )
    check_error(tok, rows, message)


def test_implicit_without_shared_prefix(tok):
    rows = [{"chosen": "Hello world", "rejected": "Hello there"}, {"chosen": "Yes", "rejected": "No"}]
    message = (
        "train.jsonl row 1, columns 'chosen' and 'rejected': no shared prefix, so no prompt can be extracted. "
        "Fix: add a 'prompt' column, or make 'chosen' and 'rejected' both start with the prompt."
    )
    check_error(tok, rows, message)


def test_implicit_conversation_without_shared_prefix(tok):
    rows = [{"chosen": BLUE, "rejected": GREEN}]
    message = (
        "train.jsonl row 0, columns 'chosen' and 'rejected': no shared prefix, so no prompt can be extracted. "
        "Fix: add a 'prompt' column, or make 'chosen' and 'rejected' both start with the prompt."
    )
    check_error(tok, rows, message)


def test_pretokenized_id_out_of_range(tok):
    rows = [ids([BOS, 10], [20], [30]), ids([BOS, 10], [20, len(tok)], [30])]
    message = (
        f"train.jsonl row 1, column 'chosen_ids': token id {len(tok)} at position 1 is out of range "
        f"(the tokenizer has {len(tok)} tokens). Fix: re-tokenize the data with the model's tokenizer."
    )
    check_error(tok, rows, message)


def test_pretokenized_negative_id(tok):
    message = (
        f"train.jsonl row 0, column 'prompt_ids': token id -1 at position 0 is out of range "
        f"(the tokenizer has {len(tok)} tokens). Fix: re-tokenize the data with the model's tokenizer."
    )
    check_error(tok, [ids([-1], [20], [30])], message)


def test_pretokenized_not_ints(tok, tmp_path):
    path = write_jsonl(tmp_path / "ids.jsonl", [ids([BOS], [20], [30]), ids([BOS], ["a"], [30])])
    message = (
        f"{path} row 1, column 'chosen_ids': expected a list of token ids (ints), got ['a']. "
        "Fix: store 'chosen_ids' as lists of ints."
    )
    check_error(tok, load_sources([path]), message)


def test_pretokenized_whole_floats_are_ids(tok, tmp_path):
    """A float64 id column (e.g. written by pandas) is accepted while every value is whole."""
    path = write_jsonl(tmp_path / "ids.jsonl", [ids([BOS], [3.0], [30]), ids([BOS], [3.5], [30])])
    message = (
        f"{path} row 1, column 'chosen_ids': expected a list of token ids (ints), got [3.5]. "
        "Fix: store 'chosen_ids' as lists of ints."
    )
    check_error(tok, load_sources([path]), message)
    out, _ = run(load_sources([write_jsonl(tmp_path / "ok.jsonl", [ids([BOS], [3.0], [30])])]), tok)
    assert out == [ids([BOS], [3], [30])]


def test_pretokenized_empty(tok):
    message = (
        "train.jsonl row 0, column 'rejected_ids': empty completion. "
        "Fix: remove the row or give it a non-empty 'rejected_ids'."
    )
    check_error(tok, [ids([BOS], [20], [])], message)


def test_conversational_rows_need_a_chat_template(tok):
    plain = PreTrainedTokenizerFast(tokenizer_object=tok.backend_tokenizer, bos_token="<s>", eos_token="</s>")
    message = (
        "train.jsonl: the rows are conversational but the tokenizer has no chat template. "
        "Fix: set chat_template_path to a Jinja chat template file."
    )
    check_error(plain, [{"prompt": USER, "chosen": BLUE, "rejected": GREEN}], message)


def test_empty_source(tok):
    source = Source("empty.jsonl", Dataset.from_dict({"prompt": [], "chosen": [], "rejected": []}))
    check_error(tok, [source], "empty.jsonl: has no rows. Fix: remove it from the data files or add rows.")


def test_every_source_is_validated_before_any_tokenization(tok, monkeypatch):
    import dspref.data.tokenize as tokenize_module

    calls = []
    monkeypatch.setattr(tokenize_module, "_tokenize_source", lambda *a, **k: calls.append(a))
    good, bad = src([TEXT_ROW], "good.jsonl"), src([{**TEXT_ROW, "chosen": ""}], "bad.jsonl")
    with pytest.raises(DataError, match=re.escape("bad.jsonl row 0, column 'chosen': empty completion.")):
        run([good, bad], tok)
    with pytest.raises(DataError, match=re.escape("bad.jsonl row 0, column 'chosen': empty completion.")):
        build_paired_datasets([good], [bad], tok, eval_split_ratio=0, seed=0, **NO_LIMITS)
    assert calls == []


# --------------------------------------------------------------------------------------------------
# Train / eval
# --------------------------------------------------------------------------------------------------

TEN = [ids([BOS, 10 + i], [20], [30]) for i in range(10)]


def test_eval_split_sizes_and_determinism(tok):
    train, evaluation = build_paired_datasets([src(TEN)], [], tok, eval_split_ratio=0.25, seed=3, **NO_LIMITS)
    assert (len(train), len(evaluation)) == (7, 3)  # ceil(2.5) rows held out
    train_rows, eval_rows = train.to_list(), evaluation.to_list()
    assert sorted(r["prompt_ids"] for r in train_rows + eval_rows) == sorted(r["prompt_ids"] for r in TEN)
    again = build_paired_datasets([src(TEN)], [], tok, eval_split_ratio=0.25, seed=3, **NO_LIMITS)
    assert again[0].to_list() == train_rows and again[1].to_list() == eval_rows
    other = build_paired_datasets([src(TEN)], [], tok, eval_split_ratio=0.25, seed=4, **NO_LIMITS)
    assert other[1].to_list() != eval_rows


def test_eval_sources_win_over_split_and_zero_ratio_gives_none(tok):
    train, evaluation = build_paired_datasets(
        [src(TEN)], [src([TEXT_ROW], "eval.jsonl")], tok, eval_split_ratio=0.5, seed=0, **NO_LIMITS
    )
    assert len(train) == 10 and evaluation.to_list() == [TEXT_IDS]
    train, evaluation = build_paired_datasets([src(TEN)], None, tok, eval_split_ratio=0.0, seed=0, **NO_LIMITS)
    assert len(train) == 10 and evaluation is None


@pytest.mark.parametrize("ratio", [1.0, -0.1, 1.5])
def test_eval_split_ratio_out_of_range(tok, ratio):
    message = (
        f"eval_split_ratio must be in [0, 1), got {ratio!r}. "
        "Fix: use e.g. 0.05 to hold out 5% of the train rows, or 0 for none."
    )
    with pytest.raises(DataError, match=re.escape(message)):
        build_paired_datasets([src(TEN)], [], tok, eval_split_ratio=ratio, seed=0, **NO_LIMITS)


def test_eval_split_leaving_no_train_rows(tok):
    message = (
        "eval_split_ratio 0.5 of 1 train rows leaves no training rows. "
        "Fix: lower eval_split_ratio or give eval files."
    )
    with pytest.raises(DataError, match=re.escape(message)):
        build_paired_datasets([src(TEN[:1])], [], tok, eval_split_ratio=0.5, seed=0, **NO_LIMITS)


# --------------------------------------------------------------------------------------------------
# Collator
# --------------------------------------------------------------------------------------------------


def test_collator_exact_tensors():
    rows = [ids([5, 6, 7], [8, EOS], [9]), ids([10], [11], [12, 13, EOS])]
    batch = PairedCollator(pad_token_id=PAD)(rows)
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask"}
    expected_ids = [[5, 6, 7, 8, 1], [10, 11, 2, 2, 2], [5, 6, 7, 9, 2], [10, 12, 13, 1, 2]]
    expected_attention = [[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    expected_completion = [[0, 0, 0, 1, 1], [0, 1, 0, 0, 0], [0, 0, 0, 1, 0], [0, 1, 1, 1, 0]]
    assert torch.equal(batch["input_ids"], torch.tensor(expected_ids))
    assert torch.equal(batch["attention_mask"], torch.tensor(expected_attention))
    assert torch.equal(batch["completion_mask"], torch.tensor(expected_completion))
    assert all(t.dtype == torch.long for t in batch.values())


def test_collator_on_tokenized_dataset(tok):
    dataset, _ = tokenize_paired([src([TEXT_ROW])], tok, **NO_LIMITS)
    batch = PairedCollator(tok.pad_token_id)([dataset[0]])
    assert batch["input_ids"].tolist() == [SKY_PROMPT_IDS + BLUE_IDS, SKY_PROMPT_IDS + GREEN_IDS]
    assert batch["completion_mask"].tolist() == [[0] * 7 + [1] * 6] * 2


# --------------------------------------------------------------------------------------------------
# Import cost
# --------------------------------------------------------------------------------------------------


def test_package_import_is_cheap():
    code = (
        "import sys, dspref.data, dspref.data.formats; "
        "heavy = [m for m in ('torch', 'datasets', 'transformers', 'deepspeed') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
