"""``dspref`` console script: ``dspref <train | score | eval | plot | compare | export-checkpoint | plan> [options]``."""

from __future__ import annotations

import sys

USAGE = """usage: dspref <command> [options]

commands:
  train    train a model (BCO, CPO, KTO, reward) with DeepSpeed; `dspref train --help` lists every option
  score    score every row of a paired dataset with a reward model: dspref score --model DIR --data FILE
  eval     the eval pass alone on a checkpoint or an exported model, as a table and JSON:
             dspref eval --model OUTPUT_DIR/checkpoint-N --data FILE
             dspref eval --model DIR --method M --data FILE [--ref DIR] [--key value ...]
  plot     PNG figures (loss, rewards, margins, accuracy, learning rate, tokens/s, memory) of one or
           more runs overlaid: dspref plot OUTPUT_DIR [OUTPUT_DIR ...] [--out DIR]
  compare  final and best eval metrics, tokens/s and peak memory of runs side by side:
           dspref compare RUN_A RUN_B [...]
  export-checkpoint
           a checkpoint's weights as a Hugging Face model (or LoRA adapter), whatever the rank count
           wrote it: dspref export-checkpoint OUTPUT_DIR/checkpoint-N MODEL_DIR
  plan     will it fit? per-GPU/host memory of ZeRO stage x offload x reference setups, from the model config
           only: dspref plan --model llama-2-7b --method kto --gpus-per-node 8 [--write-ds-config ds.json]

Multi-process runs go through a launcher, e.g.
  deepspeed launch/train.py --ds_config ds_configs/zero3.json --config launch/configs/cpo.yaml
"""

# command -> module whose main(argv) runs it
COMMANDS = {"train": "dspref.run", "score": "dspref.score", "eval": "dspref.eval_model", "plot": "dspref.plots",
            "compare": "dspref.compare", "export-checkpoint": "dspref.export",
            "plan": "dspref.plan"}


def main(argv: list[str] | None = None) -> int:
    as_process = argv is None  # the console script / ``python -m dspref.cli``, not a caller in-process
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command in COMMANDS:
        import importlib

        # Imported only when run: plot and compare never load torch.
        status = importlib.import_module(COMMANDS[command]).main(rest)
        if as_process and command == "train":
            from dspref.run import exit_process

            exit_process(status)  # a training process ends without interpreter teardown (see exit_process)
        return status
    print(f"dspref: error: unknown command {command!r}\n\n{USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
