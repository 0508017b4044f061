"""The two weight transports for SGLang servers (collective over the whole job).

    ColocatedIpcTransport   engines on the training GPUs. Per bucket, stage by stage:
                            1. the stage leader fills it (its TP peers take part in the gathers);
                            2. it is broadcast from the stage leader to every rank;
                            3. every rank on an engine's GPUs serialises its own copy (a CUDA
                               IPC handle to memory on its own GPU: engine TP rank i maps the
                               memory of the training rank on GPU i, and no handle crosses a
                               node);
                            4. the engine's first rank gathers the entries in TP-rank order (a
                               gloo group per engine) and posts /update_weights_from_tensor;
                            5. every rank learns the outcome before the buffer is reused.
    StageNcclTransport      engines on their own GPUs: each stage leader broadcasts its buckets
                            to every engine over its own group ``mel-pp{stage}``
                            (sglang_weights.StageSender); stages take turns, because an engine
                            blocked in one group's broadcast cannot serve another's.

Only buckets move here; the driver's engine opens the update before and commits the version
once after (rollout/weight_sync.py). A failure on any rank raises the same EngineError on every
rank, after the stage's TP peers have finished their gathers, so nobody is left in a collective.
Every bucket buffer is dropped (or reused) as soon as its request has returned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_mel import platform
from megatron_mel.rollout.engine import EngineError, RolloutEngine, WeightBucket
from megatron_mel.rollout.http import HttpError, poster
from megatron_mel.rollout.placement import Layout
from megatron_mel.rollout.sglang_weights import (
    Serializer,
    StageSender,
    discard_host_files,
    serializer_for,
    tensor_request,
)
from megatron_mel.rollout.weight_sync import (
    BucketPlan,
    SyncPlan,
    WeightTransport,
    compare_at_root,
    exports_weights,
)


def agree_on_failure(error: BaseException | None, what: str) -> None:
    """Collective: raise on every rank if any rank failed, naming every failure."""
    flag = platform.collective_tensor([0 if error is None else 1], dtype=torch.int32)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    if int(flag.item()) == 0:
        return
    messages: list[object] = [None] * dist.get_world_size()
    dist.all_gather_object(
        messages, None if error is None else (getattr(error, "engine", ""), str(error))
    )
    failed = [m for m in messages if m is not None]
    engines = ",".join(sorted({str(e) for e, _ in failed if e})) or "sglang"  # type: ignore[misc]
    raise EngineError(engines, f"{what}: " + "; ".join(msg for _, msg in failed))  # type: ignore[misc]


class ColocatedIpcTransport(WeightTransport):
    """See the module docstring. Construction is collective (one gloo group per engine)."""

    copies_each_bucket = True  # a bucket is consumed by its engine before the next one is made

    def __init__(
        self,
        layout: Layout,
        engine: RolloutEngine | None,
        *,
        timeout_s: float,
        make_serializer: Callable[[torch.device], Serializer] = serializer_for,
    ) -> None:
        self.engine = engine
        self.timeout_s = timeout_s
        self.device = platform.collective_device()
        me = dist.get_rank()
        self.group = None
        self.my_engine = None
        for slot in layout.engines:
            ranks = list(layout.engine_ranks(slot))
            if not ranks:
                raise ValueError(f"engine {slot.index} has no training ranks on its GPUs")
            group = dist.new_group(ranks, backend="gloo")  # every rank creates every group
            if me in ranks:
                self.group, self.my_engine, self.my_ranks = group, slot, ranks
        self.serialize = make_serializer(self.device) if self.my_engine is not None else None
        self._buffers: dict[torch.dtype, torch.Tensor] = {}

    def deliver(self, plan: SyncPlan, local: Iterator[WeightBucket | None], version: int) -> None:
        me = dist.get_rank()
        exporting = exports_weights()
        my_stage = ps.get_pipeline_model_parallel_rank()
        for stage, leader in enumerate(plan.leaders):
            for index, planned in enumerate(plan.stages[stage]):
                bucket = next(local) if exporting and stage == my_stage else None
                flat = bucket.flat if me == leader and bucket is not None else self._buffer(planned)
                dist.broadcast(platform.on_collective_device(flat), src=leader)
                error = self._post(WeightBucket(list(planned.entries), flat))
                agree_on_failure(error, f"colocated weight update, stage {stage} bucket {index}")
        for _ in local:  # the executor checks, on its last step, that nothing was left over
            pass
        if self.device.type == "cuda":
            torch.cuda.ipc_collect()  # drop the IPC references the engines have released

    def _buffer(self, planned: BucketPlan) -> torch.Tensor:
        buffer = self._buffers.get(planned.dtype)
        if buffer is None or buffer.numel() < planned.numel:
            buffer = self._buffers[planned.dtype] = torch.empty(
                planned.numel, dtype=planned.dtype, device=self.device
            )
        return buffer[: planned.numel]

    def _post(self, bucket: WeightBucket) -> BaseException | None:
        """Serialise this rank's copy; the engine's first rank posts all of them."""
        if self.my_engine is None or self.serialize is None:
            return None
        error: BaseException | None = None
        try:
            entry: str | None = self.serialize(bucket)
        except Exception as exc:  # reported to every rank by agree_on_failure
            entry, error = None, exc
        lead = self.my_ranks[0]
        entries: list[str | None] | None = (
            [None] * len(self.my_ranks) if dist.get_rank() == lead else None
        )
        dist.gather_object(entry, entries, dst=lead, group=self.group)
        if entries is None or error is not None:
            return error
        if any(e is None for e in entries):
            return EngineError(
                self.my_engine.url, "a rank of this engine could not serialise its bucket"
            )
        url = self.my_engine.url
        try:
            poster(url, "/update_weights_from_tensor", tensor_request(entries), self.timeout_s)()  # type: ignore[arg-type]
        except HttpError as exc:
            return EngineError(url, f"update_weights_from_tensor: {exc}")
        finally:
            discard_host_files(e for e in entries if e is not None)
        return None

    def mismatches(self, plan: SyncPlan, local: Iterator[WeightBucket | None]) -> list[str]:
        return compare_at_root(self.engine, plan, local)


class StageNcclTransport(WeightTransport):
    """See the module docstring. ``master_address``: this rank's node address (a stage leader
    hosts its group's TCP store, and engines on other nodes connect to it)."""

    copies_each_bucket = True  # each broadcast has completed when send() returns

    def __init__(
        self,
        urls: Sequence[str],
        engine_tps: Sequence[int],
        engine: RolloutEngine | None,
        *,
        master_address: str,
        backend: str,
        timeout_s: float,
    ) -> None:
        self.urls, self.engine_tps, self.engine = list(urls), list(engine_tps), engine
        self.master_address, self.backend, self.timeout_s = master_address, backend, timeout_s
        self.sender: StageSender | None = None

    def deliver(self, plan: SyncPlan, local: Iterator[WeightBucket | None], version: int) -> None:
        my_stage = ps.get_pipeline_model_parallel_rank()
        for stage in range(len(plan.stages)):
            error: BaseException | None = None
            if stage == my_stage and exports_weights():
                for index, bucket in enumerate(local):
                    if bucket is None or error is not None:
                        continue  # TP peers, or a failed leader keeping its peers in step
                    try:
                        self._sender(stage).send(bucket, index)
                    except Exception as exc:  # reported to every rank below
                        error = exc
            agree_on_failure(error, f"NCCL weight update, stage {stage}")

    def _sender(self, stage: int) -> StageSender:
        if self.sender is None:
            self.sender = StageSender(self.urls, self.engine_tps, stage=stage,
                                      master_address=self.master_address, backend=self.backend,
                                      timeout_s=self.timeout_s)  # fmt: skip
        return self.sender

    def mismatches(self, plan: SyncPlan, local: Iterator[WeightBucket | None]) -> list[str]:
        return compare_at_root(self.engine, plan, local)

    def close(self) -> None:
        if self.sender is not None:
            self.sender.close()
            self.sender = None
