"""The reward-modeling data path: (chosen, rejected) full sequences and an optional margin per row.

Semantics follow TRL's RewardTrainer: each row becomes two full sequences (prompt + completion), rows where
either sequence is longer than `max_length` are dropped (never truncated: a reward model scores the last
token, so a cut sequence would be scored on text it never saw end), and an optional `margin` column is
carried through to the loss.

Accepted layouts (one per source, detected from its columns):

* every paired layout of `formats.py` (explicit prompt, implicit prompt, standard or conversational text,
  and pre-tokenized prompt_ids/chosen_ids/rejected_ids). Text rows go through the paired tokenization
  (`tokenize.encode_row`), so the full sequence is prompt_ids + chosen_ids: exactly the tokenization of
  prompt + chosen (+ EOS for plain text), or the chat template applied to prompt + chosen messages;
* TRL's pre-tokenized reward layout: input_ids_chosen / input_ids_rejected with optional
  attention_mask_chosen / attention_mask_rejected (both or neither). The ids are used as given; trailing
  0-mask positions (right padding left in the data) are stripped, and a 0 before a 1 is an error.

Every source (train and eval) is validated before any is tokenized.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import datasets
import torch

from .formats import (
    ID_COLUMNS,
    KNOWN_COLUMNS,
    DataError,
    PairedFormat,
    _check_ids,
    _closest,
    _is_token_id,
    detect_paired_format,
    iter_rows,
)
from .tokenize import _check_ratio, _code_version, _hold_out, encode_row, make_limits, validate_sources

logger = logging.getLogger("dspref.data")

REWARD_ID_COLUMNS = ("input_ids_chosen", "input_ids_rejected")
REWARD_MASK_COLUMNS = ("attention_mask_chosen", "attention_mask_rejected")
REWARD_COLUMNS = REWARD_ID_COLUMNS + REWARD_MASK_COLUMNS
MARGIN = "margin"
REWARD_LAYOUTS = (
    "prompt/chosen/rejected (explicit prompt), chosen/rejected (implicit prompt), "
    "prompt_ids/chosen_ids/rejected_ids (pre-tokenized) or input_ids_chosen/input_ids_rejected with optional "
    "attention_mask_chosen/attention_mask_rejected (pre-tokenized, TRL reward names); plus an optional 'margin'"
)
PADDING_SIDES = ("right", "left")


@dataclass(frozen=True)
class RewardFormat:
    """Layout of a reward source.

    kind: "explicit" | "implicit" | "pretokenized" (the paired layouts) or "reward_pretokenized";
    conversational: text values are lists of messages; masks: the reward layout has attention_mask columns;
    margin: the source has a 'margin' column.
    """

    kind: str
    conversational: bool = False
    masks: bool = False
    margin: bool = False

    def paired(self) -> PairedFormat:
        return PairedFormat(self.kind, self.conversational)


# --------------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------------


def build_reward_datasets(
    train_sources,
    eval_sources,
    tokenizer,
    *,
    max_length,
    eval_split_ratio,
    seed,
    num_proc=None,
    chat_template=None,
):
    """Validate all sources, tokenize, drop over-long rows; return (train_dataset, eval_dataset or None).

    Columns: chosen_ids, rejected_ids (full sequences, lists of int) and, when the sources have a 'margin'
    column, margin (float). Rows where either sequence has more than `max_length` tokens are dropped
    (None: no limit); the count is logged per source. With no eval sources and `eval_split_ratio` > 0, that
    fraction of the kept train rows (rounded up) is held out, deterministically for `seed`.
    """
    ratio = _check_ratio(eval_split_ratio)
    max_length = make_limits(max_length, None, None, "keep_end").max_length
    train_sources = list(train_sources or [])
    eval_sources = list(eval_sources or [])
    if not train_sources:
        raise DataError("no data given. Fix: pass data files or a dataset name.")
    formats = validate_reward_sources(train_sources + eval_sources, tokenizer, chat_template=chat_template)
    train_formats, eval_formats = formats[: len(train_sources)], formats[len(train_sources) :]

    tok = dict(max_length=max_length, num_proc=num_proc, chat_template=chat_template)
    train = _tokenize_sources(train_sources, train_formats, tokenizer, **tok)
    if eval_sources:
        return train, _tokenize_sources(eval_sources, eval_formats, tokenizer, **tok)
    if ratio == 0:
        return train, None
    return _hold_out(train, ratio, seed)


# --------------------------------------------------------------------------------------------------
# Format detection and validation
# --------------------------------------------------------------------------------------------------


def detect_reward_format(source) -> RewardFormat:
    """Tell the layout of a reward `source` from its columns (and first row, for text layouts)."""
    columns = list(source.dataset.column_names)
    present = set(columns)
    if present & set(REWARD_COLUMNS) and len(source.dataset) > 0:
        missing = [c for c in REWARD_ID_COLUMNS if c not in present]
        masks = [c for c in REWARD_MASK_COLUMNS if c in present]
        if len(masks) == 1:
            missing.append(next(c for c in REWARD_MASK_COLUMNS if c not in present))
        if missing:
            _raise_missing_columns(source.name, columns, missing)
        fmt = RewardFormat("reward_pretokenized", masks=bool(masks))
    elif set(ID_COLUMNS) <= present or {"chosen", "rejected"} <= present or len(source.dataset) == 0:
        paired = detect_paired_format(source)  # also raises for a source with no rows
        fmt = RewardFormat(paired.kind, paired.conversational)
    else:
        paired_ids = present & set(ID_COLUMNS)
        layout = ID_COLUMNS if paired_ids else ("chosen", "rejected")
        _raise_missing_columns(source.name, columns, [c for c in layout if c not in present])
    if MARGIN not in present:
        for column in columns:
            if column.lower().rstrip("s") == MARGIN:
                raise DataError(
                    f"{source.name}: column '{column}' is not a known column; did you mean '{MARGIN}'? "
                    f"Fix: rename '{column}' to '{MARGIN}'."
                )
        return fmt
    return RewardFormat(fmt.kind, fmt.conversational, fmt.masks, margin=True)


def _raise_missing_columns(name: str, columns: list[str], missing: list[str]) -> None:
    """DataError for missing reward columns, with a typo hint when an unknown column is close to one."""
    known = set(KNOWN_COLUMNS) | set(REWARD_COLUMNS) | {MARGIN}
    for column in columns:
        guess = None if column in known else _closest(column, missing)
        if guess is not None:
            raise DataError(
                f"{name}: column '{column}' is not a known column; did you mean '{guess}'? "
                f"Found columns {columns}; expected {REWARD_LAYOUTS}. Fix: rename '{column}' to '{guess}'."
            )
    raise DataError(
        f"{name}: missing column(s) {missing}; found columns {columns}; expected {REWARD_LAYOUTS}. "
        f"Fix: add or rename the columns."
    )


def validate_reward_sources(sources, tokenizer, *, chat_template=None) -> list[RewardFormat]:
    """Detect every source's layout, check that all or none have a margin, then validate every row.

    Text and paired pre-tokenized sources go through the paired checks (`tokenize.validate_sources`);
    reward pre-tokenized sources get the id and attention-mask checks; 'margin' values must be finite numbers.
    """
    sources = list(sources)
    formats = [detect_reward_format(source) for source in sources]
    with_margin = [s.name for s, f in zip(sources, formats) if f.margin]
    without = [s.name for s, f in zip(sources, formats) if not f.margin]
    if with_margin and without:
        raise DataError(
            f"the '{MARGIN}' column is in {with_margin} but not in {without}. "
            f"Fix: give every data file (train and eval) a '{MARGIN}' column, or drop it from all of them."
        )
    for source, fmt in zip(sources, formats):
        if fmt.kind == "reward_pretokenized":
            _validate_reward_id_rows(source, fmt, vocab_size=len(tokenizer))
        else:
            validate_sources([source], tokenizer, chat_template=chat_template)
        if fmt.margin:
            _validate_margins(source)
    return formats


def _validate_reward_id_rows(source, fmt: RewardFormat, vocab_size: int | None) -> None:
    """Check input_ids_* (lists of ids in range, non-empty after stripping padding) and their masks."""
    columns = REWARD_COLUMNS if fmt.masks else REWARD_ID_COLUMNS
    for index, row in enumerate(iter_rows(source.dataset, columns)):
        where = f"{source.name} row {index}"
        for ids_column, mask_column in zip(REWARD_ID_COLUMNS, REWARD_MASK_COLUMNS):
            ids = row[ids_column]
            if fmt.masks and isinstance(ids, list):
                ids = ids[: _kept_length(where, mask_column, ids_column, row[mask_column], len(ids))]
            _check_ids(where, ids_column, ids, vocab_size)


def _kept_length(where: str, mask_column: str, ids_column: str, mask, n_ids: int) -> int:
    """Number of leading tokens an attention mask keeps: all but its trailing 0s (DataError if malformed)."""
    if not isinstance(mask, list) or not all(_is_token_id(v) and v in (0, 1) for v in mask):
        raise DataError(
            f"{where}, column '{mask_column}': expected a list of 0s and 1s, got {mask!r:.60}. "
            f"Fix: store '{mask_column}' as lists of 0/1 (1 on every token), or drop both attention_mask columns."
        )
    if len(mask) != n_ids:
        raise DataError(
            f"{where}, column '{mask_column}': {len(mask)} entries but '{ids_column}' has {n_ids}. "
            f"Fix: give '{mask_column}' one 0/1 entry per token of '{ids_column}', "
            f"or drop both attention_mask columns."
        )
    kept = _strip_trailing_zeros(mask)
    if kept == 0:
        raise DataError(
            f"{where}, column '{mask_column}': every entry is 0, so no token is left. "
            f"Fix: remove the row, or set '{mask_column}' to 1 on its tokens."
        )
    if 0 in mask[:kept]:
        zero = mask.index(0)
        one = mask.index(1, zero)
        raise DataError(
            f"{where}, column '{mask_column}': 0 at position {zero} is followed by 1 at position {one}; only "
            f"trailing 0s (right padding) can be stripped. Fix: remove the padded or masked tokens from "
            f"'{ids_column}' and '{mask_column}' (e.g. tokenize without left padding)."
        )
    return kept


def _strip_trailing_zeros(mask) -> int:
    kept = len(mask)
    while kept > 0 and mask[kept - 1] == 0:
        kept -= 1
    return kept


def _validate_margins(source) -> None:
    """Every 'margin' must be a finite int or float (not a bool, not missing)."""
    for index, row in enumerate(iter_rows(source.dataset, [MARGIN])):
        value = row[MARGIN]
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            got = "None" if value is None else f"{type(value).__name__} ({value!r:.60})"
            raise DataError(
                f"{source.name} row {index}, column '{MARGIN}': expected a finite number, got {got}. "
                f"Fix: make '{MARGIN}' a number, or drop the column."
            )


# --------------------------------------------------------------------------------------------------
# Tokenizing and dropping
# --------------------------------------------------------------------------------------------------


def _tokenize_sources(sources, formats, tokenizer, *, max_length, num_proc, chat_template):
    """Tokenize each validated source, drop over-long rows, concatenate; DataError if no row is left."""
    parts, total, shortest = [], 0, None
    for source, fmt in zip(sources, formats):
        mapped = _tokenize_source(source, fmt, tokenizer, num_proc=num_proc, chat_template=chat_template)
        lengths = list(mapped["length"])
        total += len(lengths)
        shortest = min(lengths if shortest is None else [shortest, *lengths])
        if max_length is not None:
            keep = [i for i, n in enumerate(lengths) if n <= max_length]
            logger.info(
                "%s: %d of %d rows dropped (longer than max_length=%d)",
                source.name,
                len(lengths) - len(keep),
                len(lengths),
                max_length,
            )
            if len(keep) < len(lengths):
                mapped = mapped.select(keep)
        parts.append(mapped.remove_columns("length"))
    dataset = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    if len(dataset) == 0:
        names = ", ".join(source.name for source in sources)
        raise DataError(
            f"{names}: all {total} rows dropped (longer than max_length={max_length}; the shortest row needs "
            f"{shortest} tokens). Fix: raise max_length to at least {shortest}, or set it to None for no limit."
        )
    return dataset


def _tokenize_source(source, fmt: RewardFormat, tokenizer, *, num_proc, chat_template):
    """Map one source to chosen_ids / rejected_ids / length (longer of the two) [/ margin]."""
    ids = datasets.List(datasets.Value("int64"))
    columns = {"chosen_ids": ids, "rejected_ids": ids, "length": datasets.Value("int64")}
    if fmt.margin:
        columns[MARGIN] = datasets.Value("float64")
    dataset = source.dataset
    if num_proc is not None:
        num_proc = max(1, min(num_proc, len(dataset)))  # datasets refuses more workers than rows
    return dataset.map(
        _tokenize_row,
        fn_kwargs=dict(fmt=fmt, tokenizer=tokenizer, chat_template=chat_template, code_version=_code_version(__name__)),
        remove_columns=dataset.column_names,
        features=datasets.Features(columns),
        num_proc=num_proc,
        desc=f"Tokenizing {source.name}",
    )


def _tokenize_row(row, *, fmt: RewardFormat, tokenizer, chat_template, code_version):
    """One validated row -> full chosen / rejected sequences (a `Dataset.map` function).

    `code_version` is unused here; it only keys the datasets cache (see `tokenize._code_version`).
    """
    if fmt.kind == "reward_pretokenized":
        chosen = _unpadded(row, "input_ids_chosen", "attention_mask_chosen", fmt.masks)
        rejected = _unpadded(row, "input_ids_rejected", "attention_mask_rejected", fmt.masks)
    else:
        prompt_ids, chosen_ids, rejected_ids = encode_row(row, fmt.paired(), tokenizer, chat_template=chat_template)
        chosen, rejected = prompt_ids + chosen_ids, prompt_ids + rejected_ids
    out = {"chosen_ids": chosen, "rejected_ids": rejected, "length": max(len(chosen), len(rejected))}
    if fmt.margin:
        out[MARGIN] = float(row[MARGIN])
    return out


def _unpadded(row, ids_column: str, mask_column: str, masks: bool) -> list[int]:
    ids = [int(t) for t in row[ids_column]]
    return ids[: _strip_trailing_zeros(row[mask_column])] if masks else ids


# --------------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------------


class RewardCollator:
    """Stack a batch of reward rows into one (2B, T) batch: the B chosen sequences, then the B rejected.

    One forward pass scores both sides (one ZeRO-3 gather per step). Sequences are padded with
    `pad_token_id` on `padding_side`; T is the longest sequence in the batch.
    """

    def __init__(self, pad_token_id: int, padding_side: str = "right"):
        if pad_token_id is None:
            raise ValueError("RewardCollator needs a pad_token_id; set the tokenizer's pad token (e.g. to its EOS).")
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}.")
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        """Return input_ids and attention_mask, (2B, T) long, and margin (B,) float32 when rows carry one."""
        sequences = [list(row["chosen_ids"]) for row in rows] + [list(row["rejected_ids"]) for row in rows]
        width = max(len(s) for s in sequences)
        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)  # (2B, T)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (2B, T)
        for i, sequence in enumerate(sequences):
            n = len(sequence)
            span = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            input_ids[i, span] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[i, span] = 1
        batch = {"input_ids": input_ids, "attention_mask": attention_mask}
        has_margin = [MARGIN in row for row in rows]
        if any(has_margin):
            if not all(has_margin):
                raise ValueError("RewardCollator: some rows have a 'margin' and others do not.")
            batch[MARGIN] = torch.tensor([float(row[MARGIN]) for row in rows], dtype=torch.float32)  # (B,)
        return batch
