#!/usr/bin/env bash
# The one Slurm launcher of megatron-mel: every slurm/mel_*.sh execs it from its batch script.
#
#   slurm/launch.sh RECIPE.yaml [--set key=value ...]
#
# In the batch shell, once per job (and again after each requeue):
#   1. `megatron-mel plan` for this allocation (nodes, GPUs per node and their memory); a
#      refusal stops the job here, with its reason in the job log, before anything waits.
#   2. Every node's address (MEL_NODE_HOSTS, the placement binds engine servers there), the
#      rendezvous of node 0, the job's end time, NCCL and MLflow environment.
#   3. srun: one task per node, re-entering this script (MEL_NODE_TASK=1). A training node runs
#      one torchrun with a static rendezvous (node rank = SLURM_NODEID, so node i of the
#      placement is node i of the allocation); a rollout-only node of a disaggregated recipe
#      runs `megatron-mel serve`. When the training nodes finish, srun --wait ends the servers.
#   4. SIGUSR1 (sent ahead of the time limit by `#SBATCH --signal=B:USR1@SECONDS`) is passed on
#      to the tasks: the trainer stops after the current step with a checkpoint, and the job is
#      requeued (`#SBATCH --requeue`) to resume from it under the same job id, run directory and
#      MLflow run. A trainer that stops itself before the end time does the same.
#
# Environment it honours: MEL_VENV (a virtualenv to activate), MEL_RUN_DIR (run directory;
# default runs/<recipe>-<job id>, which a requeued job keeps; a new submission that should
# resume must name it), MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME (the lab's MLflow server),
# MEL_EXTRA_ARGS (more --set overrides), MEL_RANKS_PER_NODE (training processes per node;
# default one per GPU, on CPU the job's tasks per node), MEL_SHUTDOWN_TIMEOUT_S (how long
# torchrun lets its ranks finish a step after a signal; default 900), MEL_PYTHON (default python).
set -euo pipefail

RECIPE=${1:?usage: slurm/launch.sh RECIPE.yaml [--set key=value ...]}
shift
SELF=$(realpath "$0")
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [[ -n ${MEL_VENV:-} ]]; then
  # shellcheck disable=SC1091  # the user's virtualenv, not part of this repository
  source "$MEL_VENV/bin/activate"
fi
PY=${MEL_PYTHON:-python}
ARGS=("$@")

# -- on every node: the task srun started (its arguments are the batch shell's, completed) -------
if [[ ${MEL_NODE_TASK:-} == 1 ]]; then
  NODE=${SLURM_NODEID:?SLURM_NODEID is not set: run this under srun}
  if ((NODE >= MEL_TRAIN_NODES)); then
    exec "$PY" -m megatron_mel.cli serve "$RECIPE" --node "$NODE" "${ARGS[@]}"
  fi
  exec "$PY" -m torch.distributed.run --nnodes="$MEL_TRAIN_NODES" --node-rank="$NODE" \
    --nproc-per-node="$MEL_RANKS_PER_NODE" --master-addr="$MASTER_ADDR" --master-port="$MASTER_PORT" \
    --signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1 \
    --shutdown-timeout="${MEL_SHUTDOWN_TIMEOUT_S:-900}" \
    -m megatron_mel.cli train "$RECIPE" "${ARGS[@]}"
fi

# -- in the batch shell ---------------------------------------------------------------------------
if [[ -n ${MEL_EXTRA_ARGS:-} ]]; then
  read -r -a extra <<<"$MEL_EXTRA_ARGS"
  ARGS+=("${extra[@]}")
fi
JOB=${SLURM_JOB_ID:?not in a Slurm job: submit with sbatch slurm/mel_*.sh}
NODES=${SLURM_JOB_NUM_NODES:-1}
GPUS=${SLURM_GPUS_ON_NODE:-$( (nvidia-smi -L 2>/dev/null || true) | grep -c '^GPU' || true)}
PLAN_ARGS=(--nodes "$NODES")
if ((GPUS > 0)); then
  RANKS=${MEL_RANKS_PER_NODE:-$GPUS}
  GPU_MIB=$(nvidia-smi --query-gpu=memory.total --format=csv,noheader,nounits | sort -n | head -n 1)
  PLAN_ARGS+=(--gpus-per-node "$GPUS" --ranks-per-node "$RANKS" --gpu-mem-gib "$((GPU_MIB / 1024))")
else
  # CPU: every training process is a slot of its own ("GPU" for the placement), on gloo.
  RANKS=${MEL_RANKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-$((${SLURM_NTASKS:-1} / NODES))}}
  PLAN_ARGS+=(--gpus-per-node "$RANKS")
fi
RUN_DIR=${MEL_RUN_DIR:-runs/$(basename "$RECIPE" .yaml)-$JOB}
mkdir -p "$RUN_DIR"
echo "launch: job $JOB (restart ${SLURM_RESTART_COUNT:-0}) on $NODES node(s), run directory $RUN_DIR"

"$PY" -m megatron_mel.cli plan "$RECIPE" "${PLAN_ARGS[@]}" "${ARGS[@]}" ||
  { echo "launch: megatron-mel plan refused this allocation (reason above)" >&2; exit 2; }
"$PY" -m megatron_mel.cli plan "$RECIPE" "${PLAN_ARGS[@]}" "${ARGS[@]}" --json >"$RUN_DIR/plan.json"
TRAIN_NODES=$("$PY" -c 'import json, sys; print(json.load(open(sys.argv[1]))["topology"]["train_nodes"])' "$RUN_DIR/plan.json")

# Node addresses in node order (NodeAddr: what the nodes answer on, which may differ from their
# names); node 0 hosts the rendezvous.
HOSTS=()
while read -r name; do
  addr=$(scontrol show node -o "$name" | grep -o 'NodeAddr=[^ ]*' | cut -d= -f2 || true)
  HOSTS+=("${addr:-$name}")
done < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MEL_NODE_HOSTS=$(IFS=,; echo "${HOSTS[*]}")
MASTER_ADDR=${HOSTS[0]}
MASTER_PORT=${MASTER_PORT:-$((20000 + JOB % 20000))}
export MEL_NODE_HOSTS MASTER_ADDR MASTER_PORT MEL_RANKS_PER_NODE=$RANKS MEL_TRAIN_NODES=$TRAIN_NODES
# Rank 0's exit status (torchrun turns every worker failure into 1): 75 = stopped at a
# checkpoint before the end, to be continued.
export MEL_EXIT_STATUS_FILE=$RUN_DIR/.exit_status
rm -f "$MEL_EXIT_STATUS_FILE"

# When Slurm ends the job (Unix time; 22.05 has no SLURM_JOB_END_TIME): the trainer saves a
# final checkpoint before then.
END=$(SLURM_TIME_FORMAT=%s squeue -h -j "$JOB" -o %e 2>/dev/null || true)
TRAIN_ARGS=(--set "launch.run_dir=$RUN_DIR" --set "launch.nodes=$TRAIN_NODES")
if [[ $END =~ ^[0-9]+$ ]]; then
  echo "launch: the job ends at $(date -d "@$END" '+%F %T') ($(((END - $(date +%s)) / 60)) min left)"
  TRAIN_ARGS+=(--set "checkpoint.job_end_time=$END")
fi
if ((GPUS > 0)); then TRAIN_ARGS+=(--set "launch.gpus_per_node=$GPUS"); fi

export NCCL_DEBUG=${NCCL_DEBUG:-WARN} TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}
# CUDA IPC weight sync into colocated SGLang needs plain (non-expandable) allocations.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:False}
if [[ -n ${MLFLOW_TRACKING_URI:-} ]]; then echo "launch: MLflow at $MLFLOW_TRACKING_URI"; fi

# The fewest CPUs any node got: the one task per node may use all of them.
CPUS=$(echo "${SLURM_JOB_CPUS_PER_NODE:-1}" | tr ',' '\n' | sed 's/(x[0-9]*)//' | sort -n | head -n 1)

STOP_SIGNAL=""
# shellcheck disable=SC2329  # invoked by the trap below
forward_usr1() {
  STOP_SIGNAL=USR1
  echo "launch: SIGUSR1: the trainer stops after this step with a checkpoint; then requeue"
  kill -USR1 "$SRUN_PID" 2>/dev/null || true
}
trap forward_usr1 USR1
# scancel and the time limit signal every task themselves; passing SIGTERM on again later
# than the trainer's duplicate window would make it exit without its final checkpoint.
trap 'STOP_SIGNAL=${STOP_SIGNAL:-TERM}' TERM

srun --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 --cpus-per-task="$CPUS" \
  --kill-on-bad-exit=1 --wait=120 --export=ALL,MEL_NODE_TASK=1 \
  bash "$SELF" "$RECIPE" "${TRAIN_ARGS[@]}" "${ARGS[@]}" &
SRUN_PID=$!
status=0
while true; do
  # A trapped signal interrupts `wait`; keep waiting until srun itself is gone.
  if wait "$SRUN_PID"; then status=0; else status=$?; fi
  kill -0 "$SRUN_PID" 2>/dev/null || break
done

TRAINER_STATUS=$(cat "$MEL_EXIT_STATUS_FILE" 2>/dev/null || true)
# Requeue after the time-limit warning, or when the trainer stopped itself at a checkpoint ahead
# of the end time; never after scancel (SIGTERM), which means stop.
if [[ $STOP_SIGNAL == USR1 || ($TRAINER_STATUS == 75 && $STOP_SIGNAL != TERM) ]]; then
  echo "launch: requeueing job $JOB; it resumes from the newest checkpoint in $RUN_DIR"
  if scontrol requeue "$JOB"; then exit 0; fi
  echo "launch: job $JOB cannot be requeued (--no-requeue?); resubmit with MEL_RUN_DIR=$RUN_DIR" >&2
  exit 75
fi
exit "${TRAINER_STATUS:-$status}"
