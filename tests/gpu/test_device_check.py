"""The GPU acceptance script runs its four checks on CPU/gloo with tiny shapes, so the script a
GPU machine runs is exercised on every CI run (the GPU run itself needs a device)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.conftest import REPO


def test_device_check_runs_on_cpu_with_small_shapes():
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-m", "tests.gpu.device_check", "--device", "cpu", "--small"],
                          capture_output=True, text=True, timeout=600, env=env, cwd=REPO)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("CHECK ")]
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    names = [line.split(":")[0].removeprefix("CHECK ") for line in lines]
    assert names == ["nccl-train-step", "triton-fused-loss", "gpu-parity", "weight-sync"]
    assert all(": PASS " in line for line in lines), lines
    assert "gloo float32" in lines[0] and "4/4 passed" in proc.stdout
