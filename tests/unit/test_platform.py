"""Platform pieces that run without a process group: CPU RNG tracker, env parsing, heap trim."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from megatron_mel import platform
from megatron_mel.platform import CpuRNGStatesTracker, launcher_env


def test_cpu_rng_tracker_forks_and_restores():
    tracker = CpuRNGStatesTracker()
    tracker.add("model-parallel-rng", 7)
    torch.manual_seed(0)
    before = torch.get_rng_state()
    with tracker.fork("model-parallel-rng"):
        first = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), before)  # outer stream untouched
    with tracker.fork("model-parallel-rng"):
        second = torch.rand(3)
    assert not torch.equal(first, second)  # the forked stream advanced
    replay = CpuRNGStatesTracker()
    replay.add("model-parallel-rng", 7)
    with replay.fork("model-parallel-rng"):
        assert torch.equal(torch.rand(3), first)


def test_cpu_rng_tracker_rejects_duplicates_and_unknown():
    tracker = CpuRNGStatesTracker()
    tracker.add("a", 1)
    with pytest.raises(RuntimeError, match="seed 1 already"):
        tracker.add("b", 1)
    with pytest.raises(RuntimeError, match="'a' already"):
        tracker.add("a", 2)
    with pytest.raises(RuntimeError, match="not registered"), tracker.fork("zzz"):
        pass


def test_launcher_env(monkeypatch):
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS", "MASTER_ADDR"):
        monkeypatch.delenv(key, raising=False)
    assert launcher_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("MASTER_ADDR", "node1")
    assert launcher_env() == (5, 8, 1)
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "3")
    assert launcher_env() == (3, 4, 3)  # torchrun wins over srun


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


# In a fresh interpreter: whether freed tensors stay resident depends on the heap's history
# (holes left by earlier tests get reused, a chunk freed at the heap top is trimmed by free()
# itself), so in a worker that ran other tests first the premise below did not always hold.
_TRIM_PROBE = """
import psutil, torch
from megatron_mel import platform
rss = lambda: psutil.Process().memory_info().rss
start = rss()
# Freeing a 16 MiB mmapped block raises glibc's mmap threshold to 16 MiB, so the 8 MiB
# tensors below come from the heap.
block = torch.ones(4 * 2**20)
del block
tensors = [torch.ones(2 * 2**20) for _ in range(48)]  # 48 x 8 MiB, touched
pin = torch.ones(2**18)  # a live block above them: the heap top cannot shrink by itself
del tensors
before = rss()
platform.release_host_memory()
after = rss()
assert pin.sum() == 2**18
print(start, before, after)
"""


@pytest.mark.skipif(platform._glibc() is None, reason="malloc_trim is glibc's")
def test_release_host_memory_returns_freed_heap_tensors_to_the_os():
    out = _python(_TRIM_PROBE)
    assert out.returncode == 0, out.stderr[-2000:]
    start, before, after = (int(x) for x in out.stdout.split())
    mib = 2**20
    assert before - start >= 300 * mib  # the freed 384 MiB were still resident
    assert before - after >= 300 * mib  # and the trim gave them back
    assert after - start <= 32 * mib


def test_cpu_shims_suspended_pops_the_device_mode_and_restores_it():
    # In a subprocess: the shims are process-wide once installed (docs/architecture.md).
    code = (
        "import torch\n"
        "from torch.overrides import _get_current_function_mode as mode\n"
        "from megatron_mel import platform\n"
        "platform.install_cpu_shims()\n"
        "shim = mode()\n"
        "assert shim is not None and torch.zeros(1, device='cuda').device.type == 'cpu'\n"
        "with platform.cpu_shims_suspended():\n"
        "    assert mode() is None\n"
        "assert mode() is shim\n"
        "print('ok')\n"
    )
    out = _python(code)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]
