"""The rollout-engine interface: everything MEL generates goes through it.

Rollouts, reflections and replays are all ``generate`` calls on a :class:`RolloutEngine`; every
completion is stamped with the weight version that produced it. Implementations: the embedded
in-process engine (CPU default, usable on GPU), SGLang servers and vLLM.

Contract (the base class holds the guards, subclasses implement the ``_hooks``):

* ``generate(requests)`` blocks until every request finished or raises :class:`EngineError`
  naming the engine and the request ids that were lost; the caller may retry them. Log-probs
  are log pi(token) under the model's unscaled distribution (temperature 1), the quantity the
  trainer recomputes, whatever the sampling temperature.
* Weights arrive in two steps, both only while paused (pause -> flush -> load -> commit ->
  resume), so no request ever mixes two versions. A transport (rollout/weight_sync.py) owns the
  sending: for an engine in this process it calls ``load_weights(buckets)`` (a stream of
  HF-named :class:`WeightBucket`); for servers it sends to them itself (CUDA IPC, NCCL). Then the
  synchronizer calls ``commit_weights(version)`` once, after every bucket of every pipeline stage
  has landed: the engine checks what it can and from then on reports ``weight_version ==
  version``. ``update_weights(buckets, version)`` is both steps for in-process engines.
* ``release_memory(tags)`` / ``resume_memory(tags)`` free and restore GPU (or host) memory of the
  weights and the KV cache (:data:`MEMORY_TAGS`) when the engine shares the trainer's devices
  (colocation, rollout/handoff.py). Released weights hold garbage once resumed: only a commit
  after a complete load makes the engine generate again. Nothing generates while anything is
  released.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

FinishReason = Literal["stop", "length", "abort"]
MemoryTag = Literal["weights", "kv_cache"]
MEMORY_TAGS: tuple[MemoryTag, ...] = ("weights", "kv_cache")


class EngineError(RuntimeError):
    """An engine failed a call. ``lost`` lists the request ids without a result."""

    def __init__(self, engine: str, message: str, lost: Sequence[str] = ()) -> None:
        self.engine = engine
        self.message = message
        self.lost = list(lost)
        detail = f"; lost requests: {', '.join(self.lost)}" if self.lost else ""
        super().__init__(f"engine {engine}: {message}{detail}")

    def __reduce__(self) -> tuple:
        # Travels between ranks (broadcast from the driver) with its fields intact.
        return (type(self), (self.engine, self.message, self.lost))


@dataclass(frozen=True, slots=True)
class SamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    """-1 disables top-k."""
    max_new_tokens: int = 512
    stop_token_ids: tuple[int, ...] = ()
    """Generation ends after any of these (included in the output); the EOS belongs here."""
    seed: int | None = None
    """Seeds this request's sampling; the same seed, prompt and weights give the same tokens."""

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k == 0 or self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 1, got {self.top_k}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)


@dataclass(slots=True)
class Completion:
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: FinishReason
    weight_version: int

    @property
    def truncated(self) -> bool:
        return self.finish_reason == "length"


@dataclass(slots=True)
class GenerationResult:
    request_id: str
    prompt_token_ids: list[int]
    completions: list[Completion]


@dataclass(frozen=True, slots=True)
class BucketEntry:
    name: str
    shape: tuple[int, ...]
    offset: int
    """First element of this tensor in the bucket's flat buffer."""

    @property
    def numel(self) -> int:
        n = 1
        for dim in self.shape:
            n *= dim
        return n


@dataclass(slots=True)
class WeightBucket:
    """HF-named tensors of one dtype, flattened into one contiguous 1-D buffer.

    One buffer per bucket means one transfer (CUDA IPC handle, NCCL broadcast, gloo send) per
    bucket instead of one per tensor, the difference verl measured at ~10x.
    """

    entries: list[BucketEntry]
    flat: torch.Tensor

    @classmethod
    def from_tensors(cls, named: Sequence[tuple[str, torch.Tensor]]) -> WeightBucket:
        if not named:
            raise ValueError("a weight bucket needs at least one tensor")
        dtypes = {t.dtype for _, t in named}
        if len(dtypes) != 1:
            raise ValueError(f"a weight bucket holds one dtype, got {sorted(map(str, dtypes))}")
        entries, offset = [], 0
        for name, tensor in named:
            entries.append(BucketEntry(name, tuple(tensor.shape), offset))
            offset += tensor.numel()
        flat = torch.cat([t.reshape(-1) for _, t in named])
        return cls(entries, flat)

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Views into the flat buffer, one per entry (no copy)."""
        return [
            (e.name, self.flat[e.offset : e.offset + e.numel].view(e.shape)) for e in self.entries
        ]


@dataclass(frozen=True, slots=True)
class EngineHealth:
    name: str
    healthy: bool
    weight_version: int
    detail: str = ""


class RolloutEngine(ABC):
    """One generation backend (possibly several servers behind it); see the module docstring."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._version = 0
        self._paused = False
        self._released: set[str] = set()
        self._lock = threading.Lock()

    @property
    def weight_version(self) -> int:
        return self._version

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def released(self) -> frozenset[str]:
        """Memory tags currently released (see :meth:`release_memory`)."""
        return frozenset(self._released)

    # -- public API with guards --------------------------------------------------------------

    def generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if self._paused:
            raise EngineError(
                self.name, "generate() while paused", [r.request_id for r in requests]
            )
        if self._released:
            raise EngineError(
                self.name,
                f"generate() while {'/'.join(sorted(self._released))} memory is released; "
                "call resume_memory() (and sync the weights) first",
                [r.request_id for r in requests],
            )
        ids = [r.request_id for r in requests]
        if len(set(ids)) != len(ids):
            raise ValueError("request ids must be unique within a generate() call")
        for request in requests:
            if not request.prompt_token_ids:
                raise ValueError(f"request {request.request_id!r} has an empty prompt")
        if not requests:
            return []
        try:
            results = self._generate(requests)
        except EngineError:
            raise
        except Exception as exc:
            raise EngineError(self.name, f"{type(exc).__name__}: {exc}", ids) from exc
        missing = set(ids) - {r.request_id for r in results}
        if missing:
            raise EngineError(self.name, "results missing", sorted(missing))
        order = {rid: i for i, rid in enumerate(ids)}
        return sorted(results, key=lambda r: order[r.request_id])

    def begin_weight_update(self) -> None:
        """Open an update after pause/flush (servers that need a session open one here)."""
        self._require_paused("begin_weight_update()")
        self._begin_weight_update()

    def load_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Copy HF-named buckets into this engine (in-process engines; see the module doc)."""
        self._require_paused("load_weights()")
        if "weights" in self._released:
            raise EngineError(self.name, "load_weights() into released weights: resume first")
        self._load_weights(buckets)

    def commit_weights(self, version: int) -> None:
        """Make ``version`` current once every bucket has landed (exactly once per version)."""
        self._require_paused("commit_weights()")
        if version <= self._version:
            raise EngineError(self.name, f"weight version {version} <= current {self._version}")
        if "weights" in self._released:
            raise EngineError(self.name, f"commit of version {version} while weights are released")
        self._commit_weights(version)
        self._version = version

    def update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None:
        """``load_weights`` then ``commit_weights``: the whole update for in-process engines."""
        self._require_paused("update_weights()")
        if version <= self._version:
            raise EngineError(self.name, f"weight version {version} <= current {self._version}")
        self.load_weights(buckets)
        self.commit_weights(version)

    def pause(self) -> None:
        self._pause()
        self._paused = True

    def flush(self) -> None:
        self._flush()

    def resume(self) -> None:
        self._resume()
        self._paused = False

    def release_memory(self, tags: Sequence[MemoryTag] = MEMORY_TAGS) -> int:
        """Free the memory of ``tags``; returns the bytes freed (0 where the backend cannot say).

        Only between generate calls: an engine that shares devices with the trainer releases
        before the optimizer step and resumes before the next rollout.
        """
        wanted = _check_tags(tags)
        todo = [t for t in MEMORY_TAGS if t in wanted and t not in self._released]
        if not todo:
            return 0
        freed = self._release_memory(tuple(todo))
        self._released.update(todo)
        return freed

    def resume_memory(self, tags: Sequence[MemoryTag] = MEMORY_TAGS) -> None:
        """Reallocate the memory of ``tags``; resumed weights need a load and a commit."""
        wanted = _check_tags(tags)
        todo = [t for t in MEMORY_TAGS if t in wanted and t in self._released]
        if todo:
            self._resume_memory(tuple(todo))
            self._released.difference_update(todo)

    def health(self) -> EngineHealth:
        try:
            detail = self._health()
        except Exception as exc:  # a health check reports, it does not raise
            return EngineHealth(self.name, False, self._version, f"{type(exc).__name__}: {exc}")
        return EngineHealth(self.name, True, self._version, detail)

    def _require_paused(self, what: str) -> None:
        if not self._paused:
            raise EngineError(self.name, f"{what} needs pause() first (no mixed versions)")

    # -- hooks -------------------------------------------------------------------------------

    @abstractmethod
    def _generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]: ...

    def _begin_weight_update(self) -> None:
        return None

    def _load_weights(self, buckets: Iterable[WeightBucket]) -> None:
        raise EngineError(
            self.name,
            "this engine receives weights from its transport, not through load_weights()",
        )

    def _commit_weights(self, version: int) -> None:
        return None

    @abstractmethod
    def get_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Current values of HF-named tensors, on CPU (weight verification)."""

    def _pause(self) -> None:
        return None

    def _flush(self) -> None:
        return None

    def _resume(self) -> None:
        return None

    def _health(self) -> str:
        return "ok"

    def _release_memory(self, tags: tuple[MemoryTag, ...]) -> int:
        return 0

    def _resume_memory(self, tags: tuple[MemoryTag, ...]) -> None:
        return None

    def shutdown(self) -> None:
        return None


def _check_tags(tags: Sequence[str]) -> set[str]:
    unknown = sorted(set(tags) - set(MEMORY_TAGS))
    if unknown:
        raise ValueError(f"unknown memory tags {unknown}; known: {list(MEMORY_TAGS)}")
    return set(tags)
