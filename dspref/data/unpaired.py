"""The unpaired data path for KTO and BCO: (prompt, completion, label) rows.

Semantics follow TRL 1.16 `KTOTrainer._prepare_dataset`. Accepted layouts (one per source, detected from its
columns; every row of every source, train and eval, is validated before any is tokenized):

* unpaired:               prompt / completion / label (standard strings or conversational message lists);
* pre-tokenized unpaired: prompt_ids / completion_ids / label;
* every paired layout of `formats.py` (explicit or implicit prompt, standard or conversational, pre-tokenized),
  unpaired as TRL's `unpair_preference_dataset` does: a batched map of 1000 rows whose output, per batch, is
  all the batch's chosen rows (label true) followed by all its rejected rows (label false).

`label` must be a bool in every row (true = desirable, false = undesirable).

Each (prompt, completion) is tokenized on its own by the paired path's rule (`tokenize.encode_text` /
`encode_conversation`: EOS appended to plain-text completions, chat template for conversations, the completion
starting where the prompt's ids stop being a prefix of prompt+completion), so the split point of a chosen row
never depends on its rejected partner (TRL's KTO tokenizes each unpaired row alone). Truncation is the paired
path's `truncate_pair` applied to the single completion.

The KL rows of the KTO loss are built by `UnpairedCollator` inside each micro-batch (TRL 1.16 builds them in the
dataset, per chunk of `per_device_train_batch_size` consecutive rows, with the same rotation).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import datasets
import torch

from .formats import (
    _LAYOUTS,
    ID_COLUMNS,
    KNOWN_COLUMNS,
    DataError,
    _check_conversation,
    _check_ids,
    _check_text,
    _closest,
    _raise_missing_columns as _raise_missing_paired_columns,
    detect_paired_format,
    iter_rows,
    split_implicit_prompt,
)
from .tokenize import (
    _check_ratio,
    _code_version,
    _drop_none,
    _hold_out,
    encode_conversation,
    encode_text,
    make_limits,
    truncate_pair,
    validate_sources,
)

logger = logging.getLogger("dspref.data")

LABEL = "label"
UNPAIRED_TEXT_COLUMNS = ("prompt", "completion", LABEL)
UNPAIRED_ID_COLUMNS = ("prompt_ids", "completion_ids", LABEL)
OUTPUT_COLUMNS = ("prompt_ids", "completion_ids", LABEL)
UNPAIR_BATCH_SIZE = 1000  # TRL's unpair_preference_dataset: Dataset.map(batched=True) with its default batch size
UNPAIRED_LAYOUTS = (
    "prompt/completion/label (unpaired), prompt_ids/completion_ids/label (pre-tokenized unpaired), "
    f"or a paired layout: {_LAYOUTS}"
)
_LABEL_FIX = "Fix: make 'label' true (desirable) or false (undesirable)."
_BALANCE_LOW, _BALANCE_HIGH = 1.0, 4.0 / 3.0  # KTO paper (arXiv 2402.01306), Eq. (8)


@dataclass(frozen=True)
class UnpairedFormat:
    """Layout of a source for the unpaired path.

    kind: "unpaired" | "unpaired_pretokenized", or a paired kind ("explicit" | "implicit" | "pretokenized") whose
    rows are unpaired into a chosen and a rejected row; conversational: text values are lists of messages.
    """

    kind: str
    conversational: bool = False

    @property
    def paired(self) -> bool:
        return self.kind not in ("unpaired", "unpaired_pretokenized")


# --------------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------------


def build_unpaired_datasets(
    train_sources,
    eval_sources,
    tokenizer,
    *,
    max_length,
    max_prompt_length,
    max_completion_length,
    truncation_mode,
    eval_split_ratio,
    seed,
    num_proc=None,
    chat_template=None,
    keep_prompt_text=False,
):
    """Validate all sources, unpair paired ones, tokenize and truncate; return (train_dataset, eval_dataset or None).

    Columns: prompt_ids, completion_ids (lists of int), label (bool) and, with `keep_prompt_text`, prompt_text
    (the prompt as text: the string itself, the chat template's rendering for conversations, the decoded ids for
    pre-tokenized rows; never truncated). With no eval sources and `eval_split_ratio` > 0, that fraction of the
    train rows (rounded up) is held out, deterministically for `seed` (as the paired path; the split shuffles).
    """
    ratio = _check_ratio(eval_split_ratio)
    limits = make_limits(max_length, max_prompt_length, max_completion_length, truncation_mode)
    train_sources = list(train_sources or [])
    eval_sources = list(eval_sources or [])
    if not train_sources:
        raise DataError("no data given. Fix: pass data files or a dataset name.")
    formats = validate_unpaired_sources(train_sources + eval_sources, tokenizer, chat_template=chat_template)
    train_formats, eval_formats = formats[: len(train_sources)], formats[len(train_sources) :]

    tok = dict(num_proc=num_proc, chat_template=chat_template, keep_prompt_text=keep_prompt_text)
    train = _tokenize_sources(train_sources, train_formats, tokenizer, limits, **tok)
    if eval_sources:
        return train, _tokenize_sources(eval_sources, eval_formats, tokenizer, limits, **tok)
    if ratio == 0:
        return train, None
    return _hold_out(train, ratio, seed)


def class_counts(dataset) -> tuple[int, int]:
    """(n_desirable, n_undesirable): rows whose label is true, rows whose label is false."""
    labels = dataset[LABEL]
    n_desirable = sum(1 for label in labels if label)
    return n_desirable, len(labels) - n_desirable


def check_balance(n_desirable, n_undesirable, desirable_weight, undesirable_weight) -> str | None:
    """Check the class balance against the KTO paper's guidance; return a warning string, or None if fine.

    Eq. (8) of arXiv 2402.01306 recommends desirable_weight·n_desirable / (undesirable_weight·n_undesirable) in
    [1, 4/3]. TRL 1.16 (`KTOTrainer._prepare_dataset`) logs the same advice with the upper bound 1.33, and only
    when the counts differ; here the ratio is checked whatever the counts. A class with no rows is a DataError.
    """
    for name, count, label in (("desirable", n_desirable, "true"), ("undesirable", n_undesirable, "false")):
        if count == 0:
            other = "undesirable" if name == "desirable" else "desirable"
            raise DataError(
                f"the training data has no {name} rows (label {label}); KTO/BCO need both. "
                f"Fix: add rows with label {label} ({name} completions) next to the {other} ones, or give paired "
                f"data (prompt/chosen/rejected), which yields both."
            )
    for name, weight in (("desirable_weight", desirable_weight), ("undesirable_weight", undesirable_weight)):
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
            raise ValueError(f"{name} must be a number > 0, got {weight!r}.")
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if _BALANCE_LOW - 1e-9 <= ratio <= _BALANCE_HIGH + 1e-9:
        return None
    # undesirable_weight that puts the ratio at 1 (and the 4/3 end of the range), keeping desirable_weight
    und_at_1 = desirable_weight * n_desirable / n_undesirable
    und_at_high = und_at_1 / _BALANCE_HIGH
    # desirable_weight range, keeping undesirable_weight
    des_at_1 = undesirable_weight * n_undesirable / n_desirable
    des_at_high = des_at_1 * _BALANCE_HIGH
    return (
        f"class balance: {n_desirable} desirable and {n_undesirable} undesirable rows with "
        f"desirable_weight={desirable_weight:g} and undesirable_weight={undesirable_weight:g} give "
        f"desirable_weight*n_desirable / (undesirable_weight*n_undesirable) = {ratio:.4g}, outside the range "
        f"[1, 4/3] recommended by the KTO paper (Eq. 8). Fix: keep desirable_weight={desirable_weight:g} and set "
        f"undesirable_weight={_round(und_at_1, up=False)} (ratio 1), or any undesirable_weight in "
        f"[{_round(und_at_high, up=True)}, {_round(und_at_1, up=False)}]; or keep "
        f"undesirable_weight={undesirable_weight:g} and set desirable_weight in "
        f"[{_round(des_at_1, up=True)}, {_round(des_at_high, up=False)}]. Change one weight, not both."
    )


def _round(value: float, *, up: bool, digits: int = 4) -> str:
    """`value` to `digits` significant digits, rounded toward the inside of the recommended range (so the printed
    weight really gives a ratio in [1, 4/3]); printed without trailing zeros."""
    decimals = max(0, digits - 1 - math.floor(math.log10(value)))
    scaled = round(value * 10**decimals, 6)  # drop float noise before ceil/floor (3.0000000001 is 3)
    rounded = (math.ceil(scaled) if up else math.floor(scaled)) / 10**decimals
    return f"{rounded:.{decimals}f}".rstrip("0").rstrip(".") if decimals else f"{rounded:.0f}"


# --------------------------------------------------------------------------------------------------
# Format detection and validation
# --------------------------------------------------------------------------------------------------


def detect_unpaired_format(source) -> UnpairedFormat:
    """Tell the layout of `source` from its columns (and first row, for text layouts); DataError if none fits."""
    columns = list(source.dataset.column_names)
    present = set(columns)
    if len(source.dataset) == 0:
        raise DataError(f"{source.name}: has no rows. Fix: remove it from the data files or add rows.")
    if set(UNPAIRED_ID_COLUMNS) <= present:
        return UnpairedFormat("unpaired_pretokenized")
    if set(UNPAIRED_TEXT_COLUMNS) <= present:
        return UnpairedFormat("unpaired", isinstance(source.dataset[0]["completion"], list))
    if set(ID_COLUMNS) <= present or {"chosen", "rejected"} <= present:
        paired = detect_paired_format(source)
        return UnpairedFormat(paired.kind, paired.conversational)
    if present & {"completion", "completion_ids", LABEL}:
        layout = UNPAIRED_ID_COLUMNS if present & {"prompt_ids", "completion_ids"} else UNPAIRED_TEXT_COLUMNS
    elif present & (set(ID_COLUMNS) | {"chosen", "rejected"}):
        _raise_missing_paired_columns(source.name, columns)  # the paired path's message (always raises)
    else:
        layout = UNPAIRED_TEXT_COLUMNS
    _raise_missing_columns(source.name, columns, [c for c in layout if c not in present])


def _raise_missing_columns(name: str, columns: list[str], missing: list[str]) -> None:
    """DataError for missing unpaired columns, with a typo hint when an unknown column is close to one."""
    known = set(KNOWN_COLUMNS) | set(UNPAIRED_TEXT_COLUMNS) | set(UNPAIRED_ID_COLUMNS)
    for column in columns:
        guess = None if column in known else _closest(column, missing)
        if guess is not None:
            raise DataError(
                f"{name}: column '{column}' is not a known column; did you mean '{guess}'? "
                f"Found columns {columns}; expected {UNPAIRED_LAYOUTS}. Fix: rename '{column}' to '{guess}'."
            )
    raise DataError(
        f"{name}: missing column(s) {missing}; found columns {columns}; expected {UNPAIRED_LAYOUTS}. "
        f"Fix: add or rename the columns."
    )


def validate_unpaired_sources(sources, tokenizer, *, chat_template=None) -> list[UnpairedFormat]:
    """Detect every source's layout and validate all its rows; return the formats (one per source).

    Paired sources go through the paired checks (`tokenize.validate_sources`); unpaired ones get the same
    per-value checks plus the label check.
    """
    formats = []
    for source in sources:
        fmt = detect_unpaired_format(source)
        if fmt.paired:
            validate_sources([source], tokenizer, chat_template=chat_template)
        else:
            if fmt.conversational and chat_template is None and getattr(tokenizer, "chat_template", None) is None:
                raise DataError(
                    f"{source.name}: the rows are conversational but the tokenizer has no chat template. "
                    f"Fix: set chat_template_path to a Jinja chat template file."
                )
            _validate_unpaired_rows(source, fmt, vocab_size=len(tokenizer))
        formats.append(fmt)
    return formats


def _validate_unpaired_rows(source, fmt: UnpairedFormat, vocab_size: int | None) -> None:
    """Check prompt / completion (text, messages or ids) and label of every row; DataError at the first bad one."""
    columns = UNPAIRED_ID_COLUMNS if fmt.kind == "unpaired_pretokenized" else UNPAIRED_TEXT_COLUMNS
    for index, row in enumerate(iter_rows(source.dataset, columns)):
        where = f"{source.name} row {index}"
        for column in columns[:2]:
            if fmt.kind == "unpaired_pretokenized":
                _check_ids(where, column, row[column], vocab_size)
            elif fmt.conversational:
                _check_conversation(where, column, row[column])
            else:
                _check_text(where, column, row[column])
        value = row[LABEL]
        if not isinstance(value, bool):
            got = "None" if value is None else f"{type(value).__name__} ({value!r:.60})"
            raise DataError(f"{where}, column '{LABEL}': expected true or false, got {got}. {_LABEL_FIX}")


# --------------------------------------------------------------------------------------------------
# Tokenizing sources
# --------------------------------------------------------------------------------------------------


def _tokenize_sources(sources, formats, tokenizer, limits, *, num_proc, chat_template, keep_prompt_text):
    """Tokenize each validated source (unpairing paired ones) and concatenate."""
    parts = []
    for source, fmt in zip(sources, formats):
        kwargs = dict(
            source_name=source.name,
            fmt=fmt,
            tokenizer=tokenizer,
            limits=limits,
            chat_template=chat_template,
            keep_prompt_text=keep_prompt_text,
            code_version=_code_version(__name__),
        )
        part, truncated = (_tokenize_paired_source if fmt.paired else _tokenize_unpaired_source)(
            source.dataset, kwargs, num_proc=num_proc
        )
        logger.info("%s: %d of %d rows truncated", source.name, truncated, len(part))
        parts.append(part)
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def _features(sides, keep_prompt_text: bool) -> datasets.Features:
    """Output columns of the row functions: per side (prefix "" for unpaired rows, "chosen_"/"rejected_" for
    paired rows) prompt_ids, completion_ids, label [, prompt_text], truncated."""
    ids = datasets.List(datasets.Value("int64"))
    columns = {}
    for side in sides:
        columns.update({f"{side}prompt_ids": ids, f"{side}completion_ids": ids})
        columns[f"{side}{LABEL}"] = datasets.Value("bool")
        if keep_prompt_text:
            columns[f"{side}prompt_text"] = datasets.Value("string")
        columns[f"{side}truncated"] = datasets.Value("bool")
    return datasets.Features(columns)


def _map(dataset, function, kwargs, features, num_proc):
    if num_proc is not None:
        num_proc = max(1, min(num_proc, len(dataset)))  # datasets refuses more workers than rows
    return dataset.map(
        function,
        with_indices=True,
        fn_kwargs=kwargs,
        remove_columns=dataset.column_names,
        features=features,
        num_proc=num_proc,
        desc=f"Tokenizing {kwargs['source_name']}",
    )


def _tokenize_unpaired_source(dataset, kwargs, *, num_proc):
    """Map an unpaired source to prompt_ids / completion_ids / label [/ prompt_text]; return (dataset, n_truncated)."""
    mapped = _map(dataset, _unpaired_row, kwargs, _features(("",), kwargs["keep_prompt_text"]), num_proc)
    truncated = sum(1 for flag in mapped["truncated"] if flag)
    return mapped.remove_columns("truncated"), truncated


def _tokenize_paired_source(dataset, kwargs, *, num_proc):
    """Map a paired source to its chosen and rejected rows, in TRL's unpaired order; return (dataset, n_truncated).

    Each paired row is tokenized once into chosen_* and rejected_* columns (row by row, so `num_proc` cannot change
    the result); the two halves are then stacked and reordered as `unpair_preference_dataset`'s batched map
    writes them: for each batch of 1000 paired rows, its chosen rows, then its rejected rows.
    """
    features = _features(("chosen_", "rejected_"), kwargs["keep_prompt_text"])
    mapped = _map(dataset, _paired_row, kwargs, features, num_proc)
    halves, truncated = [], 0
    for side in ("chosen_", "rejected_"):
        columns = [c for c in mapped.column_names if c.startswith(side)]
        half = mapped.select_columns(columns).rename_columns({c: c[len(side) :] for c in columns})
        truncated += sum(1 for flag in half["truncated"] if flag)
        halves.append(half.remove_columns("truncated"))
    n = len(mapped)
    order = []
    for start in range(0, n, UNPAIR_BATCH_SIZE):
        stop = min(start + UNPAIR_BATCH_SIZE, n)
        order += list(range(start, stop)) + list(range(n + start, n + stop))
    return datasets.concatenate_datasets(halves).select(order), truncated


def _unpaired_row(row, index, *, source_name, fmt, tokenizer, limits, chat_template, keep_prompt_text, code_version):
    """One validated unpaired row -> tokenized, truncated row (a `Dataset.map` function).

    `code_version` is unused here; it only keys the datasets cache (see `tokenize._code_version`).
    """
    if fmt.kind == "unpaired_pretokenized":
        prompt, completion, column = row["prompt_ids"], row["completion_ids"], "completion_ids"
    else:
        prompt, completion, column = row["prompt"], row["completion"], "completion"
    out = _encode_one(prompt, completion, fmt, tokenizer, limits, chat_template, keep_prompt_text)
    _check_fits(out, f"{source_name} row {index}", column, limits)
    return {**out, LABEL: row[LABEL]}


def _paired_row(row, index, *, source_name, fmt, tokenizer, limits, chat_template, keep_prompt_text, code_version):
    """One validated paired row -> chosen_* and rejected_* tokenized, truncated columns (a `Dataset.map` function).

    `code_version` is unused here; it only keys the datasets cache (see `tokenize._code_version`).
    """
    if fmt.kind == "pretokenized":
        prompt, chosen, rejected = (row[c] for c in ID_COLUMNS)
    elif fmt.kind == "explicit":
        prompt, chosen, rejected = row["prompt"], row["chosen"], row["rejected"]
    else:
        prompt, chosen, rejected = split_implicit_prompt(row["chosen"], row["rejected"])
    out = {}
    for side, completion, label in (("chosen", chosen, True), ("rejected", rejected, False)):
        one = _encode_one(prompt, completion, fmt, tokenizer, limits, chat_template, keep_prompt_text)
        column = f"{side}_ids" if fmt.kind == "pretokenized" else side
        _check_fits(one, f"{source_name} row {index}", column, limits)
        out.update({f"{side}_{key}": value for key, value in {**one, LABEL: label}.items()})
    return out


def _encode_one(prompt, completion, fmt: UnpairedFormat, tokenizer, limits, chat_template, keep_prompt_text) -> dict:
    """Tokenize (unless given as ids) and truncate one (prompt, completion).

    Returns prompt_ids, completion_ids [, prompt_text], truncated. The paired path's encoders take a chosen and a
    rejected completion and split both where the prompt's ids stop being a prefix of *both*; given the same
    completion twice they split where the prompt stops being a prefix of this one, as TRL's KTO tokenizes each
    unpaired row alone.
    """
    if fmt.kind in ("pretokenized", "unpaired_pretokenized"):
        prompt_ids, completion_ids = [int(t) for t in prompt], [int(t) for t in completion]
    elif fmt.conversational:
        encoded = encode_conversation(tokenizer, prompt, completion, completion, chat_template=chat_template)
        prompt_ids, completion_ids = encoded[0], encoded[1]
    else:
        prompt_ids, completion_ids, _ = encode_text(tokenizer, prompt, completion, completion)
    original = (len(prompt_ids), len(completion_ids))
    prompt_ids, completion_ids, _ = truncate_pair(prompt_ids, completion_ids, completion_ids, limits)
    out = {"prompt_ids": prompt_ids, "completion_ids": completion_ids}
    if keep_prompt_text:
        out["prompt_text"] = _prompt_text(prompt, completion, fmt, tokenizer, chat_template)
    out["truncated"] = original != (len(prompt_ids), len(completion_ids))
    return out


def _check_fits(out: dict, where: str, column: str, limits) -> None:
    """DataError when truncation left no completion token (the paired path's message)."""
    if len(out["completion_ids"]) == 0:
        raise DataError(
            f"{where}, column '{column}': no completion token left after truncation "
            f"(prompt {len(out['prompt_ids'])} tokens, max_length {limits.max_length}, max_prompt_length "
            f"{limits.max_prompt_length}). Fix: raise max_length or lower max_prompt_length."
        )


def _prompt_text(prompt, completion, fmt: UnpairedFormat, tokenizer, chat_template) -> str:
    """The prompt as text, for BCO's prompt embeddings (untruncated).

    Conversations: the chat template's rendering with the generation prompt, cut to its longest common prefix
    with the rendering of prompt + completion, as TRL's `maybe_apply_chat_template` renders an unpaired row's
    prompt (a user-ending prompt). Strings: the prompt itself. Ids: the decoded prompt ids (special tokens kept).
    """
    if fmt.kind in ("pretokenized", "unpaired_pretokenized"):
        return tokenizer.decode([int(t) for t in prompt])
    if not fmt.conversational:
        return prompt
    prompt, completion = _drop_none(prompt), _drop_none(completion)
    render = dict(chat_template=chat_template, tokenize=False)
    alone = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, **render)
    full = tokenizer.apply_chat_template(prompt + completion, **render)
    n = 0
    while n < min(len(alone), len(full)) and alone[n] == full[n]:
        n += 1
    return alone[:n]


# --------------------------------------------------------------------------------------------------
# Collation
# --------------------------------------------------------------------------------------------------


class UnpairedCollator:
    """Stack a micro-batch of unpaired rows into one (N, T) batch, right-padded; optionally with KTO's KL rows.

    with_kl=False: N = B, row i is prompt_i + completion_i.
    with_kl=True:  N = 2B, the B rows above, then B KL rows prompt_i + completion_{(i-1) mod B}: each prompt with
    the previous row's completion, the first with the last's. This is TRL 1.16's rotation (`KTOTrainer.
    _prepare_dataset`, `add_kl_completion_ids`: `[completion_ids[-1]] + completion_ids[:-1]` over each chunk of
    per_device_train_batch_size consecutive rows), applied here to the micro-batch actually received, so it holds
    under any sampler. The completion ids are reused as tokenized for their own prompt (not re-tokenized).

    `max_length` cuts every sequence to its first max_length tokens (TRL's `DataCollatorForUnpairedPreference`);
    the dataset's rows already fit, so in practice it cuts only KL rows, whose prompt and completion come from
    different rows.
    """

    def __init__(self, pad_token_id: int, *, with_kl: bool, max_length: int | None = None):
        if pad_token_id is None:
            raise ValueError("UnpairedCollator needs a pad_token_id; set the tokenizer's pad token (e.g. to its EOS).")
        self.pad_token_id = int(pad_token_id)
        self.with_kl = with_kl
        self.max_length = max_length

    def __call__(self, rows: list[dict]) -> dict:
        """Return input_ids, attention_mask, completion_mask (N, T) long and label (B,) bool; when every row has
        prompt_text, also prompt_text: the B prompt strings (a list, in row order; for BCO's UDM).

        attention_mask is 1 on real tokens; completion_mask is 1 on completion tokens (including the final EOS)
        and 0 on prompt and padding. T is the longest (truncated) sequence in the batch.
        """
        prompts = [list(row["prompt_ids"]) for row in rows]
        completions = [list(row["completion_ids"]) for row in rows]
        if self.with_kl:
            if len(rows) == 1:
                raise ValueError(
                    "UnpairedCollator: a micro-batch of 1 has no mismatched pair for the KL term (its prompt would "
                    "be paired with its own completion). Fix: use a per-device micro-batch of at least 2 rows (and "
                    "drop an incomplete last batch of 1), or a loss without the KL term (apo_zero_unpaired)."
                )
            prompts = prompts + prompts
            completions = completions + completions[-1:] + completions[:-1]  # KL row i: completion of row i-1
        sequences, masks = [], []
        for prompt, completion in zip(prompts, completions):
            sequence, mask = prompt + completion, [0] * len(prompt) + [1] * len(completion)
            if self.max_length is not None:
                sequence, mask = sequence[: self.max_length], mask[: self.max_length]
            sequences.append(sequence)
            masks.append(mask)
        width = max(len(s) for s in sequences)

        input_ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)  # (N, T)
        attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (N, T)
        completion_mask = torch.zeros((len(sequences), width), dtype=torch.long)  # (N, T)
        for i, (sequence, mask) in enumerate(zip(sequences, masks)):
            input_ids[i, : len(sequence)] = torch.tensor(sequence, dtype=torch.long)
            attention_mask[i, : len(sequence)] = 1
            completion_mask[i, : len(mask)] = torch.tensor(mask, dtype=torch.long)
        label = torch.tensor([bool(row[LABEL]) for row in rows], dtype=torch.bool)  # (B,)
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "label": label,
        }
        if self.with_kl:
            batch["trained_rows"] = len(rows)  # the KL rows after them are scored without being trained on
        if rows and all(row.get("prompt_text") is not None for row in rows):
            batch["prompt_text"] = [str(row["prompt_text"]) for row in rows]
        return batch
