#!/usr/bin/env bash
# Set up, then train the demo: CPO on a tiny random-init Llama over the shipped sorting
# preferences, under the DeepSpeed launcher with ZeRO-3. Writes runs/demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup.sh
. "${DSPREF_VENV:-.venv}/bin/activate"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
# 2 ranks: 2 CPU processes here, or 2 GPUs when there are (1 on a single-GPU box).
NPROC=$(python -c "import torch; n = torch.cuda.device_count(); print(min(n, 2) if n else 2)")
deepspeed --num_gpus "$NPROC" launch/train.py \
  --ds_config ds_configs/zero3.json \
  --config launch/configs/demo_cpo.yaml \
  --overwrite_output_dir true "$@"
