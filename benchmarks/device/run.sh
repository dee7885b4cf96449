#!/usr/bin/env bash
# On the lent GPU machine (see ../shared/device.md), from the project root, after wheels.sh here:
#
#   run(command="bash benchmarks/device/run.sh STAGE", carry=[".whl"], timeout_s=570)
#
# One stage per call fits one command's 10 minutes; run them in this order (issue #10) and stop when
# device time runs short. Every stage runs dspref and TRL side by side in one call (machines differ
# by up to 50%, so only same-call ratios count) and writes the tables and logs under $OUT.
#
#   tests   tests/test_gpu.py (ZeRO-3 + CPU offload, bf16, one GPU)
#   small   CPO and KTO, Qwen2-0.5B shape            (bf16, ZeRO-3, micro-batch 8, max_length 512, GC)
#   large   CPO and KTO, Qwen2.5-3B shape
#   rest    BCO and reward, Qwen2-0.5B shape
#   scale   KTO, Qwen2-0.5B shape, max_length 256, 1024, 4096
#   smoke   CPO and BCO on the tiny shape, fp32, one measured step: checks this script on any machine
#
# Arguments after the stage go to benchmarks/run.py and win over the stage's own, e.g. split a stage
# that would not fit one call: `run.sh large --method cpo`, then `run.sh large --method kto`.
#
# DSPREF_DEVICE_NO_INSTALL=1 skips the wheel install (a machine where everything is importable).
set -euo pipefail
cd "$(dirname "$0")/../.."
STAGE=${1:?usage: run.sh tests|small|large|rest|scale|smoke [run.py args]}
shift
EXTRA=("$@")
case "$STAGE" in tests|small|large|rest|scale|smoke) ;; *) echo "run.sh: unknown stage $STAGE (tests|small|large|rest|scale|smoke)" >&2; exit 2 ;; esac
OUT=${OUT:-/tmp/dspref-device-out}
LOGS=/tmp/dspref-device-logs
mkdir -p "$OUT" "$LOGS"
START=$LOGS/.start; touch "$START"
# $OUT brings back at most 8 files: the result tables of this call, and one archive of the logs.
trap 'tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . 2>/dev/null || true' EXIT
PY=${PYTHON:-python3}
SITE=/tmp/dspref-site
if [ "${DSPREF_DEVICE_NO_INSTALL:-0}" != 1 ]; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE-trl113" .whl/trl113/*.whl
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}" PATH="$SITE/bin:$PATH" TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 WANDB_MODE=disabled

# run.py starts TRL with <venv>/bin/python: two stand-in "venvs" whose python is this interpreter with
# TRL 1.16 (on PYTHONPATH already) or TRL 1.13 put first.
TRL=/tmp/dspref-trl; TRL113=/tmp/dspref-trl113
mkdir -p "$TRL/bin" "$TRL113/bin"
printf '#!/bin/sh\nexec %s "$@"\n' "$(command -v "$PY")" > "$TRL/bin/python"
printf '#!/bin/sh\nPYTHONPATH=%s:$PYTHONPATH exec %s "$@"\n' "$SITE-trl113" "$(command -v "$PY")" > "$TRL113/bin/python"
chmod +x "$TRL/bin/python" "$TRL113/bin/python"

# DeepSpeed compiles FusedAdam on first use (40-55 s); run.py gives each TRL "venv" its own extensions
# folder, so build it once and let the others point at it.
EXT=${TORCH_EXTENSIONS_DIR:-$HOME/.cache/torch_extensions}
GPU_ARGS=(--model-shape qwen2-0.5b --bf16 --micro-batch 8)
if [ "$STAGE" = smoke ]; then
  GPU_ARGS=()
elif [ "$STAGE" != tests ]; then
  "$PY" -c "import torch; from deepspeed.ops.adam import FusedAdam; FusedAdam([torch.zeros(1, device='cuda', requires_grad=True)])" \
    > "$LOGS/fused_adam_build.log" 2>&1 || { tail -20 "$LOGS/fused_adam_build.log"; exit 1; }
  for v in "$TRL" "$TRL113"; do ln -sfn "$EXT" "$EXT-$(basename "$v")"; done
fi

bench() {  # bench NAME run.py-args...
  local name=$1; shift
  set +e
  "$PY" benchmarks/run.py "${GPU_ARGS[@]}" --ds_config ds_configs/zero3.json \
    --max-length 512 --data-shape fixed --steps 6 --warmup 2 --compare trl --bench-venv "$TRL" --bco-venv "$TRL113" \
    --work-dir /tmp/dspref-bench --results-dir "$LOGS/results" --timeout 400 "$@" "${EXTRA[@]}" 2>&1 | tee "$LOGS/$name.log" \
    | grep -E '^\{|^\|'
  set -e
  find "$LOGS/results" -name 'run_*' -newer "$START" -exec cp {} "$OUT/" \;
  for f in /tmp/dspref-bench/*/*.log; do  # each side's own log, per (method, data shape)
    [ -e "$f" ] && mkdir -p "$LOGS/$name/$(basename "$(dirname "$f")")" && cp "$f" "$LOGS/$name/$(basename "$(dirname "$f")")/"
  done
}

if command -v nvidia-smi >/dev/null; then nvidia-smi --query-gpu=name,memory.total --format=csv,noheader; fi
case "$STAGE" in
  tests) "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$LOGS/tests.log" | tail -5 ;;
  small) bench small --method cpo,kto ;;
  large) bench large --method cpo,kto --model-shape qwen2.5-3b ;;
  rest)  bench rest --method bco,reward ;;
  scale) for L in 256 1024 4096; do bench "scale$L" --method kto --max-length "$L" --data-shape variable --steps 4; done ;;
  smoke) bench smoke --method cpo,bco --steps 1 --warmup 1 ;;
esac
echo "run.sh $STAGE: done; results in $OUT"
