"""Entry point for every launcher.

    deepspeed launch/train.py --ds_config ds_configs/zero3.json --config launch/configs/cpo.yaml [--key value ...]
    torchrun --nproc_per_node 2 launch/train.py ...
    python launch/train.py ...            (one process)
"""

import os
import sys

# Run from a checkout without installing: the repository root holds the `dspref` package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from dspref.run import exit_process, main  # noqa: E402

if __name__ == "__main__":
    exit_process(main(sys.argv[1:]))  # flush, leave the process group, skip interpreter teardown
