"""``run_many.py`` that also records every rank's view of each generate-during-eval table.

Usage: deepspeed --num_gpus N tests/dist/run_views.py RESULT_JSON SPECS_JSON VIEWS_DIR
Each rank appends the table it holds after the all-gather, one JSON line per eval, to
VIEWS_DIR/rank<R>.jsonl, so a test can check that all ranks see the same table.
"""

import json
import os
import sys

import run_many
import torch

import dspref.generate as generate

views_dir = sys.argv.pop()  # the last argument (the launcher puts --local_rank first)
_gather = generate.gather_rows


def recording_gather(rows):
    table = _gather(rows)
    with open(os.path.join(views_dir, f"rank{torch.distributed.get_rank()}.jsonl"), "a") as f:
        f.write(json.dumps(table) + "\n")
    return table


generate.gather_rows = recording_gather

if __name__ == "__main__":
    run_many.main()
