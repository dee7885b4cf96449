#!/usr/bin/env bash
# Set up, then run the whole test suite on CPU (no GPU needed; GPU tests skip without one).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. "${DSPREF_VENV:-.venv}/bin/activate"
# An accidental hub download fails loudly instead of hanging or passing by luck.
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=offline OMP_NUM_THREADS=1
python -m pytest -q -p no:cacheprovider tests "$@"
