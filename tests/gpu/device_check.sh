#!/usr/bin/env bash
# GPU acceptance for the cluster path, one summary line per check (tests/gpu/device_check.py).
#
# Runs from the repository root on a CUDA machine whose Python has torch, triton and
# transformers. Everything else it needs travels as wheels in .whl/ (tools/device_wheels.sh
# fills it on a machine with the package registry: megatron-core; the project itself is
# imported from the working tree). Sized for well under 8 minutes on one H200.
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONUNBUFFERED=1
if [[ -d .whl ]] && compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/mel-site .whl/*.whl
  export PYTHONPATH="/tmp/mel-site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || true
exec python3 -m tests.gpu.device_check "$@"
