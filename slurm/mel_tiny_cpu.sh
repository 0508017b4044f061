#!/usr/bin/env bash
#SBATCH --job-name=mel-tiny-cpu
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=2
#SBATCH --time=01:00:00
#SBATCH --output=slurm-%x-%j.out
# The CPU demo on a CPU partition: one process, gloo, embedded engine (examples/tiny_cpu.yaml).
set -euo pipefail
cd "${SLURM_SUBMIT_DIR:-$(dirname "$0")/..}"
if [[ -n "${MEL_VENV:-}" ]]; then source "$MEL_VENV/bin/activate"; fi
exec python -m megatron_mel.cli train examples/tiny_cpu.yaml \
  --set "launch.run_dir=runs/tiny_cpu-${SLURM_JOB_ID:-local}" "$@"
