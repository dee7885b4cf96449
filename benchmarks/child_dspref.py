"""dspref side of ``benchmarks/run.py``: ``launch/train.py`` in-process, with per-step records.

    python benchmarks/child_dspref.py RECORDS.jsonl -- DSPREF_ARGS...

Wraps, without changing what runs: the objective's training ``compute`` (to count the micro-batch's
trained and no-grad tokens, see :func:`batch_lengths`) and ``Engine.step`` (the step end). The final
model export is skipped: the benchmark saves nothing.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from step_records import StepRecorder, engine_facts, row_lengths, write_facts  # noqa: E402


def batch_lengths(batch: dict) -> tuple[list[int], list[int]]:
    """(trained row lengths, no-grad row lengths) of one dspref micro-batch.

    Paired and reward batches: every row is trained ([chosen; rejected]). Unpaired batches: the first
    ``trained_rows`` (one per ``label``) are trained, the rows after them are KTO's KL rows. With
    padding_free the collated batch is still padded (the scorer packs it), so the mask counts.
    """
    lengths = row_lengths(batch["attention_mask"])
    trained = batch.get("trained_rows", len(batch["label"]) if "label" in batch else len(lengths))
    return lengths[:trained], lengths[trained:]


def main() -> int:
    records, sep, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
    assert sep == "--", "usage: child_dspref.py RECORDS.jsonl -- DSPREF_ARGS..."
    recorder = StepRecorder(records)

    import dspref.checkpoint as ckpt
    import dspref.engine as eng
    import dspref.objectives as objectives
    from dspref.run import exit_process, main as dspref_main

    build = objectives.build_objective

    def build_recorded(cfg):
        objective = build(cfg)
        compute = objective.compute

        def recorded(engine, batch, train):
            if train:
                recorder.batch(*batch_lengths(batch))
            return compute(engine, batch, train=train)

        objective.compute = recorded
        return objective

    step = eng.Engine.step

    def step_recorded(self):
        step(self)
        if recorder.steps == 0:
            write_facts(records, engine_facts(self.ds))
        recorder.step_end()  # one call per micro-batch: an optimizer step, as run.py keeps accumulation at 1

    objectives.build_objective = build_recorded
    eng.Engine.step = step_recorded
    ckpt.export_model = lambda *args, **kwargs: None
    exit_process(dspref_main(argv))


if __name__ == "__main__":
    main()
