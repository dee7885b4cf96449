#!/usr/bin/env bash
# Here, on the CPU machine, from the project root: fill .whl/ with what the lent GPU machine lacks for
# benchmarks/device/run.sh (see ../shared/device.md): deepspeed, datasets and their needs, TRL 1.16.0
# (.whl/), and TRL 1.13.0 for BCO (.whl/trl113/, installed apart: BCO left TRL after 1.13.0).
# Then: run(command="bash benchmarks/device/run.sh <stage>", carry=[".whl"]).
set -euo pipefail
cd "$(dirname "$0")/../.."
SHARED=../shared/device/make-wheels.sh
if [ ! -f "$SHARED" ]; then
  echo "wheels.sh: $SHARED not found (the team's wheel script for the GPU machine)" >&2
  exit 1
fi
bash "$SHARED" base
dl() { python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d "$@"; }
dl .whl trl==1.16.0
mkdir -p .whl/trl113 && rm -f .whl/trl113/*.whl && dl .whl/trl113 trl==1.13.0
du -sh .whl  # .whl/ is in .gitignore
