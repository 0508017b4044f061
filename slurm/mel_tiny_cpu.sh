#!/usr/bin/env bash
#SBATCH --job-name=mel-tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=2
#SBATCH --cpus-per-task=1
#SBATCH --time=01:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --output=slurm-%x-%j.out
# The CPU recipe on a CPU partition (examples/tiny_cpu.yaml): 2 training processes on gloo,
# embedded engine, through the same launcher as the GPU jobs. Submit from the repository root.
set -euo pipefail
exec "${MEL_HOME:-${SLURM_SUBMIT_DIR:-.}}/slurm/launch.sh" examples/tiny_cpu.yaml "$@"
