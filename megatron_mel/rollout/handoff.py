"""Handing the devices between rollout and training: one object, two calls, for every placement.

    to_train()            colocated engines release their weights and KV cache; every rank
                          waits for that, so training allocates into the freed memory.
    to_rollout(version)   they resume their weights, receive the sync of ``version``, then
                          resume their KV cache (slime's order: weights must exist to be loaded
                          into, and the cache is not needed while loading).

With ``rollout.release_memory`` off, or engines on their own GPUs, ``to_train`` does nothing and
``to_rollout`` only syncs. Both are collective; the engine handle lives on the driver.

``rollout/released_gib`` is what the engines report freeing, or, where they cannot say (SGLang,
vLLM), the growth of free device memory the training ranks observe across the release.
"""

from __future__ import annotations

import time

import torch
import torch.distributed as dist

from megatron_mel import platform
from megatron_mel.rollout.engine import RolloutEngine
from megatron_mel.rollout.weight_sync import WeightSynchronizer


class Handoff:
    def __init__(
        self, sync: WeightSynchronizer, engine: RolloutEngine | None, *, release: bool
    ) -> None:
        self.sync = sync
        self.engine = engine
        self.release = release

    def to_train(self) -> dict[str, float]:
        """Free the engines' memory for training (collective); its metrics."""
        if not self.release:
            return {}
        start = time.perf_counter()
        before = _free_device_bytes()
        reported = platform.from_driver(lambda: self._engine().release_memory())
        observed = _sum_over_ranks(_free_device_bytes() - before)
        return {
            "time/release": time.perf_counter() - start,
            "rollout/released_gib": max(reported, observed) / 2**30,
        }

    def to_rollout(self, version: int) -> dict[str, float]:
        """Engines ready to generate with ``version`` (collective); the sync's metrics."""
        resume = 0.0
        if self.release:
            start = time.perf_counter()
            platform.on_driver(lambda: self._engine().resume_memory(["weights"]))
            resume += time.perf_counter() - start
        synced = self.sync.sync(version)
        if self.release:
            start = time.perf_counter()
            platform.on_driver(lambda: self._engine().resume_memory(["kv_cache"]))
            resume += time.perf_counter() - start
        metrics = {**synced.as_dict(), "time/sync": synced.seconds}
        if self.release:
            metrics["time/resume"] = resume
        return metrics

    def _engine(self) -> RolloutEngine:
        assert self.engine is not None, "the engine lives on the driver"
        return self.engine


def _free_device_bytes() -> int:
    if not torch.cuda.is_available():
        return 0
    free, _ = torch.cuda.mem_get_info()
    return int(free)


def _sum_over_ranks(value: int) -> int:
    """Sum over one rank per device: every local rank drives its own GPU."""
    total = platform.collective_tensor([max(value, 0)], dtype=torch.int64)
    dist.all_reduce(total)
    return int(total.item())
