"""Per-step records written by the training children of ``benchmarks/run.py`` (dspref's and TRL's).

Both children count and time the same way, so the parent can compute every figure with one
definition: a collator-side hook reports each micro-batch's sequences (``batch``), the training
loop's step-end hook closes the step (``step_end``). One JSON line per optimizer step:

    {"step", "t" (s since the child started), "trained_tokens", "trained_sq",
     "no_grad_tokens", "no_grad_sq", "rss_gib", "gpu_gib"}

``trained_*``: non-padding tokens (prompt + completion) of the rows the policy trains on, and the
sum of their squared lengths (for attention FLOPs). ``no_grad_*``: rows only scored, without grad
(KTO's mismatched KL rows). Standard library only: it runs in the dspref venv and the TRL venvs.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections import deque


class StepRecorder:
    def __init__(self, path: str, *, accumulation: int = 1):
        self.start = time.perf_counter()
        self.file = open(path, "w")
        self.accumulation = accumulation
        self.pending: deque = deque()  # loaders may collate a batch ahead of the step that uses it: FIFO
        self.steps = 0

    def batch(self, trained_lengths, no_grad_lengths=()) -> None:
        """One micro-batch: the lengths (non-padding tokens) of its trained and its no-grad rows."""
        trained, no_grad = [int(n) for n in trained_lengths], [int(n) for n in no_grad_lengths]
        self.pending.append((sum(trained), sum(n * n for n in trained), sum(no_grad), sum(n * n for n in no_grad)))

    def step_end(self) -> None:
        """An optimizer step just ended: its micro-batches are the oldest ``accumulation`` pending ones."""
        torch = sys.modules.get("torch")
        cuda = torch is not None and torch.cuda.is_available()
        if cuda:
            torch.cuda.synchronize()  # time the work, not the launch of the kernels
        now = time.perf_counter() - self.start
        parts = [self.pending.popleft() for _ in range(min(self.accumulation, len(self.pending)))]
        sums = [sum(p[i] for p in parts) for i in range(4)]
        self.steps += 1
        row = {"step": self.steps, "t": now, "trained_tokens": sums[0], "trained_sq": sums[1],
               "no_grad_tokens": sums[2], "no_grad_sq": sums[3],
               "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,  # KiB on Linux
               "gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()


def engine_facts(engine) -> dict:
    """What actually trained: a DeepSpeed engine (its ZeRO stage and base optimizer) or not."""
    if type(engine).__name__ != "DeepSpeedEngine":
        return {"deepspeed": False, "module": type(engine).__name__}
    return {"deepspeed": True, "zero_stage": engine.zero_optimization_stage(),
            "optimizer": type(engine.basic_optimizer).__name__, "zero_optimizer": type(engine.optimizer).__name__}


def write_facts(records_path: str, facts: dict) -> None:
    """``facts`` beside the step records (``<records>.facts.json``)."""
    with open(records_path + ".facts.json", "w") as f:
        json.dump(facts, f)


def row_lengths(mask, rows=None) -> list[int]:
    """Non-padding tokens per row of a (N, T) 0/1 mask (first ``rows`` rows only when given)."""
    lengths = mask.sum(dim=-1).tolist()
    return lengths if rows is None else lengths[:rows]
