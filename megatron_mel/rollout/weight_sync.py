"""Weight sync: Megatron shards (any TP/PP, DP replicas) -> HF-named buckets -> rollout engines.

    planner     SyncPlan.build: per pipeline stage, the ordered HF names its leader exports
                (convert/mapping.py, tied copies skipped), their shapes (arch) and dtype, cut
                into buckets of ``bucket_bytes``. Pure metadata, built once, reused every sync.
    executor    stage_buckets: iterates convert.checkpoint.iter_hf_tensors (TP all-gather inside
                the stage, the HF mapping, vocab padding removed) and fills the planned buckets.
    transports  WeightTransport.deliver: gets each stage's buckets to the engine(s).
                RootTransport: the engine lives in the process of global rank 0 (embedded
                engine; also the single-process case); other stages' leaders send their
                buckets to rank 0 over the default process group. SGLang and vLLM transports
                live beside their engines.

Only data-parallel replica 0 exports (all replicas hold the same weights). Within it every TP rank
iterates (the gathers are collective) and the TP-rank-0 "stage leader" owns the buckets.

Every public call here is collective over the whole job unless it says otherwise.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

from megatron_mel.convert.checkpoint import iter_hf_tensors, param_mappings
from megatron_mel.convert.mapping import hf_tensor_shape
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
        buckets: list[BucketPlan] = []
        entries: list[BucketEntry] = []
        offset = 0
        for name in names:
            shape = hf_tensor_shape(name, arch)
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
        missing = set(_expected(arch)) - set(plan.names)
        if missing:
            raise WeightSyncError(f"weight-sync plan misses HF tensors: {sorted(missing)[:5]}")
        return plan


def _expected(arch: ModelArch) -> list[str]:
    from megatron_mel.convert.mapping import expected_hf_names

    return expected_hf_names(arch)


def exports_weights() -> bool:
    """Whether this rank takes part in exporting (data-parallel replica 0 only)."""
    return ps.get_data_parallel_rank() == 0


def stage_buckets(
    chunks: list[torch.nn.Module], arch: ModelArch, plan: SyncPlan
) -> Iterator[WeightBucket]:
    """This stage's buckets, filled from the model (collective over the stage's TP group).

    Yields on the stage leader only; other TP ranks of replica 0 must still exhaust the
    iterator, because producing the tensors all-gathers them over TP.
    """
    stage = plan.stages[ps.get_pipeline_model_parallel_rank()]
    leader = ps.get_tensor_model_parallel_rank() == 0
    tensors = iter_hf_tensors(chunks, arch)
    for bucket in stage:
        flat = torch.empty(bucket.numel, dtype=bucket.dtype, device="cpu") if leader else None
        for entry in bucket.entries:
            name, tensor = next(tensors)
            if name != entry.name or tuple(tensor.shape) != entry.shape:
                raise WeightSyncError(
                    f"export order changed: got {name} {tuple(tensor.shape)}, plan expects "
                    f"{entry.name} {entry.shape}"
                )
            if flat is not None:
                flat[entry.offset : entry.offset + entry.numel].copy_(tensor.reshape(-1))
        if flat is not None:
            yield WeightBucket(list(bucket.entries), flat)
    leftover = next(tensors, None)
    if leftover is not None:
        raise WeightSyncError(f"model exports {leftover[0]} which the plan does not have")


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
    """Gets each pipeline stage's buckets to the rollout engine(s).

    ``deliver`` is called on every rank in lockstep. On stage leaders ``buckets`` yields the
    stage's buckets; elsewhere it yields nothing but must still be exhausted (TP collectives).
    """

    @abstractmethod
    def deliver(self, plan: SyncPlan, buckets: Iterator[WeightBucket], version: int) -> None: ...

    @abstractmethod
    def mismatches(self, plan: SyncPlan, buckets: Iterator[WeightBucket]) -> list[str]:
        """HF names whose engine value differs from the exported one (same on every rank)."""


class RootTransport(WeightTransport):
    """The engine lives on global rank 0; remote stage leaders send buckets to it (gloo/NCCL).

    Receive order is fixed (stage 0, 1, ... and bucket order within a stage), so send and
    receive always match without tags.
    """

    def __init__(self, engine: RolloutEngine | None) -> None:
        if (dist.get_rank() == 0) != (engine is not None):
            raise ValueError("RootTransport needs the engine on global rank 0 and only there")
        self.engine = engine

    def _at_root(self, plan: SyncPlan, local: Iterator[WeightBucket]) -> Iterator[WeightBucket]:
        yield from local  # stage 0 is rank 0's own stage
        for stage, leader in enumerate(plan.leaders):
            if leader == 0:
                continue
            for bucket in plan.stages[stage]:
                flat = torch.empty(bucket.numel, dtype=bucket.dtype)
                dist.recv(flat, src=leader)
                yield WeightBucket(list(bucket.entries), flat)

    def _run(
        self, plan: SyncPlan, local: Iterator[WeightBucket], consume: Callable[..., object]
    ) -> object:
        rank = dist.get_rank()
        if rank == 0:
            return consume(self._at_root(plan, local))
        for bucket in local:
            if rank in plan.leaders:
                dist.send(bucket.flat, dst=0)
        return None

    def deliver(self, plan: SyncPlan, buckets: Iterator[WeightBucket], version: int) -> None:
        self._run(plan, buckets, lambda stream: self.engine.update_weights(stream, version))
        dist.barrier()

    def mismatches(self, plan: SyncPlan, buckets: Iterator[WeightBucket]) -> list[str]:
        def compare(stream: Iterator[WeightBucket]) -> list[str]:
            bad = []
            for bucket in stream:
                named = bucket.tensors()
                current = self.engine.get_weights([name for name, _ in named])
                bad += [n for n, t in named if not torch.equal(current[n].to(t.dtype), t)]
            return bad

        result = [self._run(plan, buckets, compare)]
        dist.broadcast_object_list(result, src=0)
        return result[0]


class WeightSynchronizer:
    """Pushes the trainer's weights to the engines: pause -> flush -> load -> resume.

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

    def _local_buckets(self) -> Iterator[WeightBucket]:
        return stage_buckets(self.chunks, self.arch, self.plan) if exports_weights() else iter(())

    @torch.no_grad()
    def sync(self, version: int) -> SyncMetrics:
        """Load the current weights into the engine as ``version``; verify if configured."""
        metrics = SyncMetrics(version=version, bytes=self.plan.nbytes,
                              buckets=sum(len(s) for s in self.plan.stages))  # fmt: skip
        dist.barrier()
        start = time.perf_counter()
        if self.engine is not None:
            self.engine.pause()
            self.engine.flush()
        try:
            self.transport.deliver(self.plan, self._local_buckets(), version)
        finally:
            if self.engine is not None:
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
