"""The Triton logit kernels match the torch ones (run on CPU under the Triton interpreter).

TRITON_INTERPRET is read when triton decorates the kernels, so the checks run in subprocesses
(tests/unit/triton_interp_checks.py) with it set, whatever this pytest process imported.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
CHECKS = Path(__file__).with_name("triton_interp_checks.py")

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None, reason="triton is not installed"
)


def _run(args: list[str], *, interpret: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # silences a Triton 3.9 default warning
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("check", ["row_stats", "logit_grad", "edges", "fused", "reference_cases"])
def test_triton_kernels_match_torch(check: str) -> None:
    proc = _run([str(CHECKS), check], interpret=True)
    assert proc.returncode == 0 and f"ok {check}" in proc.stdout, proc.stdout + proc.stderr


def test_cpu_without_interpreter_is_a_clear_error() -> None:
    code = (
        "import torch\n"
        "from megatron_mel.ops.triton_kernels import TritonLogitKernels\n"
        "try:\n"
        "    TritonLogitKernels().row_stats(torch.zeros(2, 5), torch.zeros(2, dtype=torch.long), 0)\n"
        "except RuntimeError as exc:\n"
        "    print(exc)\n"
    )
    proc = _run(["-c", code], interpret=False)
    assert proc.returncode == 0, proc.stderr
    assert "Triton kernels need a CUDA device, or TRITON_INTERPRET=1" in proc.stdout, proc.stdout
