#!/usr/bin/env bash
# Virtual environments for `python benchmarks/run.py --compare trl`, apart from the dspref/CI venv
# (which never gets TRL); safe to re-run.
#
#   bash benchmarks/setup_bench.sh            .venv-bench  (trl 1.16.0: CPO, KTO, reward)
#                                             .venv-trl113 (trl 1.13.0: BCO, removed from TRL after it)
#   DSPREF_VENV=/path/to/venv bash benchmarks/setup_bench.sh
#       pin torch, transformers, deepspeed, ... to the versions in that dspref venv (default .venv),
#       so both sides of the comparison run on the same stack.
#   DSPREF_USE_SYSTEM_TORCH=1 bash benchmarks/setup_bench.sh
#       GPU machine: the venvs see the system's packages, so your CUDA torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
DSPREF_VENV=${DSPREF_VENV:-.venv}

# The shared stack, pinned to what the dspref venv holds (when there is one).
PINS=$(mktemp)
trap 'rm -f "$PINS"' EXIT
if [ -x "$DSPREF_VENV/bin/python" ]; then
  "$DSPREF_VENV/bin/python" -m pip freeze 2>/dev/null \
    | grep -iE '^(torch|transformers|deepspeed|accelerate|peft|datasets|tokenizers|safetensors|huggingface.hub)==' \
    | sed 's/+cpu$//' > "$PINS" || true
else
  echo "setup_bench: no dspref venv at $DSPREF_VENV; versions are not pinned to it" >&2
fi

make_venv() {  # make_venv DIR PIP_INSTALL_ARGS...
  local venv=$1; shift
  if [ ! -x "$venv/bin/python" ]; then
    if [ "${DSPREF_USE_SYSTEM_TORCH:-0}" = 1 ]; then "$PY" -m venv --system-site-packages "$venv"; else "$PY" -m venv "$venv"; fi
  fi
  "$venv/bin/python" -m pip install -q --upgrade pip
  if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
    # Pinned, as in launch/setup.sh: an unpinned `torch` would pull a CUDA build on a CPU machine.
    "$venv/bin/python" -m pip install -q "$(grep -i '^torch==' "$PINS" || echo torch==2.13.0)"
  fi
  "$venv/bin/python" -m pip install -q -c "$PINS" "$@"
  "$venv/bin/python" -c "import torch, transformers, deepspeed, trl; print(f'setup_bench: $venv: trl {trl.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, deepspeed {deepspeed.__version__}')" 2>&1 | grep '^setup_bench:'
}

make_venv .venv-bench -e ".[bench]"
# BCO left TRL after 1.13.0; if this fails, run.py reports BCO as having no peer.
make_venv .venv-trl113 -e . "trl==1.13.0" || echo "setup_bench: trl 1.13.0 did not install; BCO will have no TRL peer" >&2
