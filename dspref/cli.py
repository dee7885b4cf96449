"""``dspref`` console script: ``dspref train [--config recipe.yaml] [--key value ...]``."""

from __future__ import annotations

import sys

USAGE = """usage: dspref <command> [options]

commands:
  train    train a model (BCO, CPO, KTO, reward) with DeepSpeed; `dspref train --help` lists every option
  score    score every row of a paired dataset with a reward model: dspref score --model DIR --data FILE
  export-checkpoint CHECKPOINT MODEL_DIR
           a checkpoint's weights as a Hugging Face model (or LoRA adapter), whatever the rank count

Multi-process runs go through a launcher, e.g.
  deepspeed launch/train.py --ds_config ds_configs/zero3.json --config launch/configs/cpo.yaml
"""


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "train":
        from dspref.run import main as train_main

        return train_main(rest)
    if command == "score":
        from dspref.score import main as score_main

        return score_main(rest)
    if command == "export-checkpoint":
        return _export_checkpoint(rest)
    print(f"dspref: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


def _export_checkpoint(argv: list[str]) -> int:
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


if __name__ == "__main__":
    sys.exit(main())
