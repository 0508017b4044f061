#!/usr/bin/env bash
# Fill .whl/ with what tests/gpu/device_check.sh needs on a GPU machine that cannot reach a
# package registry: megatron-core for that machine's Python (3.12 by default; PY_VERSION=3.11
# for another). torch, triton and transformers are expected to be there already.
set -euo pipefail
cd "$(dirname "$0")/.."
PY_VERSION=${PY_VERSION:-3.12}
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PY_VERSION" \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 -d .whl "megatron-core==0.19.2"
du -sh .whl
