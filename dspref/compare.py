"""``dspref compare RUN_A RUN_B [...]``: runs side by side, read from their ``metrics.jsonl``.

For each eval metric the final value (the last eval row that logged it) and, where a direction is
clear, the best one with its step: lowest for losses, highest for accuracies and margins. Then
throughput (median ``tokens_per_second`` over the train rows) and peak memory (the largest
``peak_memory_gib`` / ``peak_rss_gib`` logged).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from dspref.plots import Run, load_runs
from dspref.tracking import MetricsError

MISSING = "-"


def best_direction(metric: str) -> str | None:
    """``"min"`` for losses, ``"max"`` for accuracies and margins, None where "best" means nothing."""
    name = metric.removeprefix("eval_").rsplit("/", 1)[-1]
    if name.endswith("loss"):
        return "min"
    if name in ("accuracies", "accuracy", "margins", "margin"):
        return "max"
    return None


def eval_metrics(runs: list[Run]) -> list[str]:
    """Eval metric names over all runs, ``eval_loss`` first, then in the order the rows hold them."""
    names: list[str] = []
    for run in runs:
        for row in run.rows:
            names += [k for k in row if k.startswith("eval_") and k not in names]
    return sorted(names, key=lambda n: n != "eval_loss")


def compare_rows(runs: list[Run]) -> list[tuple[str, list[str]]]:
    """The table: ``(row label, one cell per run)``."""
    table = [("steps", [str(max(r["step"] for r in run.rows)) for run in runs])]
    for metric in eval_metrics(runs):
        points = [run.points(metric) for run in runs]
        table.append((f"{metric} (final)", [_fmt(values[-1]) if values else MISSING for _, values in points]))
        direction = best_direction(metric)
        if direction:
            cells = []
            for steps, values in points:
                if not values:
                    cells.append(MISSING)
                    continue
                pick = min if direction == "min" else max
                i = pick(range(len(values)), key=values.__getitem__)
                cells.append(f"{_fmt(values[i])} (step {steps[i]})")
            table.append((f"{metric} (best)", cells))
    table.append(("tokens_per_second (median)", [_summary(run, "tokens_per_second", statistics.median)
                                                 for run in runs]))
    table.append(("peak_memory_gib (max)", [_summary(run, "peak_memory_gib", max) for run in runs]))
    table.append(("peak_rss_gib (max)", [_summary(run, "peak_rss_gib", max) for run in runs]))
    return table


def _summary(run: Run, metric: str, how) -> str:
    values = run.points(metric)[1]
    return _fmt(how(values)) if values else MISSING


def _fmt(value: float) -> str:
    return f"{value:.5g}"


def format_table(runs: list[Run], table: list[tuple[str, list[str]]]) -> str:
    """Fixed-width text: one column per run, headed by its label."""
    width0 = max(len(label) for label, _ in table)
    widths = [max(len(run.label), *(len(cells[i]) for _, cells in table)) for i, run in enumerate(runs)]
    lines = ["  ".join([" " * width0] + [run.label.rjust(w) for run, w in zip(runs, widths)])]
    for label, cells in table:
        lines.append("  ".join([label.ljust(width0)] + [c.rjust(w) for c, w in zip(cells, widths)]))
    return "\n".join(line.rstrip() for line in lines)


DESCRIPTION = ("Final and best eval metrics, tokens/s and peak memory of runs side by side, from "
               "their metrics.jsonl.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dspref compare", description=DESCRIPTION)
    p.add_argument("output_dirs", nargs="+", metavar="RUN", help="run folders (output_dir) holding metrics.jsonl")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        runs = load_runs(args.output_dirs)
    except MetricsError as e:
        print(f"dspref compare: error: {e}", file=sys.stderr)
        return 2
    print(format_table(runs, compare_rows(runs)))
    return 0
