#!/usr/bin/env bash
#SBATCH --job-name=mel-70b-disagg
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@1800
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
# MEL on Llama-3.x-70B, disaggregated (examples/llama3_70b_h100_disagg.yaml): nodes 0-3 train
# (Megatron TP=8 x PP=4), nodes 4-7 only generate (8 SGLang engines of TP=4, started there by
# `megatron-mel serve`), weights over NCCL after every step. Submit from the repo root.
set -euo pipefail
exec "${MEL_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh" examples/llama3_70b_h100_disagg.yaml "$@"
