"""``dspref plot OUTPUT_DIR [OUTPUT_DIR ...]``: PNG figures of runs' ``metrics.jsonl``, runs overlaid.

One figure per quantity a user judges an alignment run by: loss, ``rewards/chosen`` vs
``rewards/rejected``, ``rewards/margins``, accuracy, learning rate, tokens/s and memory. Train
and eval values sit in side-by-side panels (eval rows are few: drawn with markers). Each run has
one colour in every figure, so several runs (recipes) compare at a glance. Matplotlib's Agg
canvas draws them: no display, no pyplot state. Training writes the same figures into
``output_dir/plots/`` when it ends.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import dataclass

from dspref.tracking import MetricsError, read_run_metrics

log = logging.getLogger("dspref")

PLOTS_DIR = "plots"
FIGSIZE = (12.0, 4.5)  # inches; every figure is FIGSIZE x DPI pixels (1200 x 450)
DPI = 100


@dataclass(frozen=True)
class Series:
    metric: str  # key in metrics.jsonl
    label: str  # shown in the legend when a panel has several series
    style: str = "-"


@dataclass(frozen=True)
class Panel:
    title: str
    series: tuple[Series, ...]


@dataclass(frozen=True)
class FigureSpec:
    name: str  # file name without .png
    title: str
    ylabel: str
    panels: tuple[Panel, ...]


def _train_eval(label: str, *names: str) -> tuple[Panel, Panel]:
    """A train panel over ``names`` and an eval panel over their ``eval_`` names (reward modeling's
    metric names sit beside TRL's preference names: a run logs one or the other)."""
    train = tuple(Series(n, label) for n in names)
    return Panel("train", train), Panel("eval", tuple(Series("eval_" + s.metric, s.label) for s in train))


def _chosen_rejected(prefix: str) -> tuple[Series, ...]:
    return (Series(f"{prefix}rewards/chosen", "chosen", "-"), Series(f"{prefix}rewards/rejected", "rejected", "--"))


FIGURES = (
    FigureSpec("loss", "Loss", "loss", _train_eval("loss", "loss")),
    FigureSpec("rewards", "rewards/chosen vs rewards/rejected", "reward",
               (Panel("train", _chosen_rejected("")), Panel("eval", _chosen_rejected("eval_")))),
    FigureSpec("margins", "rewards/margins", "chosen − rejected reward",
               _train_eval("margin", "rewards/margins", "margin")),
    FigureSpec("accuracy", "Preference accuracy", "accuracy",
               _train_eval("accuracy", "rewards/accuracies", "accuracy")),
    FigureSpec("learning_rate", "Learning rate", "learning rate", (Panel("train", (Series("learning_rate", "lr"),)),)),
    FigureSpec("tokens_per_second", "Throughput", "tokens/s (all ranks)",
               (Panel("train", (Series("tokens_per_second", "tokens/s"),)),)),
    FigureSpec("memory", "Peak memory", "GiB",
               (Panel("accelerator (max over ranks)", (Series("peak_memory_gib", "accelerator"),)),
                Panel("host RSS (max over ranks)", (Series("peak_rss_gib", "host RSS"),)))),
)


@dataclass
class Run:
    label: str
    rows: list[dict]

    def points(self, metric: str) -> tuple[list[float], list[float]]:
        """``(steps, values)`` of the rows that logged ``metric`` as a number, in step order."""
        pairs = [(r["step"], r[metric]) for r in self.rows
                 if isinstance(r.get(metric), (int, float)) and not isinstance(r.get(metric), bool)]
        pairs.sort(key=lambda p: p[0])
        return [p[0] for p in pairs], [float(p[1]) for p in pairs]


def load_runs(output_dirs: list[str]) -> list[Run]:
    """Each folder's metrics rows, labelled by folder name (the path as given when two names collide)."""
    names = [os.path.basename(os.path.normpath(d)) or d for d in output_dirs]
    labels = [n if names.count(n) == 1 else os.path.normpath(d) for n, d in zip(names, output_dirs)]
    return [Run(label, read_run_metrics(d)) for label, d in zip(labels, output_dirs)]


def plot_runs(runs: list[Run], out_dir: str) -> tuple[list[str], list[str]]:
    """Write one PNG per figure that has data into ``out_dir``; returns ``(written paths, skipped names)``."""
    os.makedirs(out_dir, exist_ok=True)
    written, skipped = [], []
    for spec in FIGURES:
        panels = [p for p in spec.panels if any(run.points(s.metric)[0] for run in runs for s in p.series)]
        if not panels:
            skipped.append(spec.name)
            continue
        path = os.path.join(out_dir, spec.name + ".png")
        _save(_draw(spec, panels, runs), path)
        written.append(path)
    return written, skipped


def _draw(spec: FigureSpec, panels: list[Panel], runs: list[Run]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(spec.title)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for i, (panel, ax) in enumerate(zip(panels, fig.subplots(1, len(panels), squeeze=False)[0])):
        is_eval = panel.title == "eval"
        for run, colour in zip(runs, colours):
            for series in panel.series:
                steps, values = run.points(series.metric)
                if not steps:
                    continue
                parts = [run.label] * (len(runs) > 1) + [series.label] * (len({s.label for s in panel.series}) > 1)
                ax.plot(steps, values, series.style, color=colour, marker="o" if is_eval else None, markersize=4,
                        linewidth=1.5, label=" · ".join(parts) or run.label)
        ax.set_title(panel.title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(spec.ylabel if i == 0 else "")
        ax.grid(True, alpha=0.3)
        if len(ax.get_lines()) > 1:
            ax.legend(fontsize="small")
    return fig


def _save(fig, path: str) -> None:
    """PNG via a temporary file and ``os.replace``: a reader never sees half a figure."""
    tmp = path + ".tmp"
    try:
        fig.savefig(tmp, format="png", dpi=DPI)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_run_plots(output_dir: str) -> list[str]:
    """End of training: the figures of this run into ``output_dir/plots``. Never raises: a plot
    failure is a warning, never a lost run."""
    try:
        written, _ = plot_runs(load_runs([output_dir]), os.path.join(output_dir, PLOTS_DIR))
    except Exception as e:  # noqa: BLE001 - the run's results matter more than its figures
        log.warning("plots not written (%s: %s); draw them later with: dspref plot %s", type(e).__name__, e,
                    output_dir)
        return []
    log.info("plots: %d figures in %s", len(written), os.path.join(output_dir, PLOTS_DIR))
    return written


DESCRIPTION = ("PNG figures (loss, rewards, margins, accuracy, learning rate, tokens/s, memory) of "
               "the runs' metrics.jsonl, several runs overlaid.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dspref plot", description=DESCRIPTION)
    p.add_argument("output_dirs", nargs="+", metavar="OUTPUT_DIR", help="run folders holding metrics.jsonl")
    p.add_argument("--out", default=None,
                   help=f"folder for the PNGs (default: OUTPUT_DIR/{PLOTS_DIR} for one run, ./{PLOTS_DIR} for several)")
    return p


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    out = args.out or (os.path.join(args.output_dirs[0], PLOTS_DIR) if len(args.output_dirs) == 1 else PLOTS_DIR)
    try:
        runs = load_runs(args.output_dirs)
        written, skipped = plot_runs(runs, out)
    except MetricsError as e:
        print(f"dspref plot: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"dspref plot: error: cannot write figures into {out!r}: {e.strerror or e}; choose another --out",
              file=sys.stderr)
        return 2
    print(f"dspref plot: {len(written)} figures of {len(runs)} run(s) in {out}: "
          + ", ".join(os.path.basename(p) for p in written))
    if skipped:
        print(f"  no data for: {', '.join(skipped)}")
    return 0
