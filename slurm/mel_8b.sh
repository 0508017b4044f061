#!/usr/bin/env bash
#SBATCH --job-name=mel-8b
#SBATCH --nodes=1
#SBATCH --gpus-per-node=8
#SBATCH --ntasks-per-node=1
#SBATCH --cpus-per-task=96
#SBATCH --exclusive
#SBATCH --time=24:00:00
#SBATCH --output=slurm-%x-%j.out
#SBATCH --requeue
# MEL on Qwen3-8B-Base in the paper's setting (examples/qwen3_8b_h100.yaml), one node.
set -euo pipefail
exec "$(dirname "$0")/launch.sh" examples/qwen3_8b_h100.yaml "$@"
