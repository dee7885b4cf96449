"""``dspref export-checkpoint CHECKPOINT MODEL_DIR``: a checkpoint's weights as a Hugging Face model."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0].startswith("-"):
        print("usage: dspref export-checkpoint CHECKPOINT MODEL_DIR", file=sys.stderr)
        return 2
    from dspref.checkpoint import CheckpointError, export_checkpoint
    from dspref.config import ConfigError

    try:
        out = export_checkpoint(argv[0], argv[1])
    except (CheckpointError, ConfigError) as e:
        print(f"dspref: error: {e}", file=sys.stderr)
        return 2
    print(f"dspref: wrote {out}")
    return 0
