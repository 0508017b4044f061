"""Shared fixtures: tiny HF models per family, the SmolLM2 asset, and a torchrun helper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.factories import FAMILIES, make_tiny_hf

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_hf")
    return {family: make_tiny_hf(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def assets():
    """The offline SmolLM2 model and math data (built by `make assets`)."""
    from megatron_mel.assets import AssetsError, prepare_assets

    try:
        return prepare_assets()
    except AssetsError as exc:
        pytest.fail(f"offline assets unavailable ({exc}); run `make assets`")


def run_torchrun(script: str, nproc: int, *args: str, timeout: float = 900) -> str:
    """Run ``tests/parallel/workers/<script>`` on ``nproc`` gloo ranks; return its output.

    Parallel tests run in subprocesses so the CPU shims megatron-core needs never touch the
    pytest process.
    """
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={nproc}",
        str(REPO / "tests" / "parallel" / "workers" / script),
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if proc.returncode != 0:
        raise AssertionError(
            f"{script} on {nproc} ranks failed ({proc.returncode}):\n"
            f"{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
        )
    return proc.stdout


def run_convert_tool(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``tools/convert_checkpoint.py ARGS`` in a subprocess, output captured."""
    return subprocess.run(
        [sys.executable, str(REPO / "tools" / "convert_checkpoint.py"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def pid_alive(pid: int) -> bool:
    """True while ``pid`` exists and is not a zombie (a dead child nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
