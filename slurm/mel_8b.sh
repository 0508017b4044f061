#!/usr/bin/env bash
#SBATCH --job-name=mel-8b
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --signal=B:USR1@900
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
# MEL on Qwen3-8B-Base in the paper's setting (examples/qwen3_8b_h100.yaml): 128 prompts x
# G=8, lr 1e-6, one node of 8 x H100, Megatron TP=2 x DP=4, four colocated SGLang engines of
# TP=2. Requeue-safe: 15 minutes before the limit the trainer finishes its step, checkpoints
# and the job requeues itself; it resumes under the same MLflow run. Submit from the repo root.
set -euo pipefail
exec "${MEL_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh" examples/qwen3_8b_h100.yaml "$@"
