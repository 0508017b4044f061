#!/usr/bin/env bash
# Shared Slurm launcher: one torchrun per node, rendezvous on the first node of the allocation.
#
#   srun-side usage (from an sbatch script):  slurm/launch.sh RECIPE.yaml [--set key=value ...]
#
# Environment it honours: MEL_VENV (a virtualenv to activate), MEL_RUN_DIR (run directory;
# default runs/<recipe>-<job id>), MLFLOW_TRACKING_URI / MLFLOW_EXPERIMENT_NAME (the lab's
# MLflow server), MEL_EXTRA_ARGS (more --set overrides).
set -euo pipefail

RECIPE=${1:?usage: slurm/launch.sh RECIPE.yaml [--set key=value ...]}
shift
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [[ -n "${MEL_VENV:-}" ]]; then source "$MEL_VENV/bin/activate"; fi

NODES=${SLURM_JOB_NUM_NODES:-1}
GPUS_PER_NODE=${SLURM_GPUS_ON_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" | head -n 1)
# Every node's address in node order: the placement binds each node's engine servers there and
# the driver reaches them there (megatron_mel/rollout/placement.py).
MEL_NODE_HOSTS=$(scontrol show hostnames "${SLURM_JOB_NODELIST:-$(hostname)}" | paste -sd, -)
export MEL_NODE_HOSTS
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-0} % 20000))}
RUN_DIR=${MEL_RUN_DIR:-runs/$(basename "$RECIPE" .yaml)-${SLURM_JOB_ID:-local}}
# Minutes left in the allocation: the trainer checkpoints before the walltime runs out.
WALLTIME_MIN=$(squeue -h -j "${SLURM_JOB_ID:-0}" -o %L 2>/dev/null | awk -F'[-:]' '
  NF==4 {print $1*1440+$2*60+$3} NF==3 {print $1*60+$2} NF==2 {print $1} NF<2 {print ""}')

export NCCL_DEBUG=${NCCL_DEBUG:-WARN} TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# CUDA IPC weight sync into colocated SGLang needs plain (non-expandable) allocations.
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:False}

ARGS=(--set "launch.run_dir=$RUN_DIR" --set "launch.nodes=$NODES" --set "launch.gpus_per_node=$GPUS_PER_NODE")
if [[ -n "$WALLTIME_MIN" ]]; then ARGS+=(--set "checkpoint.walltime_minutes=$WALLTIME_MIN"); fi

# One task per node; torchrun starts the ranks of that node.
srun --ntasks-per-node=1 --kill-on-bad-exit=1 \
  torchrun --nnodes="$NODES" --nproc-per-node="$GPUS_PER_NODE" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="${SLURM_JOB_ID:-mel}" \
  -m megatron_mel.cli train "$RECIPE" "${ARGS[@]}" "$@" ${MEL_EXTRA_ARGS:-}
