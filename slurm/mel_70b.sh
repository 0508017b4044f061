#!/usr/bin/env bash
#SBATCH --job-name=mel-70b
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@1800
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
# MEL on Llama-3.x-70B (examples/llama3_70b_h100.yaml): 8 nodes x 8 H100, Megatron TP=8 x
# PP=4 x DP=2, one SGLang engine of TP=8 per node colocated on the training GPUs (weights over
# CUDA IPC, memory released during training). Requeue-safe: 30 minutes before the limit (a
# step plus a save) the trainer checkpoints and the job requeues itself; it resumes under the
# same MLflow run. The disaggregated variant is mel_70b_disagg.sh. Submit from the repo root.
set -euo pipefail
exec "${MEL_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh" examples/llama3_70b_h100.yaml "$@"
