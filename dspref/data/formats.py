"""Loading and validating paired-preference data (no tokenizer here).

A *source* is one file (or one hub split) loaded as its own `datasets.Dataset`, so every error can name
the file and the row index inside it. `detect_paired_format` tells which of the three paired layouts a
source uses; `validate_paired_rows` checks every row before anything is tokenized.

The paired layouts:

* explicit:      prompt / chosen / rejected
* implicit:      chosen / rejected; their longest shared prefix is the prompt (TRL's `extract_prompt`)
* pretokenized:  prompt_ids / chosen_ids / rejected_ids (lists of ints)

Text values are either plain strings ("standard") or lists of `{"role", "content"}` messages
("conversational").
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from typing import Any, Iterator

SUPPORTED_EXTENSIONS = (".json", ".jsonl", ".parquet", ".csv")
ALLOWED_ROLES = ("system", "user", "assistant", "tool")

TEXT_COLUMNS = ("prompt", "chosen", "rejected")
ID_COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")
KNOWN_COLUMNS = TEXT_COLUMNS + ID_COLUMNS
_LAYOUTS = (
    "prompt/chosen/rejected (explicit prompt), chosen/rejected (implicit prompt) "
    "or prompt_ids/chosen_ids/rejected_ids (pre-tokenized)"
)
_MESSAGE_EXAMPLE = '[{"role": "user", "content": "..."}]'


class DataError(ValueError):
    """Bad input data; the message names the file, the row index, the column and the fix."""


@dataclass(frozen=True)
class Source:
    """One loaded input: `name` is the file path (or "dataset_name[split]"), `dataset` a `datasets.Dataset`."""

    name: str
    dataset: Any


@dataclass(frozen=True)
class PairedFormat:
    """Layout of a paired source: kind in {"explicit", "implicit", "pretokenized"}; conversational rows are
    lists of messages."""

    kind: str
    conversational: bool


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def load_sources(files, dataset_name=None, dataset_config_name=None, split="train") -> list[Source]:
    """Load every file in `files` (None, a path, or a list of paths) and the hub dataset `dataset_name`.

    Each file becomes its own `Source` so that errors can name the file and the row index within it.
    Files may be .json/.jsonl (JSON lines or a JSON array), .parquet, .csv, or a folder written by
    `Dataset.save_to_disk` / `DatasetDict.save_to_disk` (for a DatasetDict, `split` is taken).
    """
    if files is None:
        paths = []
    elif isinstance(files, (str, os.PathLike)):
        paths = [files]
    else:
        paths = list(files)
    sources = [Source(name=str(p), dataset=_load_path(str(p), split)) for p in paths]
    if dataset_name:
        import datasets

        ds = datasets.load_dataset(dataset_name, dataset_config_name, split=split)
        sources.append(Source(name=f"{dataset_name}[{split}]", dataset=ds))
    return sources


def _load_path(path: str, split: str):
    """Load one file or save_to_disk folder as a `datasets.Dataset`; DataError on a bad path or extension."""
    import datasets

    if not os.path.exists(path):
        raise DataError(f"{path}: file not found. Fix: check the path (relative paths start at {os.getcwd()}).")
    if os.path.isdir(path):
        return _load_saved_folder(path, split)
    ext = os.path.splitext(path)[1].lower()
    builder = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}.get(ext)
    if builder is None:
        raise DataError(
            f"{path}: unsupported file extension '{ext}'. Fix: use one of "
            f"{', '.join(SUPPORTED_EXTENSIONS)}, or a folder written by Dataset.save_to_disk."
        )
    try:
        return datasets.load_dataset(builder, data_files=path, split="train")
    except Exception as exc:  # pyarrow / json errors: re-raise with the file name in front
        raise DataError(f"{path}: could not be read as {ext[1:]} ({exc}). Fix: check the file's contents.") from exc


def _load_saved_folder(path: str, split: str):
    """Load a save_to_disk folder; a DatasetDict gives its `split`."""
    import datasets

    try:
        loaded = datasets.load_from_disk(path)
    except Exception as exc:
        raise DataError(
            f"{path}: is a folder but not one written by Dataset.save_to_disk ({exc}). "
            f"Fix: point at a data file ({', '.join(SUPPORTED_EXTENSIONS)}) or a save_to_disk folder."
        ) from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(
                f"{path}: has no split '{split}'; found splits {sorted(loaded.keys())}. Fix: choose one of them."
            )
        return loaded[split]
    return loaded


# --------------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------------


def detect_paired_format(source) -> PairedFormat:
    """Tell the layout of a paired `source` from its columns and first row.

    Raises DataError naming the file, the columns found and expected, and the closest known column for a
    mistyped one. A string `prompt` next to conversational `chosen`/`rejected` (as in UltraFeedback) is
    treated as implicit, as TRL's `maybe_extract_prompt` does.
    """
    columns = list(source.dataset.column_names)
    if len(source.dataset) == 0:
        raise DataError(f"{source.name}: has no rows. Fix: remove it from the data files or add rows.")
    if set(ID_COLUMNS) <= set(columns):
        return PairedFormat("pretokenized", False)
    if {"chosen", "rejected"} <= set(columns):
        conversational = _looks_conversational(source.dataset[0]["chosen"])
        if "prompt" in columns:
            prompt_conv = _looks_conversational(source.dataset[0]["prompt"])
            if conversational and isinstance(source.dataset[0]["prompt"], str) and not prompt_conv:
                return PairedFormat("implicit", True)
            return PairedFormat("explicit", conversational)
        # a mistyped 'prompt' would silently turn an explicit dataset into an implicit one
        _raise_if_mistyped(source.name, columns, missing=["prompt"], skip_extensions=True)
        return PairedFormat("implicit", conversational)
    _raise_missing_columns(source.name, columns)


def _looks_conversational(value) -> bool:
    """True for a list: text columns hold strings or lists of messages; a list that is empty or not made of
    dicts is then reported by the row checks ("empty completion", "message 0 is a str, not a dict")."""
    return isinstance(value, list)


def _closest(column: str, candidates) -> str | None:
    """The known column name closest to `column` (difflib), or None."""
    match = difflib.get_close_matches(column, list(candidates), n=1, cutoff=0.6)
    return match[0] if match else None


def _raise_if_mistyped(name: str, columns: list[str], missing: list[str], skip_extensions: bool = False) -> None:
    """DataError when an unknown column looks like a mistyped name of a `missing` known column.

    With `skip_extensions`, columns such as 'prompt_id' or 'chosen_score' (a known name + "_...") are
    taken as extra metadata, not typos.
    """
    for column in columns:
        if column in KNOWN_COLUMNS:
            continue
        if skip_extensions and any(column.startswith(known + "_") for known in TEXT_COLUMNS):
            continue
        guess = _closest(column, missing)
        if guess is not None:
            raise DataError(
                f"{name}: column '{column}' is not a known column; did you mean '{guess}'? "
                f"Found columns {columns}; expected {_LAYOUTS}. Fix: rename '{column}' to '{guess}'."
            )


def _raise_missing_columns(name: str, columns: list[str]) -> None:
    """DataError for a source that matches no paired layout (with a typo hint when one fits)."""
    present = set(columns)
    if present & set(ID_COLUMNS):
        missing = [c for c in ID_COLUMNS if c not in present]
    else:
        missing = [c for c in ("chosen", "rejected") if c not in present]
    _raise_if_mistyped(name, columns, missing)
    raise DataError(
        f"{name}: missing column(s) {missing}; found columns {columns}; expected {_LAYOUTS}. "
        f"Fix: add or rename the columns."
    )


# --------------------------------------------------------------------------------------------------
# Row validation
# --------------------------------------------------------------------------------------------------


def iter_rows(dataset, columns, batch_size: int = 1000) -> Iterator[dict]:
    """Yield rows of `dataset` restricted to `columns`, reading Arrow in batches (faster than ds[i])."""
    for batch in dataset.select_columns(list(columns)).iter(batch_size=batch_size):
        n = len(batch[columns[0]])
        for i in range(n):
            yield {c: batch[c][i] for c in columns}


def validate_paired_rows(source, fmt: PairedFormat, vocab_size: int | None = None) -> None:
    """Check every row of `source` against `fmt`; DataError at the first bad row (file, row, column, fix).

    `vocab_size` bounds pre-tokenized ids (ids must be in [0, vocab_size)).
    """
    if fmt.kind == "pretokenized":
        columns = ID_COLUMNS
    elif fmt.kind == "explicit":
        columns = TEXT_COLUMNS
    else:
        columns = ("chosen", "rejected")
    for index, row in enumerate(iter_rows(source.dataset, columns)):
        where = f"{source.name} row {index}"
        for column in columns:
            if fmt.kind == "pretokenized":
                _check_ids(where, column, row[column], vocab_size)
            elif fmt.conversational:
                _check_conversation(where, column, row[column])
            else:
                _check_text(where, column, row[column])
        if fmt.kind == "implicit":
            prompt, _, _ = split_implicit_prompt(row["chosen"], row["rejected"])
            if len(prompt) == 0:
                raise DataError(
                    f"{where}, columns 'chosen' and 'rejected': no shared prefix, so no prompt can be extracted. "
                    f"Fix: add a 'prompt' column, or make 'chosen' and 'rejected' both start with the prompt."
                )


def _empty_message(where: str, column: str) -> str:
    what = "prompt" if column.startswith("prompt") else "completion"
    return f"{where}, column '{column}': empty {what}. Fix: remove the row or give it a non-empty '{column}'."


def _check_text(where: str, column: str, value) -> None:
    """A standard value must be a non-empty string."""
    if not isinstance(value, str):
        raise DataError(
            f"{where}, column '{column}': expected a string, got {type(value).__name__} ({value!r:.60}). "
            f"Fix: make every '{column}' value a string (or every text column a list of messages)."
        )
    if value == "":
        raise DataError(_empty_message(where, column))


def _check_conversation(where: str, column: str, value) -> None:
    """A conversational value must be a non-empty list of {"role", "content"} dicts with known roles."""
    if not isinstance(value, list):
        raise DataError(
            f"{where}, column '{column}': expected a list of messages, got {type(value).__name__} "
            f"({value!r:.60}). Fix: make every '{column}' value a list like {_MESSAGE_EXAMPLE}."
        )
    if len(value) == 0:
        raise DataError(_empty_message(where, column))
    for j, message in enumerate(value):
        if not isinstance(message, dict):
            raise DataError(
                f"{where}, column '{column}': message {j} is a {type(message).__name__}, not a dict. "
                f"Fix: make every '{column}' value a list like {_MESSAGE_EXAMPLE}."
            )
        role = message.get("role")
        if role not in ALLOWED_ROLES:
            raise DataError(
                f"{where}, column '{column}': message {j} has role {role!r}; allowed roles are "
                f"{', '.join(ALLOWED_ROLES)}. Fix: change the role to one of them."
            )
        if message.get("content") is None:
            raise DataError(
                f"{where}, column '{column}': message {j} has no 'content'. "
                f"Fix: give every message a 'content' string."
            )


def _is_token_id(value) -> bool:
    """An int, or a whole float (a float64 column written by pandas or a lenient JSON writer)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) or (isinstance(value, float) and value.is_integer())


def _check_ids(where: str, column: str, value, vocab_size: int | None) -> None:
    """A pre-tokenized value must be a non-empty list of ints in [0, vocab_size)."""
    if not isinstance(value, list) or not all(_is_token_id(v) for v in value):
        raise DataError(
            f"{where}, column '{column}': expected a list of token ids (ints), got {value!r:.60}. "
            f"Fix: store '{column}' as lists of ints."
        )
    if len(value) == 0:
        raise DataError(_empty_message(where, column))
    for position, token in enumerate(value):
        if token < 0 or (vocab_size is not None and token >= vocab_size):
            token = int(token)
            bound = "" if vocab_size is None else f" (the tokenizer has {vocab_size} tokens)"
            raise DataError(
                f"{where}, column '{column}': token id {token} at position {position} is out of range{bound}. "
                f"Fix: re-tokenize the data with the model's tokenizer."
            )


# --------------------------------------------------------------------------------------------------
# Implicit prompt
# --------------------------------------------------------------------------------------------------


def split_implicit_prompt(chosen, rejected):
    """Split implicit-prompt `chosen`/`rejected` into (prompt, chosen_rest, rejected_rest).

    Same rule as TRL 1.16 `trl.data_utils.extract_prompt`: the prompt is the longest shared prefix
    (characters for strings, whole messages for conversations); a space just before the first difference
    goes to the completions; and when one value is a prefix of the other the prefix stops one item short, so
    both completions keep at least one item. An empty prompt means "no shared prefix".
    """
    shortest = min(len(chosen), len(rejected))
    if shortest == 0:
        return chosen[:0], chosen, rejected
    idx = shortest - 1  # TRL's loop leaves idx at the last index when no difference is found
    for i in range(shortest):
        if chosen[i] != rejected[i]:
            idx = i
            # TRL reads chosen[idx - 1] even at idx 0; there the prompt is empty anyway, so skip the check
            if idx > 0 and chosen[idx - 1] == " ":  # keep the space with the completion
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]
