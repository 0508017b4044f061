#!/usr/bin/env bash
#SBATCH --job-name=mel-70b
#SBATCH --nodes=8
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --output=slurm-%x-%j.out
# MEL on Llama-3.x-70B: 8 nodes x 8 GPUs, TP=8 x PP=4 x DP=2 for Megatron, SGLang engines
# colocated on the same GPUs (examples/llama3_70b_h100.yaml). Requeue-safe: a rerun resumes
# from the newest checkpoint, and the trainer saves before the walltime runs out.
#SBATCH --requeue
set -euo pipefail
exec "$(dirname "$0")/launch.sh" examples/llama3_70b_h100.yaml "$@"
