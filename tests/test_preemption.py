"""Preemption and faults, 2 CPU ranks, ZeRO-3, under the deepspeed launcher.

- SIGTERM reaching one rank only (ranks are signalled at different moments on a real cluster):
  both ranks stop after the same step, write one complete checkpoint and the requeue marker; a
  second SIGTERM during that changes nothing. The requeued job (SLURM_RESTART_COUNT=1, no resume
  option) resumes by itself and logs exactly the losses of an uninterrupted run.
- SIGKILL of a rank mid-run: the last complete checkpoint loads and the resumed run again matches.
- Resuming a 2-rank ZeRO-3 checkpoint with 1 rank: refused, before any model is built, saying how.
"""

from __future__ import annotations

import json
import signal
import time

import psutil
import pytest

from conftest import base_args, launch, read_metrics, start, wait_for

pytestmark = pytest.mark.slow
STEPS = 100


def _train_losses(out) -> dict[int, float]:
    rows = [r for r in read_metrics(out) if "loss" in r]
    steps = [r["step"] for r in rows]
    assert len(steps) == len(set(steps)), f"a step was logged twice: {steps}"
    return {r["step"]: r["loss"] for r in rows}


def _args(out, train, **kw):
    opts = {"ds_config": "zero3.json", "max_steps": STEPS, "save_steps": 1000, "per_device_train_batch_size": 2, **kw}
    return ["launch/train.py"] + base_args(out, train, **opts)


def _rank_pid(proc, rank: int) -> int:
    for _ in range(200):
        for child in psutil.Process(proc.pid).children(recursive=True):
            if f"--local_rank={rank}" in " ".join(child.cmdline()):
                return child.pid
        time.sleep(0.1)
    raise AssertionError("rank process not found")


def _logged_step(out) -> int:
    path = out / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = [line for line in path.read_text().splitlines() if line.endswith("}")]
    return json.loads(lines[-1]).get("step", 0) if lines else 0


def _check(proc):
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_data):
    out = tmp_path_factory.mktemp("full") / "run"
    _check(launch(_args(out, small_data[0]), nprocs=2))
    losses = _train_losses(out)
    assert sorted(losses) == list(range(1, STEPS + 1))
    return losses


def test_sigterm_on_one_rank_saves_requeues_and_resumes_exactly(tmp_path, small_data, uninterrupted):
    out = tmp_path / "run"
    proc = start(_args(out, small_data[0]), nprocs=2, log_path=tmp_path / "first.log")
    rank1 = _rank_pid(proc, 1)
    wait_for(lambda: _logged_step(out) >= 3, "step 3")
    psutil.Process(rank1).send_signal(signal.SIGTERM)
    time.sleep(0.05)
    psutil.Process(rank1).send_signal(signal.SIGTERM)  # a second one, typically while saving
    wait_for(lambda: (out / "preempted.json").exists() or proc.poll() is not None, "the marker")
    try:  # and a third after the save: the process still exits with its own status, not killed
        psutil.Process(rank1).send_signal(signal.SIGTERM)
    except psutil.NoSuchProcess:
        pass
    proc.wait(timeout=240)
    log = (tmp_path / "first.log").read_text()
    marker = json.loads((out / "preempted.json").read_text())
    step = marker["step"]
    assert 3 <= step < STEPS, log[-3000:]
    assert marker["reason"] == "SIGTERM" and marker["checkpoint"].endswith(f"checkpoint-{step}")
    assert (out / "latest").read_text().strip() == f"checkpoint-{step}"
    assert [p.name for p in out.glob("checkpoint-*")] == [f"checkpoint-{step}"]
    assert not list(out.glob(".tmp-*"))  # complete, renamed into place
    assert json.loads((out / f"checkpoint-{step}" / "dspref_state.json").read_text())["step"] == step
    assert max(_train_losses(out)) == step  # both ranks stopped after the same step
    assert f"dspref: preempted (SIGTERM) at step {step}" in log
    assert not (out / "model.safetensors").exists()  # not finished: nothing exported

    # the requeued job: same command, SLURM_RESTART_COUNT=1 -> resumes from latest by itself
    _check(launch(_args(out, small_data[0]), nprocs=2, env={"SLURM_RESTART_COUNT": "1"}))
    assert not (out / "preempted.json").exists()
    resumed = _train_losses(out)
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for s in resumed:
        assert resumed[s] == pytest.approx(uninterrupted[s], abs=1e-6), (s, resumed[s], uninterrupted[s])

    # the 2-rank ZeRO-3 checkpoint on 1 rank: refused before any model is built, with the way out
    proc = launch(["launch/train.py"] + base_args(out, small_data[0], ds_config="zero3.json", max_steps=STEPS,
                                                   resume_from_checkpoint=out / f"checkpoint-{step}"),
                  nprocs=1, launcher="python")
    assert proc.returncode == 2
    assert (f"dspref: error: {out}/checkpoint-{step} was written by 2 ranks and this run has 1: ZeRO shards and "
            f"the data order belong to the rank count. Resume with 2 ranks") in proc.stderr


def test_sigkill_mid_run_leaves_a_loadable_checkpoint(tmp_path, small_data, uninterrupted):
    out = tmp_path / "run"
    proc = start(_args(out, small_data[0], save_steps=5), nprocs=2, log_path=tmp_path / "first.log")
    rank0 = _rank_pid(proc, 0)
    wait_for(lambda: (out / "latest").exists() and _logged_step(out) >= 12, "a checkpoint and step 12")
    psutil.Process(rank0).send_signal(signal.SIGKILL)
    proc.wait(timeout=120)
    assert proc.returncode != 0
    latest = (out / "latest").read_text().strip()
    saved = json.loads((out / latest / "dspref_state.json").read_text())["step"]
    assert latest == f"checkpoint-{saved}" and saved % 5 == 0
    _check(launch(_args(out, small_data[0], save_steps=5, resume_from_checkpoint="latest"), nprocs=2))
    resumed = _train_losses(out)  # rows logged after the checkpoint by the killed run were dropped
    assert sorted(resumed) == list(range(1, STEPS + 1))
    for s in resumed:
        assert resumed[s] == pytest.approx(uninterrupted[s], abs=1e-6), (s, resumed[s], uninterrupted[s])

    # the way out the world-size error names: the checkpoint's weights as a model, in one process
    from safetensors.torch import load_file

    from dspref.cli import main as cli_main

    assert cli_main(["export-checkpoint", str(out / f"checkpoint-{STEPS}"), str(tmp_path / "exported")]) == 0
    exported, final = load_file(tmp_path / "exported" / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(exported) == sorted(final)
    assert all(exported[k].equal(final[k]) for k in final)  # the last checkpoint is the exported model
    assert (tmp_path / "exported" / "tokenizer.json").exists()
