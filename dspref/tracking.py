"""One metrics logger: ``metrics.jsonl`` + console + Weights & Biases + TensorBoard, on rank 0 only.

Other ranks hold a :class:`NullTracker`, so callers never test the rank themselves.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import uuid

log = logging.getLogger("dspref")

METRICS_FILE = "metrics.jsonl"
WANDB_ID_FILE = "wandb_run_id"
GENERATIONS_FILE = "generations.jsonl"
TENSORBOARD_DIR = "tensorboard"


class NullTracker:
    """What non-zero ranks hold: accepts everything, does nothing."""

    def log(self, row: dict) -> None:
        pass

    def write(self, message: str) -> None:
        pass

    def log_generations(self, step: int, rows: list[dict]) -> None:
        pass

    def close(self) -> None:
        pass


class Tracker(NullTracker):
    """Appends each row to ``output_dir/metrics.jsonl``, prints it, and forwards it to W&B and TensorBoard.

    ``start_step``: the step a resumed run continues from; TensorBoard then discards the events an
    earlier attempt logged after it, as ``metrics.jsonl`` drops its rows past it.
    """

    def __init__(self, output_dir: str, *, report_to: list[str], config: dict, run_name: str | None,
                 project: str, console=None, start_step: int = 0):
        self.path = os.path.join(output_dir, METRICS_FILE)
        self.console = console or (lambda line: print(line, flush=True))
        self.wandb = None
        if "wandb" in report_to:
            self.wandb = _start_wandb(output_dir, config=config, run_name=run_name, project=project)
        self.tensorboard = _start_tensorboard(output_dir, start_step) if "tensorboard" in report_to else None

    def log(self, row: dict) -> None:
        # One line per row, flushed: a reader (or a crash) sees whole rows only.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        self.console(format_row(row))
        if self.wandb is not None:
            step = row["step"]
            self.wandb.log({_wandb_name(k): v for k, v in row.items() if k != "step"}, step=step)
        if self.tensorboard is not None:
            # The metric names of metrics.jsonl, so curves and rows are found under one name everywhere.
            for key, value in row.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.tensorboard.add_scalar(key, value, global_step=row["step"])
            self.tensorboard.flush()  # a run killed later keeps every row it logged

    def write(self, message: str) -> None:
        self.console(message)

    def log_generations(self, step: int, rows: list[dict]) -> None:
        """A generate-during-eval table: appended to ``generations.jsonl`` (one line per row, with its
        step) and logged to W&B as a table; the console gets the first row."""
        if not rows:
            return
        with open(os.path.join(os.path.dirname(self.path), GENERATIONS_FILE), "a", encoding="utf-8") as f:
            f.write("".join(json.dumps({"step": step, **row}, ensure_ascii=False) + "\n" for row in rows))
        first = rows[0]
        self.console(f"generations (step {step}, {len(rows)} rows): " + " | ".join(
            f"{k}={str(v)[:60]!r}" for k, v in first.items() if k != "row"))
        if self.wandb is not None:
            import wandb

            columns = ["step", *rows[0]]
            table = wandb.Table(columns=columns, data=[[step, *(row.get(c) for c in columns[1:])] for row in rows])
            self.wandb.log({"eval/generations": table}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def _wandb_name(key: str) -> str:
    """``eval_rewards/chosen`` -> ``eval/rewards/chosen``, ``loss`` -> ``train/loss`` (TRL's panels)."""
    if key.startswith("eval_"):
        return "eval/" + key[len("eval_"):]
    return "train/" + key


def _start_wandb(output_dir: str, *, config: dict, run_name: str | None, project: str):
    """``wandb.init`` once, on rank 0, resuming the same run id after a restart (offline honoured)."""
    import wandb

    id_path = os.path.join(output_dir, WANDB_ID_FILE)
    if os.path.exists(id_path):
        with open(id_path, encoding="utf-8") as f:
            run_id = f.read().strip()
    else:
        run_id = uuid.uuid4().hex[:12]
        with open(id_path, "w", encoding="utf-8") as f:
            f.write(run_id)
    # The config holds paths and hyper-parameters only; keys come from the environment and are
    # never copied into it.
    return wandb.init(project=os.environ.get("WANDB_PROJECT", project), name=run_name, id=run_id,
                      resume="allow", dir=output_dir, config=config)


def _start_tensorboard(output_dir: str, start_step: int):
    """A SummaryWriter under ``output_dir/tensorboard``; on resume, events past ``start_step`` are purged."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(log_dir=os.path.join(output_dir, TENSORBOARD_DIR),
                         purge_step=start_step + 1 if start_step else None)


def format_row(row: dict) -> str:
    """Compact console form of a metrics row."""
    parts = []
    for key, value in row.items():
        if isinstance(value, float):
            value = f"{value:.4g}" if math.isfinite(value) else str(value)
        parts.append(f"{key}={value}")
    return " ".join(parts)


def read_metrics(path: str) -> list[dict]:
    """Rows of a ``metrics.jsonl``; a truncated last line (a run killed mid-write) is skipped with a warning."""
    rows = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                log.warning("%s: skipping truncated last line %d", path, i + 1)
                continue
            raise ValueError(f"{path} line {i + 1} is not valid JSON") from None
    return rows


class MetricsError(ValueError):
    """A run folder whose ``metrics.jsonl`` is missing, empty or unreadable (the message names it and the fix)."""


def read_run_metrics(output_dir: str) -> list[dict]:
    """The rows of ``output_dir/metrics.jsonl`` for reports (plots, comparisons).

    A truncated last line is skipped with a warning (:func:`read_metrics`); a missing file, a damaged
    line elsewhere or a file with no rows is a :class:`MetricsError`.
    """
    path = os.path.join(output_dir, METRICS_FILE)
    if not os.path.isdir(output_dir):
        raise MetricsError(f"{output_dir}: no such folder; pass the output_dir of a dspref run")
    if not os.path.isfile(path):
        raise MetricsError(f"{output_dir} has no {METRICS_FILE}; pass the output_dir of a dspref run (the folder "
                           f"training writes {METRICS_FILE} into)")
    try:
        rows = read_metrics(path)
    except UnicodeDecodeError:
        raise MetricsError(f"{path} is not UTF-8 text; it is not a dspref metrics file") from None
    except ValueError as e:
        raise MetricsError(f"{e}; repair or delete that line") from None
    for i, row in enumerate(rows):
        if not isinstance(row, dict) or isinstance(row.get("step"), bool) or not isinstance(row.get("step"), int):
            raise MetricsError(f"{path}: row {i + 1} is not a metrics row (a JSON object with an integer 'step'); "
                               f"repair or delete it")
    if not rows:
        raise MetricsError(f"{path} holds no rows yet; plot or compare the run once it has logged a step")
    return rows


def drop_rows_after(path: str, step: int) -> int:
    """Rewrite ``metrics.jsonl`` without rows past ``step`` (a resumed run logs them again).

    Atomic: written to a temporary file and renamed over the old one. Returns rows dropped.
    """
    if not os.path.exists(path):
        return 0
    rows = read_metrics(path)
    kept = [r for r in rows if r.get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        for row in kept:
            f.write(json.dumps(row, allow_nan=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return len(rows) - len(kept)


def make_progress(total: int, initial: int, enabled: bool):
    """A tqdm bar on a terminal; ``None`` when stdout is not one (SLURM logs get plain lines)."""
    if not enabled or not sys.stdout.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True)
