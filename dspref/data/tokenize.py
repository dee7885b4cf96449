"""Tokenization of paired-preference sources into prompt_ids / chosen_ids / rejected_ids.

Every row of every source is validated before anything is tokenized (a bad row in the last file must
not cost a long tokenization first). Each source is then tokenized with `Dataset.map` (cached by datasets
fingerprinting, `num_proc` workers) and the results are concatenated.

The token split follows TRL 1.16 `DPOTrainer._prepare_dataset`: the prompt and prompt+completion are
tokenized separately (standard rows get the tokenizer's default special tokens and an EOS appended to the
completion text; conversational rows go through the chat template), and the completion starts where
the prompt's ids stop being a prefix of *both* prompt+chosen and prompt+rejected. So when a token merges
across the prompt/completion boundary, the merged token belongs to the completion and
prompt_ids + chosen_ids is exactly the tokenization of prompt + chosen.
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import math
import sys
from dataclasses import dataclass

import datasets

from .formats import (
    ID_COLUMNS,
    DataError,
    PairedFormat,
    detect_paired_format,
    split_implicit_prompt,
    validate_paired_rows,
)

logger = logging.getLogger("dspref.data")

TRUNCATION_MODES = ("keep_end", "keep_start")


@dataclass(frozen=True)
class Limits:
    """Length limits in tokens (None = no limit) and how an over-long prompt is cut."""

    max_length: int | None
    max_prompt_length: int | None
    max_completion_length: int | None
    truncation_mode: str


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def tokenize_paired(
    sources,
    tokenizer,
    *,
    max_length,
    max_prompt_length,
    max_completion_length,
    truncation_mode,
    num_proc=None,
    chat_template=None,
):
    """Validate, then tokenize every source; return (dataset, stats).

    The dataset has columns prompt_ids, chosen_ids, rejected_ids (lists of int); stats is
    {"rows": N, "truncated": k, "dropped": 0} (rows that cannot fit raise DataError instead of being dropped).
    """
    limits = make_limits(max_length, max_prompt_length, max_completion_length, truncation_mode)
    formats = validate_sources(sources, tokenizer, chat_template=chat_template)
    return _tokenize_sources(sources, formats, tokenizer, limits, num_proc=num_proc, chat_template=chat_template)


def build_paired_datasets(train_sources, eval_sources, tokenizer, *, eval_split_ratio, seed, **tok_kwargs):
    """Tokenize train and eval sources; return (train_dataset, eval_dataset or None).

    All sources (train and eval) are validated before any is tokenized. With no eval sources and
    `eval_split_ratio` > 0, that fraction of the tokenized train rows (rounded up) is held out as the eval
    set, deterministically for a given `seed`. `tok_kwargs` are `tokenize_paired`'s keyword arguments.
    """
    ratio = _check_ratio(eval_split_ratio)
    eval_sources = list(eval_sources or [])
    num_proc = tok_kwargs.pop("num_proc", None)
    chat_template = tok_kwargs.pop("chat_template", None)
    limits = make_limits(**tok_kwargs)
    train_formats = validate_sources(train_sources, tokenizer, chat_template=chat_template)
    eval_formats = validate_sources(eval_sources, tokenizer, chat_template=chat_template) if eval_sources else []

    tok = dict(num_proc=num_proc, chat_template=chat_template)
    train, _ = _tokenize_sources(train_sources, train_formats, tokenizer, limits, **tok)
    if eval_sources:
        evaluation, _ = _tokenize_sources(eval_sources, eval_formats, tokenizer, limits, **tok)
        return train, evaluation
    if ratio == 0:
        return train, None
    return _hold_out(train, ratio, seed)


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------


def make_limits(max_length, max_prompt_length, max_completion_length, truncation_mode) -> Limits:
    """Check the length options (positive ints or None) and the truncation mode; return a `Limits`."""
    for name, value in (
        ("max_length", max_length),
        ("max_prompt_length", max_prompt_length),
        ("max_completion_length", max_completion_length),
    ):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise DataError(f"{name} must be a positive integer or None, got {value!r}. Fix: set {name} >= 1.")
    if truncation_mode not in TRUNCATION_MODES:
        raise DataError(
            f"truncation_mode must be 'keep_end' or 'keep_start', got {truncation_mode!r}. "
            f"Fix: set truncation_mode to one of them."
        )
    return Limits(max_length, max_prompt_length, max_completion_length, truncation_mode)


def _check_ratio(eval_split_ratio) -> float:
    """eval_split_ratio must be a number in [0, 1) (None counts as 0)."""
    ratio = 0.0 if eval_split_ratio is None else eval_split_ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise DataError(
            f"eval_split_ratio must be in [0, 1), got {eval_split_ratio!r}. "
            f"Fix: use e.g. 0.05 to hold out 5% of the train rows, or 0 for none."
        )
    return float(ratio)


def validate_sources(sources, tokenizer, *, chat_template=None) -> list[PairedFormat]:
    """Detect each source's format and validate all its rows; return the formats (one per source)."""
    sources = list(sources or [])
    if not sources:
        raise DataError("no data given. Fix: pass data files or a dataset name.")
    formats = []
    for source in sources:
        fmt = detect_paired_format(source)
        if fmt.conversational and chat_template is None and getattr(tokenizer, "chat_template", None) is None:
            raise DataError(
                f"{source.name}: the rows are conversational but the tokenizer has no chat template. "
                f"Fix: set chat_template_path to a Jinja chat template file."
            )
        validate_paired_rows(source, fmt, vocab_size=len(tokenizer))
        formats.append(fmt)
    return formats


# --------------------------------------------------------------------------------------------------
# Tokenizing sources
# --------------------------------------------------------------------------------------------------


def _tokenize_sources(sources, formats, tokenizer, limits, *, num_proc, chat_template):
    """Tokenize each (already validated) source and concatenate; return (dataset, stats)."""
    parts, truncated = [], 0
    for source, fmt in zip(sources, formats):
        part, k = _tokenize_source(source, fmt, tokenizer, limits, num_proc=num_proc, chat_template=chat_template)
        logger.info("%s: %d of %d rows truncated", source.name, k, len(part))
        parts.append(part)
        truncated += k
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return dataset, {"rows": len(dataset), "truncated": truncated, "dropped": 0}


def _tokenize_source(source, fmt, tokenizer, limits, *, num_proc, chat_template):
    """Map one source to prompt_ids/chosen_ids/rejected_ids; return (dataset, number of truncated rows)."""
    ids = datasets.List(datasets.Value("int64"))
    features = datasets.Features({**{c: ids for c in ID_COLUMNS}, "truncated": datasets.Value("bool")})
    dataset = source.dataset
    if num_proc is not None:
        num_proc = max(1, min(num_proc, len(dataset)))  # datasets refuses more workers than rows
    mapped = dataset.map(
        _tokenize_row,
        with_indices=True,
        fn_kwargs=dict(
            source_name=source.name,
            fmt=fmt,
            tokenizer=tokenizer,
            limits=limits,
            chat_template=chat_template,
            code_version=_code_version(),
        ),
        remove_columns=dataset.column_names,
        features=features,
        num_proc=num_proc,
        desc=f"Tokenizing {source.name}",
    )
    truncated = sum(1 for flag in mapped["truncated"] if flag)
    return mapped.remove_columns("truncated"), truncated


@functools.lru_cache(maxsize=None)
def _code_version(*extra_modules: str) -> str:
    """Hash of this module's and formats.py's source (plus ``extra_modules``, by name).

    It goes into the map's fn_kwargs, hence into the cache fingerprint: datasets hashes the mapped
    function but not the helpers it calls, so without it a change to a helper would silently reuse
    stale cached tokens.
    """
    from . import formats

    digest = hashlib.sha256()
    for module in (formats, sys.modules[__name__], *(sys.modules[m] for m in extra_modules)):
        digest.update(inspect.getsource(module).encode())
    return digest.hexdigest()[:16]


def _tokenize_row(row, index, *, source_name, fmt, tokenizer, limits, chat_template, code_version):
    """Tokenize and truncate one row (a `Dataset.map` function; `index` is the row index in its source).

    `code_version` is unused here; it only keys the datasets cache (see `_code_version`).
    """
    prompt_ids, chosen_ids, rejected_ids = encode_row(row, fmt, tokenizer, chat_template=chat_template)
    original = (len(prompt_ids), len(chosen_ids), len(rejected_ids))
    prompt_ids, chosen_ids, rejected_ids = truncate_pair(prompt_ids, chosen_ids, rejected_ids, limits)
    for column, completion in (("chosen", chosen_ids), ("rejected", rejected_ids)):
        if len(completion) == 0:
            raise DataError(
                f"{source_name} row {index}, column '{column}': no completion token left after truncation "
                f"(prompt {len(prompt_ids)} tokens, max_length {limits.max_length}, max_prompt_length "
                f"{limits.max_prompt_length}). Fix: raise max_length or lower max_prompt_length."
            )
    truncated = original != (len(prompt_ids), len(chosen_ids), len(rejected_ids))
    return {"prompt_ids": prompt_ids, "chosen_ids": chosen_ids, "rejected_ids": rejected_ids, "truncated": truncated}


# --------------------------------------------------------------------------------------------------
# Encoding one row
# --------------------------------------------------------------------------------------------------


def encode_row(row, fmt: PairedFormat, tokenizer, *, chat_template=None):
    """Return (prompt_ids, chosen_ids, rejected_ids) for one validated row, before truncation."""
    if fmt.kind == "pretokenized":
        return tuple([int(t) for t in row[column]] for column in ID_COLUMNS)
    if fmt.kind == "explicit":
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
    if fmt.conversational:
        return encode_conversation(tokenizer, prompt, chosen, rejected, chat_template=chat_template)
    return encode_text(tokenizer, prompt, chosen, rejected)


def encode_text(tokenizer, prompt: str, chosen: str, rejected: str):
    """Standard rows: EOS appended to each completion text (if missing), default special tokens."""
    eos = tokenizer.eos_token
    if eos is not None:  # a tokenizer without EOS cannot mark the end; leave the text as is
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
    prompt_ids = tokenizer(prompt)["input_ids"]
    full_chosen = tokenizer(prompt + chosen)["input_ids"]
    full_rejected = tokenizer(prompt + rejected)["input_ids"]
    return split_at_prompt(prompt_ids, full_chosen, full_rejected)


def encode_conversation(tokenizer, prompt: list, chosen: list, rejected: list, *, chat_template=None):
    """Conversational rows: the chat template renders (and ends) each turn; no EOS is appended."""
    prompt, chosen, rejected = (_drop_none(messages) for messages in (prompt, chosen, rejected))
    prompt_ids = _chat_ids(tokenizer, prompt, chat_template, add_generation_prompt=True)
    full_chosen = _chat_ids(tokenizer, prompt + chosen, chat_template)
    full_rejected = _chat_ids(tokenizer, prompt + rejected, chat_template)
    return split_at_prompt(prompt_ids, full_chosen, full_rejected)


def _drop_none(messages: list) -> list:
    """Arrow gives every message every key seen in the column (missing ones as None); templates that test
    `'key' in message` must not see those."""
    return [{k: v for k, v in message.items() if v is not None} for message in messages]


def _chat_ids(tokenizer, messages, chat_template, add_generation_prompt=False) -> list[int]:
    """apply_chat_template as a flat list of ints (transformers 5 returns a BatchEncoding by default)."""
    out = tokenizer.apply_chat_template(
        messages,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        tokenize=True,
        return_dict=True,
    )
    ids = out["input_ids"]
    if len(ids) > 0 and isinstance(ids[0], list):  # some processors keep a batch dimension
        ids = ids[0]
    return [int(i) for i in ids]


def split_at_prompt(prompt_ids: list[int], full_chosen: list[int], full_rejected: list[int]):
    """Cut prompt+completion ids where the prompt's ids stop being a prefix of both (TRL 1.16
    `common_prefix_length`): a token merged across the boundary goes to the completions."""
    n = min(_common_prefix_length(prompt_ids, full_chosen), _common_prefix_length(prompt_ids, full_rejected))
    return list(prompt_ids[:n]), list(full_chosen[n:]), list(full_rejected[n:])


def _common_prefix_length(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


# --------------------------------------------------------------------------------------------------
# Truncation
# --------------------------------------------------------------------------------------------------


def truncate_pair(prompt_ids, chosen_ids, rejected_ids, limits: Limits):
    """Apply the length limits, in order:

    1. completions cut to max_completion_length (keep the start);
    2. if prompt + longer completion > max_length, the prompt is cut to max_prompt_length
       (keep_end keeps its last tokens, keep_start its first);
    3. if still too long, completions are cut to max_length - len(prompt) (keep the start; may leave none).
    """
    if limits.max_completion_length is not None:
        chosen_ids = chosen_ids[: limits.max_completion_length]
        rejected_ids = rejected_ids[: limits.max_completion_length]
    if limits.max_length is None:
        return prompt_ids, chosen_ids, rejected_ids

    def too_long() -> bool:
        return len(prompt_ids) + max(len(chosen_ids), len(rejected_ids)) > limits.max_length

    if too_long() and limits.max_prompt_length is not None:
        keep = limits.max_prompt_length
        if limits.truncation_mode == "keep_end":
            prompt_ids = prompt_ids[max(0, len(prompt_ids) - keep) :]
        else:
            prompt_ids = prompt_ids[:keep]
    if too_long():
        budget = max(0, limits.max_length - len(prompt_ids))
        chosen_ids, rejected_ids = chosen_ids[:budget], rejected_ids[:budget]
    return prompt_ids, chosen_ids, rejected_ids


def _hold_out(train, ratio: float, seed):
    """Split `ratio` of the rows (rounded up, at least one) off `train`; deterministic for `seed`."""
    n_eval = math.ceil(ratio * len(train))
    if n_eval >= len(train):
        raise DataError(
            f"eval_split_ratio {ratio} of {len(train)} train rows leaves no training rows. "
            f"Fix: lower eval_split_ratio or give eval files."
        )
    split = train.train_test_split(test_size=n_eval, seed=seed, shuffle=True)
    return split["train"], split["test"]
