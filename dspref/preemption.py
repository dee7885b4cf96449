"""Preemption: SIGTERM (or SIGUSR1) ends the run after the current optimizer step, with a checkpoint.

Schedulers signal before they take the nodes back (SLURM: ``scancel --signal=TERM``,
``#SBATCH --signal=TERM@<seconds>``, ``scontrol requeue``). The handler only sets a flag. The loop
asks :meth:`Preemption.requested` once per optimizer step, which takes the max of the flag over all
ranks, so every rank stops after the same step even when the signal reached them at different
steps (under ZeRO-3 a rank that stopped alone would leave the others hanging in a collective).

After the checkpoint is complete, rank 0 writes ``output_dir/preempted.json``; a batch script
requeues the job when that file exists (launchers swallow or re-raise the ranks' exit status,
so it cannot be read from there). A run that starts removes the marker, and a requeued SLURM job
(``SLURM_RESTART_COUNT`` > 0) resumes from ``latest`` by itself.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time

import torch

from dspref import engine as eng

log = logging.getLogger("dspref")

MARKER = "preempted.json"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
EXIT_PREEMPTED = 3  # the process exit status of a run that stopped for a signal after saving


class Preemption:
    """Catches the stop signals for the duration of a ``with`` block. The old handlers come back on
    exit unless a signal arrived: then the process is on its way out (checkpoint written, exit
    status 3 to report), and a second SIGTERM must not kill it first."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "Preemption":
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self.signal:  # stopping: a further signal must not kill the process before it exits with its status
            return
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.signal is None:
            log.warning("got %s: finishing this step, then saving a checkpoint", signal.Signals(signum).name)
        self.signal = signum  # a second signal changes nothing: the save in progress is atomic

    def requested(self) -> bool:
        """True on every rank when any rank has been signalled (a collective: all ranks call it).

        The signal's number is what is reduced, so every rank can name it afterwards."""
        seen = int(eng.all_reduce_max(torch.tensor([float(self.signal or 0)])).item())
        if seen and self.signal is None:
            self.signal = seen
        return bool(seen)

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""


def write_marker(output_dir: str, *, step: int, checkpoint: str, reason: str) -> None:
    """Rank 0, after the checkpoint is complete: tells the batch script to requeue."""
    from dspref.checkpoint import write_json

    write_json(os.path.join(output_dir, MARKER), {"step": step, "checkpoint": checkpoint, "reason": reason,
                                                  "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


def clear_marker(output_dir: str) -> None:
    path = os.path.join(output_dir, MARKER)
    if os.path.exists(path):
        os.remove(path)


def read_marker(output_dir: str) -> dict | None:
    path = os.path.join(output_dir, MARKER)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def requeued() -> bool:
    """A SLURM job that was requeued (its batch script runs again): resume instead of starting over."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0) > 0
