"""Weight sync: Megatron shards (any TP/PP, DP replicas) -> HF-named buckets -> rollout engines.

    planner     SyncPlan.build: per pipeline stage, the ordered HF names its leader exports
                (convert/mapping.py, tied copies skipped), their shapes (arch) and dtype, cut
                into buckets of ``bucket_bytes``. Pure metadata, built once, reused every sync.
    executor    stage_buckets: iterates convert.checkpoint.iter_hf_tensors (TP all-gather inside
                the stage, the HF mapping, vocab padding removed) and fills the planned buckets,
                one step per planned bucket on every exporting rank, so transports can put
                their own collectives between two buckets.
    transports  WeightTransport.deliver: gets every stage's buckets to the engine(s); it owns
                the sending. RootTransport (here): the engine lives in global rank 0's process
                (embedded engine, vLLM host); other stages' leaders send their buckets there.
                rollout/sglang_sync.py: colocated CUDA IPC from the ranks on each engine's GPUs,
                and one NCCL group per stage for engines on their own GPUs.
    commit      WeightSynchronizer: pause -> flush -> begin -> deliver -> commit -> resume; the
                engine commits the version once, after the last bucket of the last stage.

Only data-parallel replica 0 exports (all replicas hold the same weights). Within it every TP rank
iterates (the gathers are collective) and the TP-rank-0 "stage leader" owns the buckets.

Every public call here is collective over the whole job unless it says otherwise.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_mel import platform
from megatron_mel.convert.checkpoint import iter_hf_tensors, param_mappings
from megatron_mel.convert.mapping import expected_hf_names, hf_tensor_shapes
from megatron_mel.models.arch import ModelArch
from megatron_mel.rollout.engine import BucketEntry, RolloutEngine, WeightBucket


class WeightSyncError(RuntimeError):
    """The exported weights do not follow the plan, or the engine's weights differ after a sync."""


@dataclass(frozen=True, slots=True)
class BucketPlan:
    entries: tuple[BucketEntry, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        last = self.entries[-1]
        return last.offset + last.numel

    @property
    def nbytes(self) -> int:
        return self.numel * torch.tensor([], dtype=self.dtype).element_size()


@dataclass(frozen=True, slots=True)
class SyncPlan:
    """Buckets of every pipeline stage, in delivery order (stage 0 first)."""

    stages: tuple[tuple[BucketPlan, ...], ...]
    leaders: tuple[int, ...]
    """Global rank of each stage's leader (TP rank 0 of data-parallel replica 0)."""

    @property
    def nbytes(self) -> int:
        return sum(b.nbytes for stage in self.stages for b in stage)

    @property
    def names(self) -> list[str]:
        return [e.name for stage in self.stages for b in stage for e in b.entries]

    @staticmethod
    def cut(
        names: list[str], arch: ModelArch, dtype: torch.dtype, bucket_bytes: int
    ) -> tuple[BucketPlan, ...]:
        """Group ``names`` (in order) into buckets of at most ``bucket_bytes`` (pure)."""
        element = torch.tensor([], dtype=dtype).element_size()
        shapes = hf_tensor_shapes(arch)
        buckets: list[BucketPlan] = []
        entries: list[BucketEntry] = []
        offset = 0
        for name in names:
            shape = shapes[name]
            numel = 1
            for dim in shape:
                numel *= dim
            # A tensor larger than the bucket size gets a bucket of its own.
            if entries and (offset + numel) * element > bucket_bytes:
                buckets.append(BucketPlan(tuple(entries), dtype))
                entries, offset = [], 0
            entries.append(BucketEntry(name, shape, offset))
            offset += numel
        if entries:
            buckets.append(BucketPlan(tuple(entries), dtype))
        return tuple(buckets)

    @classmethod
    def build(cls, chunks: list[torch.nn.Module], arch: ModelArch, bucket_bytes: int) -> SyncPlan:
        """Collective: every rank contributes its stage's export order; all get the full plan."""
        dtype = next(chunks[0].parameters()).dtype
        names = [
            name
            for chunk in chunks
            for mapping in param_mappings(chunk, arch)
            if not mapping.is_tied_copy
            for name in mapping.hf_names
        ]
        is_leader = ps.get_tensor_model_parallel_rank() == 0 and ps.get_data_parallel_rank() == 0
        mine = (
            (ps.get_pipeline_model_parallel_rank(), dist.get_rank(), names) if is_leader else None
        )
        gathered: list = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        by_stage = sorted(g for g in gathered if g is not None)
        stages = tuple(
            cls.cut(stage_names, arch, dtype, bucket_bytes) for _, _, stage_names in by_stage
        )
        plan = cls(stages=stages, leaders=tuple(rank for _, rank, _ in by_stage))
        missing = set(expected_hf_names(arch)) - set(plan.names)
        if missing:
            raise WeightSyncError(f"weight-sync plan misses HF tensors: {sorted(missing)[:5]}")
        return plan


def exports_weights() -> bool:
    """Whether this rank takes part in exporting (data-parallel replica 0 only)."""
    return ps.get_data_parallel_rank() == 0


def stage_buckets(
    chunks: list[torch.nn.Module],
    arch: ModelArch,
    plan: SyncPlan,
    staging: dict[torch.dtype, torch.Tensor] | None = None,
) -> Iterator[WeightBucket | None]:
    """This stage's buckets, filled from the model (collective over the stage's TP group).

    Yields once per planned bucket on every TP rank of replica 0: the bucket on the stage
    leader, None on its TP peers, which take part in the gathers that produce it. With
    ``staging`` (one reusable buffer per dtype, grown on demand) every bucket is a view of the
    same memory, which is only safe when the consumer is done with a bucket before asking for
    the next one.
    """
    stage = plan.stages[ps.get_pipeline_model_parallel_rank()]
    leader = ps.get_tensor_model_parallel_rank() == 0
    device = next(chunks[0].parameters()).device
    tensors = iter_hf_tensors(chunks, arch)
    for bucket in stage:
        flat = None
        if leader:
            # On the model's device: CUDA IPC and NCCL senders hand out this very buffer.
            flat = _staging_view(staging, bucket, device)
        for entry in bucket.entries:
            name, tensor = next(tensors)
            if name != entry.name or tuple(tensor.shape) != entry.shape:
                raise WeightSyncError(
                    f"export order changed: got {name} {tuple(tensor.shape)}, plan expects "
                    f"{entry.name} {entry.shape}"
                )
            if flat is not None:
                flat[entry.offset : entry.offset + entry.numel].copy_(tensor.reshape(-1))
        yield WeightBucket(list(bucket.entries), flat) if flat is not None else None
    leftover = next(tensors, None)
    if leftover is not None:
        raise WeightSyncError(f"model exports {leftover[0]} which the plan does not have")


def _staging_view(
    staging: dict[torch.dtype, torch.Tensor] | None, bucket: BucketPlan, device: torch.device
) -> torch.Tensor:
    if staging is None:
        return torch.empty(bucket.numel, dtype=bucket.dtype, device=device)
    buffer = staging.get(bucket.dtype)
    if buffer is None or buffer.numel() < bucket.numel:
        # Allocated once and reused: a fresh half-gigabyte buffer per sync costs more in page
        # faults than the copies themselves.
        buffer = staging[bucket.dtype] = torch.empty(
            bucket.numel, dtype=bucket.dtype, device=device
        )
    return buffer[: bucket.numel]


@dataclass(slots=True)
class SyncMetrics:
    version: int
    seconds: float = 0.0
    bytes: int = 0
    buckets: int = 0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def gb_per_s(self) -> float:
        return self.bytes / max(self.seconds, 1e-9) / 1e9

    def as_dict(self) -> dict[str, float]:
        return {
            "sync/seconds": self.seconds,
            "sync/bytes": float(self.bytes),
            "sync/gb_per_s": self.gb_per_s,
            "sync/buckets": float(self.buckets),
            "sync/weight_version": float(self.version),
            **self.extra,
        }


class WeightTransport(ABC):
    """Gets each pipeline stage's buckets to the rollout engine(s); it owns the sending.

    ``deliver`` is called on every rank in lockstep. ``local`` steps once per planned bucket of
    this rank's stage on the ranks that export it (the bucket on the stage leader, None on its
    TP peers) and is empty elsewhere; it must be exhausted (the TP gathers are collective).
    ``copies_each_bucket``: the transport is done with a bucket before it asks for the next, so
    buckets may share one staging buffer.
    """

    copies_each_bucket: bool = False

    @abstractmethod
    def deliver(
        self, plan: SyncPlan, local: Iterator[WeightBucket | None], version: int
    ) -> None: ...

    @abstractmethod
    def mismatches(self, plan: SyncPlan, local: Iterator[WeightBucket | None]) -> list[str]:
        """HF names whose engine value differs from the exported one (same on every rank)."""

    def close(self) -> None:
        """Release what the transport holds (process groups); every rank calls it."""
        return None


def at_root(plan: SyncPlan, local: Iterator[WeightBucket | None]) -> Iterator[WeightBucket]:
    """Every stage's buckets on global rank 0, in plan order; on other ranks, send and yield
    nothing. Receive order is fixed (stage 0, 1, ..., buckets in order), so sends and receives
    always match without tags."""
    if dist.get_rank() != 0:
        for bucket in local:
            if bucket is not None:
                dist.send(platform.on_collective_device(bucket.flat), dst=0)
        return
    for bucket in local:  # stage 0 is rank 0's own stage
        if bucket is not None:
            yield bucket
    for stage, leader in enumerate(plan.leaders):
        if leader == 0:
            continue
        for planned in plan.stages[stage]:
            flat = platform.collective_empty(planned.numel, dtype=planned.dtype)
            dist.recv(flat, src=leader)
            yield WeightBucket(list(planned.entries), flat)


def compare_at_root(
    engine: RolloutEngine | None, plan: SyncPlan, local: Iterator[WeightBucket | None]
) -> list[str]:
    """Names whose engine value differs from the export; the same list on every rank.

    Engines that only return a prefix of a tensor (SGLang's get_weights_by_name) are compared
    on that prefix.
    """
    bad: list[str] = []
    stream = at_root(plan, local)
    if engine is None:
        for _ in stream:  # sends this rank's buckets
            pass
    else:
        for bucket in stream:
            named = bucket.tensors()
            current = engine.get_weights([name for name, _ in named])
            for name, tensor in named:
                got = current[name].cpu()
                want = tensor.cpu()
                if got.shape != want.shape:
                    want = want.reshape(-1)[: got.numel()].reshape(got.shape)
                if not torch.equal(got, want.to(got.dtype)):
                    bad.append(name)
    result = [bad]
    dist.broadcast_object_list(result, src=0)
    return result[0]


class RootTransport(WeightTransport):
    """The engine lives in the process of global rank 0 (embedded engine, vLLM host);
    remote stage leaders send their buckets there and rank 0 loads them."""

    copies_each_bucket = True  # dist.send and load_weights finish with a bucket before the next

    def __init__(self, engine: RolloutEngine | None) -> None:
        if (dist.get_rank() == 0) != (engine is not None):
            raise ValueError("RootTransport needs the engine on global rank 0 and only there")
        self.engine = engine

    def deliver(self, plan: SyncPlan, local: Iterator[WeightBucket | None], version: int) -> None:
        stream = at_root(plan, local)
        if self.engine is not None:
            self.engine.load_weights(stream)
        else:
            for _ in stream:
                pass

    def mismatches(self, plan: SyncPlan, local: Iterator[WeightBucket | None]) -> list[str]:
        return compare_at_root(self.engine, plan, local)


class WeightSynchronizer:
    """Pushes the trainer's weights to the engines: pause -> flush -> begin -> deliver ->
    commit -> resume (see the module docstring).

    ``engine`` is the engine object on the rank that drives it (rank 0), None elsewhere.
    """

    def __init__(
        self,
        chunks: list[torch.nn.Module],
        arch: ModelArch,
        transport: WeightTransport,
        engine: RolloutEngine | None,
        *,
        bucket_bytes: int,
        verify: bool = False,
    ) -> None:
        self.chunks = chunks
        self.arch = arch
        self.transport = transport
        self.engine = engine
        self.verify = verify
        self.plan = SyncPlan.build(chunks, arch, bucket_bytes)
        self._staging: dict[torch.dtype, torch.Tensor] | None = (
            {} if transport.copies_each_bucket else None
        )

    def _local_buckets(self) -> Iterator[WeightBucket | None]:
        if not exports_weights():
            return iter(())
        return stage_buckets(self.chunks, self.arch, self.plan, self._staging)

    @torch.no_grad()
    def sync(self, version: int) -> SyncMetrics:
        """Load the current weights into the engine as ``version``; verify if configured.

        The driver pauses the engine, opens the update, the transport delivers every stage's
        buckets, and after a barrier (every stage has landed) the driver commits ``version``
        once. A failure anywhere raises on every rank before anything is committed.
        """
        metrics = SyncMetrics(version=version, bytes=self.plan.nbytes,
                              buckets=sum(len(s) for s in self.plan.stages))  # fmt: skip
        dist.barrier()
        start = time.perf_counter()
        platform.on_driver(self._open)
        try:
            self.transport.deliver(self.plan, self._local_buckets(), version)
            dist.barrier()
            platform.on_driver(lambda: self.engine.commit_weights(version))  # type: ignore[union-attr]
        finally:
            if self.engine is not None and self.engine.paused:
                self.engine.resume()
        metrics.seconds = time.perf_counter() - start
        if self.verify:
            bad = self.transport.mismatches(self.plan, self._local_buckets())
            metrics.extra["sync/verified_tensors"] = float(len(self.plan.names))
            if bad:
                raise WeightSyncError(
                    f"weight version {version}: engine weights differ from the trainer's HF "
                    f"export for {len(bad)} tensors, e.g. {bad[:3]}; stopping before the next "
                    "rollout"
                )
        return metrics

    def _open(self) -> None:
        assert self.engine is not None
        self.engine.pause()
        self.engine.flush()
        self.engine.begin_weight_update()

    def close(self) -> None:
        self.transport.close()
