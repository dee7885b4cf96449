# Sourced by launch/slurm/deepspeed.sbatch and torchrun.sbatch (not a job script itself).
#
# In:  RECIPE, DS_CONFIG, OUTPUT_DIR (may be empty: then the recipe's output_dir), PYTHON,
#      DSPREF_DIR, and the batch script's own arguments (extra training options).
# Out: TRAIN_ARGS (launch/train.py and its options), MASTER_ADDR, MASTER_PORT, NNODES, and
#      run_and_requeue, which runs one job step and requeues the job when the run was preempted.

dspref_fail() { echo "dspref slurm: error: $*" >&2; exit 2; }

[ -n "${SLURM_JOB_ID:-}" ] || dspref_fail "submit this script with sbatch (SLURM_JOB_ID is not set)"
[ -f "$DSPREF_DIR/launch/train.py" ] || dspref_fail "no launch/train.py in DSPREF_DIR=$DSPREF_DIR: set DSPREF_DIR to the dspref checkout"
[ -f "$RECIPE" ] || dspref_fail "RECIPE=$RECIPE: no such file (relative paths start at $PWD)"
[ -f "$DS_CONFIG" ] || dspref_fail "DS_CONFIG=$DS_CONFIG: no such file (relative paths start at $PWD)"
for arg in "$@"; do
  case $arg in --output_dir|--output_dir=*|--output-dir|--output-dir=*)
    dspref_fail "set OUTPUT_DIR at the top of the batch script instead of passing $arg: the script must know where to look for preempted.json";;
  esac
done
if [ -z "${OUTPUT_DIR:-}" ]; then
  OUTPUT_DIR=$("$PYTHON" -c 'import sys, yaml; print((yaml.safe_load(open(sys.argv[1])) or {}).get("output_dir") or "")' "$RECIPE") \
    || dspref_fail "cannot read output_dir from RECIPE=$RECIPE"
  [ -n "$OUTPUT_DIR" ] || dspref_fail "the recipe $RECIPE sets no output_dir: set OUTPUT_DIR at the top of the batch script"
fi
TRAIN_ARGS=("$DSPREF_DIR/launch/train.py" --ds_config "$DS_CONFIG" --config "$RECIPE" --output_dir "$OUTPUT_DIR" "$@")

NNODES=${SLURM_JOB_NUM_NODES:-1}
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
# From the job id, so every node computes the same port; a requeued run (same job id) takes the
# next one, as the old run's port may still be held.
MASTER_PORT=$((20000 + (SLURM_JOB_ID * 10 + ${SLURM_RESTART_COUNT:-0}) % 40000))
export MASTER_ADDR MASTER_PORT PYTHON

# run_and_requeue CMD...: run the job step; if the run was preempted (it wrote
# OUTPUT_DIR/preempted.json after its checkpoint), requeue this job and exit 0, else exit with
# the step's status. A requeued job runs this script again with SLURM_RESTART_COUNT > 0, and the
# run resumes from OUTPUT_DIR/latest by itself.
run_and_requeue() {
  local marker=$OUTPUT_DIR/preempted.json status
  rm -f "$marker"  # only a marker written by this step may requeue the job
  echo "dspref slurm: job $SLURM_JOB_ID (restart ${SLURM_RESTART_COUNT:-0}) on $SLURM_JOB_NODELIST, master $MASTER_ADDR:$MASTER_PORT, output_dir $OUTPUT_DIR"
  "$@"
  status=$?
  if [ -f "$marker" ]; then
    echo "dspref slurm: preempted: $(tr -d '\n' <"$marker"); requeueing job $SLURM_JOB_ID"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    echo "dspref slurm: scontrol requeue failed; submit the job again with --resume_from_checkpoint latest" >&2
    exit 3
  fi
  echo "dspref slurm: job step ended with status $status"
  exit "$status"
}
