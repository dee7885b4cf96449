#!/usr/bin/env bash
# Set up dspref in a virtual environment (default .venv in the checkout); safe to re-run.
#
#   bash launch/setup.sh                              CPU machine: installs the CPU build torch==2.13.0
#   DSPREF_USE_SYSTEM_TORCH=1 bash launch/setup.sh    GPU machine: the venv sees the system's packages,
#                                                     so your CUDA torch is kept (never reinstalled)
#   DSPREF_VENV=/path/to/venv bash launch/setup.sh    another location
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${DSPREF_VENV:-.venv}
PY=${PYTHON:-python3}

if [ ! -x "$VENV/bin/python" ]; then
  if [ "${DSPREF_USE_SYSTEM_TORCH:-0}" = 1 ]; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
. "$VENV/bin/activate"
python -m pip install -q --upgrade pip

if ! python -c "import torch" 2>/dev/null; then
  if [ "${DSPREF_USE_SYSTEM_TORCH:-0}" = 1 ]; then
    echo "setup: DSPREF_USE_SYSTEM_TORCH=1 but no torch is importable; install your CUDA torch first" >&2
    exit 1
  fi
  # Pinned: an unpinned `torch` would pull a multi-GB CUDA build on a CPU machine.
  python -m pip install -q "torch==2.13.0"
fi
# torch is already satisfied, so this never replaces it.
python -m pip install -q -e ".[dev]"
python -c "import torch, deepspeed, transformers, dspref; print(f'setup: dspref {dspref.__version__}, torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers {transformers.__version__}')" 2>&1 | grep '^setup:'
