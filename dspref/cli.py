"""``dspref`` console script: ``dspref train [--config recipe.yaml] [--key value ...]``."""

from __future__ import annotations

import sys

USAGE = """usage: dspref <command> [options]

commands:
  train    train a model (BCO, CPO, KTO, reward) with DeepSpeed; `dspref train --help` lists every option
  score    score every row of a paired dataset with a reward model: dspref score --model DIR --data FILE
  plan     will it fit? per-GPU/host memory of ZeRO stage x offload x reference setups, from the model config
           only: dspref plan --model llama-2-7b --method kto --gpus-per-node 8 [--write-ds-config ds.json]

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
    if command == "plan":
        from dspref.plan import main as plan_main

        return plan_main(rest)
    print(f"dspref: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
