"""Run reports on one real short run (CPO, 2 ranks, ZeRO-3, report_to tensorboard): the TensorBoard
scalars, the figures written at the end of training and by `dspref plot`, `dspref compare`, and
`dspref eval` reproducing the run's eval rows from a checkpoint (2-rank shards, evaluated in one
plain process) and from the exported model.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess

import pytest

from conftest import base_args, launch, read_metrics
from dspref.config import ConfigError, parse_args
from dspref.plots import DPI, FIGSIZE, FIGURES

slow = pytest.mark.slow
MAX_STEPS, EVERY = 4, 2
# The CPO run's length options; an exported model is evaluated with the same ones.
LENGTHS = ["--max_length", "64", "--max_prompt_length", "32"]


@pytest.fixture(scope="module")
def cpo_run(tmp_path_factory, small_data):
    out = tmp_path_factory.mktemp("reports") / "run"
    args = base_args(out, *small_data, ds_config="zero3.json", max_steps=MAX_STEPS, save_steps=EVERY,
                     eval_steps=EVERY, report_to="tensorboard")
    proc = launch(["launch/train.py"] + args, nprocs=2)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return out


def cli(*args: str) -> subprocess.CompletedProcess:
    """``python -m dspref.cli ARGS`` as a plain process (no launcher)."""
    return launch(["-m", "dspref.cli", *map(str, args)], nprocs=1, launcher="python", timeout=300)


def eval_row(rows: list[dict], step: int) -> dict:
    (row,) = [r for r in rows if r["step"] == step and "eval_loss" in r]
    return row


# ---------------------------------------------------------------- report_to


def test_report_to_takes_tensorboard_alone_or_with_wandb():
    m = ["--model_name_or_path", "m"]
    assert parse_args(m + ["--report_to", "tensorboard"])[0].report_to == ["tensorboard"]
    assert parse_args(m + ["--report_to", "wandb,tensorboard"])[0].report_to == ["wandb", "tensorboard"]
    with pytest.raises(ConfigError, match=r"wandb \| tensorboard \| none"):
        parse_args(m + ["--report_to", "mlflow"])
    with pytest.raises(ConfigError, match="cannot combine none"):
        parse_args(m + ["--report_to", "none,tensorboard"])


def test_tensorboard_on_resume_drops_the_steps_past_the_checkpoint(tmp_path):
    """As metrics.jsonl drops its rows past the checkpoint, TensorBoard purges the old attempt's later events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dspref.tracking import Tracker

    def tracker(start_step):
        return Tracker(str(tmp_path), report_to=["tensorboard"], config={}, run_name=None, project="p",
                       console=lambda line: None, start_step=start_step)

    first = tracker(0)
    for step in range(1, 5):
        first.log({"step": step, "loss": float(step)})
    first.close()
    resumed = tracker(2)
    for step in (3, 4):
        resumed.log({"step": step, "loss": 10.0 * step})
    resumed.close()
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_a_restarted_run_continues_the_same_wandb_run(tmp_path, monkeypatch):
    """A requeued or resumed job logs into the W&B run it started (the id kept in output_dir), offline here."""
    from dspref.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")

    def attempt(start_step, steps):
        tracker = Tracker(str(tmp_path), report_to=["wandb"], config={"beta": 0.1}, run_name="r", project="p",
                          console=lambda line: None, start_step=start_step)
        run_id = tracker.wandb.id
        for step in steps:
            tracker.log({"step": step, "loss": float(step)})
        tracker.close()
        return run_id

    first = attempt(0, [1, 2])
    assert (tmp_path / "wandb_run_id").read_text().strip() == first
    assert attempt(2, [3, 4]) == first
    runs = sorted((tmp_path / "wandb").glob("offline-run-*"))
    # two attempts, one W&B run id (W&B names a folder offline-run-<time>-<id>, "-1" added within the same second)
    assert len(runs) == 2 and all(re.fullmatch(rf"offline-run-[\d_]+-{first}(-\d+)?", r.name) for r in runs), runs


@slow
def test_tensorboard_event_file_holds_the_logged_scalars(cpo_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(cpo_run / "tensorboard"))
    events.Reload()
    rows = read_metrics(cpo_run)
    logged = {k for row in rows for k in row if k != "step"}
    assert set(events.Tags()["scalars"]) == logged  # the same names as metrics.jsonl
    for name in logged:
        expected = [(r["step"], r[name]) for r in rows if name in r]
        got = [(e.step, e.value) for e in events.Scalars(name)]
        assert [s for s, _ in got] == [s for s, _ in expected], name
        for (_, value), (_, want) in zip(got, expected):
            assert value == pytest.approx(want, rel=1e-6, abs=1e-12), name  # stored as float32
    assert {"loss", "eval_loss", "rewards/chosen", "learning_rate", "tokens_per_second"} <= logged


# ---------------------------------------------------------------- figures


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG header."""
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


def colour_pixels(path, rgb: tuple[int, int, int]) -> int:
    """Pixels within a small distance of ``rgb`` (a line's colour)."""
    import numpy as np
    from matplotlib.image import imread

    image = imread(str(path))[..., :3]
    return int((np.abs(image - np.array(rgb) / 255.0).max(axis=-1) < 0.05).sum())


def check_figure(path, run_colours) -> None:
    import numpy as np
    from matplotlib.image import imread

    assert png_size(path) == (round(FIGSIZE[0] * DPI), round(FIGSIZE[1] * DPI))
    image = imread(str(path))[..., :3]
    assert (image.min(axis=-1) < 0.9).mean() > 0.01, f"{path.name} is (nearly) blank"
    for rgb in run_colours:
        assert colour_pixels(path, rgb) > 30, (path.name, rgb)  # each run drew its line


C0, C1 = (31, 119, 180), (255, 127, 14)  # matplotlib's first two cycle colours: run 1, run 2


@slow
def test_training_writes_every_figure_into_plots(cpo_run):
    written = sorted(p.name for p in (cpo_run / "plots").iterdir())
    assert written == sorted(f"{spec.name}.png" for spec in FIGURES)  # CPO logs every plotted quantity
    for name in written:
        check_figure(cpo_run / "plots" / name, [C0])


@pytest.fixture
def second_run(cpo_run, tmp_path):
    """A copy of the run's metrics with other losses and a last line cut mid-write (a killed run)."""
    other = tmp_path / "other"
    other.mkdir()
    lines = []
    for row in read_metrics(cpo_run):
        if "loss" in row:
            row["loss"] *= 0.5
        lines.append(json.dumps(row))
    (other / "metrics.jsonl").write_text("\n".join(lines) + '\n{"step": 7, "loss": 0.4, "learning_ra')
    return other


@slow
def test_plot_command_overlays_runs_and_skips_a_truncated_last_line(cpo_run, second_run, tmp_path, capsys, caplog):
    from dspref.plots import main

    with caplog.at_level("WARNING", logger="dspref"):
        assert main([str(cpo_run), str(second_run), "--out", str(tmp_path / "figs")]) == 0
    assert f"{second_run}/metrics.jsonl: skipping truncated last line" in caplog.text
    assert "7 figures of 2 run(s)" in capsys.readouterr().out
    for spec in FIGURES:
        check_figure(tmp_path / "figs" / f"{spec.name}.png", [C0, C1])


@slow
def test_compare_command_puts_runs_side_by_side(cpo_run, second_run):
    proc = cli("compare", cpo_run, second_run)
    assert proc.returncode == 0, proc.stderr
    lines = [re.split(r"\s{2,}", line.strip()) for line in proc.stdout.splitlines()]  # cells: 2+ spaces apart
    assert lines[0] == ["run", "other"]
    table = {cells[0]: cells[1:] for cells in lines[1:]}
    rows = read_metrics(cpo_run)
    evals = [r for r in rows if "eval_loss" in r]
    assert table["steps"] == [str(MAX_STEPS), str(MAX_STEPS)]
    assert table["eval_loss (final)"] == [f"{evals[-1]['eval_loss']:.5g}"] * 2
    best = min(evals, key=lambda r: r["eval_loss"])
    assert table["eval_loss (best)"] == [f"{best['eval_loss']:.5g} (step {best['step']})"] * 2
    best_acc = max(r["eval_rewards/accuracies"] for r in evals)
    assert table["eval_rewards/accuracies (best)"][0].split()[0] == f"{best_acc:.5g}"
    assert "eval_rewards/chosen (best)" not in table  # "best" only where it means something
    rss = max(r["peak_rss_gib"] for r in rows if "peak_rss_gib" in r)
    assert table["peak_rss_gib (max)"] == [f"{rss:.5g}"] * 2
    assert float(table["tokens_per_second (median)"][0]) > 0


@pytest.mark.parametrize("command", ["plot", "compare"])
def test_a_folder_without_metrics_is_refused_with_one_line(command, tmp_path, capsys):
    import importlib

    main = importlib.import_module({"plot": "dspref.plots", "compare": "dspref.compare"}[command]).main
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"dspref {command}: error: {empty} has no metrics.jsonl; pass the output_dir of a dspref run "
                   f"(the folder training writes metrics.jsonl into)")
    (empty / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    assert main([str(empty)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "metrics.jsonl line 2 is not valid JSON; repair or delete that line" in err


def test_plots_at_the_end_of_training_never_fail_the_run(tmp_path, caplog):
    from dspref.plots import write_run_plots

    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp_path / "plots").write_text("a file where the folder should go")
    with caplog.at_level("WARNING", logger="dspref"):
        assert write_run_plots(str(tmp_path)) == []
    assert "plots not written" in caplog.text and f"dspref plot {tmp_path}" in caplog.text


# ---------------------------------------------------------------- dspref eval


@slow
def test_eval_on_a_checkpoint_reproduces_its_eval_row(cpo_run, small_data, tmp_path):
    """2-rank ZeRO-3 shards of a mid-run step, evaluated in one plain process: the row the run logged then."""
    out = tmp_path / "eval.json"
    proc = cli("eval", "--model", cpo_run / f"checkpoint-{EVERY}", "--data", small_data[1], "--out", out)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    logged = eval_row(read_metrics(cpo_run), EVERY)
    assert report["checkpoint_step"] == EVERY and report["method"] == "cpo" and report["rows"] == 16
    assert set(report["metrics"]) == set(logged) - {"step"}
    for name, value in report["metrics"].items():
        assert value == pytest.approx(logged[name], abs=1e-5), name
    assert report["logged_max_abs_difference"] < 1e-5 and report["logged_metrics_compared"] == len(logged) - 1
    assert re.search(rf"^ +eval_loss +{re.escape(format(report['metrics']['eval_loss'], '.6g'))}$", proc.stdout,
                     re.M)  # the table


@slow
def test_eval_on_the_exported_model_reproduces_the_final_eval_row(cpo_run, small_data, tmp_path, capsys):
    from dspref.eval_model import main

    out = tmp_path / "export.json"
    assert main(["--model", str(cpo_run), "--method", "cpo", "--data", str(small_data[1]), "--out", str(out),
                 *LENGTHS]) == 0
    report = json.loads(out.read_text())
    logged = eval_row(read_metrics(cpo_run), MAX_STEPS)
    assert report["checkpoint_step"] is None and report["omitted"] == []  # CPO carries no state
    assert set(report["metrics"]) == set(logged) - {"step"}
    for name, value in report["metrics"].items():
        assert value == pytest.approx(logged[name], abs=1e-5), name
    # the same checkpoint-free eval with another beta is another objective: the loss moves
    assert main(["--model", str(cpo_run), "--method", "cpo", "--data", str(small_data[1]), "--out", str(out),
                 "--beta", "1.0", *LENGTHS]) == 0
    assert abs(json.loads(out.read_text())["metrics"]["eval_loss"] - logged["eval_loss"]) > 1e-3
    capsys.readouterr()


@slow
def test_eval_refuses_a_checkpoint_moved_out_of_its_run(cpo_run, small_data, tmp_path, capsys):
    from dspref.eval_model import main

    moved = tmp_path / f"checkpoint-{EVERY}"
    shutil.copytree(cpo_run / f"checkpoint-{EVERY}", moved)
    assert main(["--model", str(moved), "--data", str(small_data[1])]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (f"dspref eval: error: checkpoint {moved}: its run folder {tmp_path} lacks dspref_config.yaml and "
                   f"ds_config.json (written there when training starts); evaluate it inside its output_dir")
