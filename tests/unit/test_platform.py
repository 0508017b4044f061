"""Platform pieces that run without a process group: the CPU RNG tracker and env parsing."""

from __future__ import annotations

import pytest
import torch

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
