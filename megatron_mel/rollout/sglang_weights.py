"""What SGLang servers receive as weights: payloads, IPC serializers and the per-stage NCCL sender.

SGLang >= 0.5.6 (the floor setup.py pins) loads a "flattened bucket": one ``torch.uint8`` tensor
holding the raw bytes of several HF-named tensors back to back, and per tensor a
``FlattenedTensorMetadata(name, shape, dtype, start_idx, end_idx, numel)`` whose indices count
bytes (sglang/srt/weight_sync/tensor_bucket.py). Our :class:`WeightBucket` keeps one dtype per
bucket, so its byte view is exactly that layout.

* Colocated (``/update_weights_from_tensor``, ``load_format="flattened_bucket"``):
  ``serialized_named_tensors`` holds one entry per engine TP rank, and rank i deserialises entry
  i only (sglang/srt/managers/tp_worker.py). Each entry must be a CUDA IPC handle to memory on
  that rank's own GPU, so every training rank on an engine's GPUs serialises its own copy of
  the bucket (rollout/sglang_sync.py gathers them). :func:`sglang_serializer` makes SGLang's
  payload (``MultiprocessingSerializer`` of ``{"flattened_tensor", "metadata"}``; SGLang's
  unpickler accepts only its own classes, hence the import). :func:`host_file_serializer` is
  the same contract for CPU buckets: the bytes go to a file and the entry names it, with the
  sender's rank and host; only the fake server of the tests (tests/fakes/sglang_server.py)
  reads it, since real SGLang needs CUDA.
* Disaggregated (``/update_weights_from_distributed``): :class:`StageSender` owns one NCCL
  group ``mel-pp{stage}`` per trainer pipeline stage, rank 0 being the stage leader (it hosts
  the TCP store, so ``master_address`` must be its node's address), engine i's TP ranks taking
  ``1 + sum(tp[:i])`` onwards. Each bucket is one request per engine naming the tensors, plus
  one broadcast of the bucket's uint8 bytes (the receiver allocates exactly that).

Neither stamps a weight version: the engine commits it once, after every bucket of every stage
(rollout/sglang_engine.py). Servers from 0.5.21 also need the update inside a
``/begin_weight_update`` ... ``/end_weight_update`` session, which the engine opens and closes.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import socket
import tempfile
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

from megatron_mel import platform
from megatron_mel.rollout.engine import EngineError, WeightBucket
from megatron_mel.rollout.http import poster, raise_engine_errors, run_parallel

FLATTENED_BUCKET = "flattened_bucket"
GPU_HINT = (
    "needs CUDA and the GPU extras (`pip install -e .[sglang]` or `.[vllm]`); on CPU use "
    "rollout.engine: embedded"
)
HOST_FILE_KEY = "mel_host_file_bucket"


class GPUBackendUnavailable(RuntimeError):
    """A GPU rollout backend (SGLang, vLLM, CUDA IPC, NCCL) cannot run on this machine."""


def require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise GPUBackendUnavailable(f"{what} {GPU_HINT} (torch sees no CUDA device)")


def import_or_explain(module: str, what: str) -> Any:
    """Import ``module`` or raise :class:`GPUBackendUnavailable` with the install hint."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise GPUBackendUnavailable(
            f"{what} {GPU_HINT} ({module} is not importable: {exc})"
        ) from exc


# -- pure payload builders -------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bucket_bytes(bucket: WeightBucket) -> torch.Tensor:
    """The bucket's flat buffer as the uint8 tensor SGLang's flattened bucket holds (a view)."""
    return bucket.flat.view(torch.uint8)


def bucket_metadata(bucket: WeightBucket) -> list[dict[str, Any]]:
    """Per-tensor layout in SGLang's ``FlattenedTensorMetadata`` terms: byte offsets."""
    dtype = bucket.flat.dtype
    size = bucket.flat.element_size()
    return [
        {
            "name": e.name,
            "shape": list(e.shape),
            "dtype": dtype,
            "start_idx": e.offset * size,
            "end_idx": (e.offset + e.numel) * size,
            "numel": e.numel * size,
        }
        for e in bucket.entries
    ]


def tensor_request(serialized: Sequence[str]) -> dict[str, Any]:
    """``/update_weights_from_tensor`` body; the cache is flushed and the version stamped by the
    engine's commit, once, after the last bucket."""
    return {
        "serialized_named_tensors": list(serialized),
        "load_format": FLATTENED_BUCKET,
        "flush_cache": False,
    }


def distributed_request(
    bucket: WeightBucket, group_name: str, *, load_format: str | None = FLATTENED_BUCKET
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "names": [e.name for e in bucket.entries],
        "dtypes": [dtype_name(bucket.flat.dtype)] * len(bucket.entries),
        "shapes": [list(e.shape) for e in bucket.entries],
        "group_name": group_name,
        "flush_cache": False,
    }
    if load_format is not None:
        body["load_format"] = load_format
    return body


@dataclass(frozen=True)
class GroupPlan:
    group_name: str
    world_size: int
    requests: list[tuple[str, dict[str, Any]]]
    """``(engine url, /init_weights_update_group body)`` in the order they are posted."""


def plan_weight_group(
    urls: Sequence[str],
    engine_tps: Sequence[int],
    *,
    stage: int,
    master_address: str,
    master_port: int,
    backend: str = "nccl",
    prefix: str = "mel",
) -> GroupPlan:
    """Rank layout of the stage's group: trainer 0, then every engine's TP ranks in URL order."""
    if len(urls) != len(engine_tps) or not urls:
        raise ValueError("one TP size per engine URL, at least one engine")
    group_name = f"{prefix}-pp{stage}"
    world_size = 1 + sum(engine_tps)
    requests, offset = [], 1
    for url, tp in zip(urls, engine_tps):
        body = {
            "master_address": master_address,
            "master_port": master_port,
            "rank_offset": offset,
            "world_size": world_size,
            "group_name": group_name,
            "backend": backend,
        }
        requests.append((url, body))
        offset += tp
    return GroupPlan(group_name, world_size, requests)


# -- serializers: one entry of serialized_named_tensors ---------------------------------------

Serializer = Callable[[WeightBucket], str]


def sglang_serializer() -> Serializer:
    """SGLang's own CUDA IPC payload for a bucket on this rank's GPU (imports SGLang)."""
    require_cuda("SGLang colocated weight sync")
    utils = import_or_explain("sglang.srt.utils", "SGLang colocated weight sync")
    from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata

    monkey_patch_torch_reductions()  # IPC handles name devices by UUID, not visible index

    def serialize(bucket: WeightBucket) -> str:
        if not bucket.flat.is_cuda:
            raise ValueError("colocated weight sync shares CUDA memory; got a CPU bucket")
        metadata = [
            FlattenedTensorMetadata(**{**m, "shape": torch.Size(m["shape"])})
            for m in bucket_metadata(bucket)
        ]
        payload = {"flattened_tensor": bucket_bytes(bucket), "metadata": metadata}
        return utils.MultiprocessingSerializer.serialize(payload, output_str=True)

    return serialize


def host_file_serializer(directory: str | Path | None = None) -> Serializer:
    """The CPU stand-in for CUDA IPC: the bucket's bytes in a file under ``directory``
    (default /dev/shm), the entry a JSON naming it, its layout and who sent it."""
    root = Path(directory or ("/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()))
    counter = iter(range(1 << 62))
    rank = int(os.environ.get("RANK", "0"))

    def serialize(bucket: WeightBucket) -> str:
        if bucket.flat.is_cuda:
            raise ValueError("the host-file payload is for CPU buckets; CUDA uses sglang IPC")
        path = root / f"mel-bucket-{os.getpid()}-{next(counter)}.bin"
        path.write_bytes(bucket_bytes(bucket).contiguous().numpy().tobytes())
        meta = [{**m, "dtype": dtype_name(m["dtype"])} for m in bucket_metadata(bucket)]
        return json.dumps(
            {HOST_FILE_KEY: str(path), "metadata": meta, "rank": rank, "host": socket.gethostname()}
        )

    return serialize


def read_host_file_entry(entry: str) -> tuple[list[tuple[str, torch.Tensor]], dict[str, Any]]:
    """Inverse of :func:`host_file_serializer` (the receiving side): tensors and sender info."""
    payload = json.loads(entry)
    raw = torch.frombuffer(bytearray(Path(payload[HOST_FILE_KEY]).read_bytes()), dtype=torch.uint8)
    tensors = [
        (
            m["name"],
            raw[m["start_idx"] : m["end_idx"]].view(getattr(torch, m["dtype"])).view(m["shape"]),
        )
        for m in payload["metadata"]
    ]
    return tensors, {"rank": payload["rank"], "host": payload["host"]}


def discard_host_files(entries: Iterable[str]) -> None:
    """Delete the files behind host-file entries once the server answered (CPU path only)."""
    for entry in entries:
        with contextlib.suppress(ValueError, KeyError, OSError):
            Path(json.loads(entry)[HOST_FILE_KEY]).unlink()


def serializer_for(device: torch.device) -> Serializer:
    """CUDA IPC for GPU buckets, the host-file payload for CPU buckets."""
    return sglang_serializer() if device.type == "cuda" else host_file_serializer()


# -- process group for the disaggregated transport --------------------------------------------


def init_custom_process_group(
    *, backend: str, init_method: str, world_size: int, rank: int, group_name: str, timeout: float
) -> Any:
    """A torch process group outside the default one, created the way SGLang's engines create
    their side (TCP store at ``init_method``, keys prefixed by the group name, no default-group
    membership), so both ends agree on the store keys. Rank 0 hosts the TCP store.

    The store is made here rather than by ``c10d.rendezvous``: inside a torchrun worker
    (TORCHELASTIC_USE_AGENT_STORE=True) rendezvous never starts a store server, so a trainer
    rank 0 would wait for a store nobody hosts (torch/distributed/rendezvous.py).
    """
    from urllib.parse import urlsplit

    import torch.distributed as dist
    from torch.distributed import distributed_c10d as c10d

    where = urlsplit(init_method)
    if where.scheme != "tcp" or not where.hostname or not where.port:
        raise ValueError(f"init_method must be tcp://host:port, got {init_method!r}")
    delta = timedelta(seconds=timeout)
    store = dist.TCPStore(where.hostname, where.port, world_size, is_master=rank == 0,
                          timeout=delta, wait_for_workers=False)  # fmt: skip
    store = c10d.PrefixStore(group_name, store)
    params = inspect.signature(c10d._new_process_group_helper).parameters
    options = "backend_options" if "backend_options" in params else "pg_options"
    pg, _ = c10d._new_process_group_helper(
        world_size,
        rank,
        [],
        c10d.Backend(backend),
        store,
        group_name=group_name,
        timeout=delta,
        **{options: None},
    )
    c10d._world.pg_group_ranks[pg] = {i: i for i in range(world_size)}
    return pg


class StageSender:
    """The NCCL (gloo in CPU tests) sender of one pipeline stage's leader: rank 0 of
    ``mel-pp{stage}``. The group is made once, on the first send, and destroyed by close()."""

    def __init__(
        self,
        urls: Sequence[str],
        engine_tps: Sequence[int],
        *,
        stage: int,
        master_address: str,
        backend: str = "nccl",
        timeout_s: float = 600.0,
        init_timeout_s: float = 300.0,
        load_format: str | None = FLATTENED_BUCKET,
    ) -> None:
        self.urls, self.engine_tps, self.stage = list(urls), list(engine_tps), stage
        self.backend, self.master_address = backend, master_address
        self.timeout_s, self.init_timeout_s, self.load_format = (
            timeout_s,
            init_timeout_s,
            load_format,
        )
        self.group: Any = None
        self.plan: GroupPlan | None = None

    def connect(self) -> GroupPlan:
        """Create the group: every engine is told (in URL order) while the trainer joins."""
        if self.group is not None:
            assert self.plan is not None
            return self.plan
        if self.backend == "nccl":
            require_cuda("SGLang NCCL weight sync")
        port = platform.free_port(self.master_address)
        plan = plan_weight_group(self.urls, self.engine_tps, stage=self.stage,
                                 master_address=self.master_address, master_port=port,
                                 backend=self.backend)  # fmt: skip
        results: dict[str, Any] = {}
        errors: dict[str, BaseException] = {}
        threads = _start_posts(
            [
                (u, poster(u, "/init_weights_update_group", b, self.init_timeout_s))
                for u, b in plan.requests
            ],
            results,
            errors,
        )
        try:
            group = init_custom_process_group(
                backend=self.backend, init_method=f"tcp://{self.master_address}:{port}",
                world_size=plan.world_size, rank=0, group_name=plan.group_name,
                timeout=self.init_timeout_s,
            )  # fmt: skip
        except Exception as exc:
            _join(threads, self.init_timeout_s)
            silent = [u for u, _ in plan.requests if u not in results]
            raise EngineError(
                ",".join(silent) or ",".join(self.urls),
                f"weight group {plan.group_name} at {self.master_address}:{port} did not form "
                f"within {self.init_timeout_s}s: {exc}; engine errors: {errors or 'none'}",
            ) from exc
        _join(threads, self.init_timeout_s)
        for url, _ in plan.requests:
            if url not in results and url not in errors:
                errors[url] = TimeoutError(f"no answer within {self.init_timeout_s}s")
        if errors:
            _destroy(group)
            raise_engine_errors(errors, f"init_weights_update_group {plan.group_name}")
        self.group, self.plan = group, plan
        return plan

    def send(self, bucket: WeightBucket, index: int) -> None:
        """One bucket: a request per engine, and the broadcast they wait for."""
        import torch.distributed as dist

        plan = self.connect()
        body = distributed_request(bucket, plan.group_name, load_format=self.load_format)
        results: dict[str, Any] = {}
        errors: dict[str, BaseException] = {}
        threads = _start_posts(
            [
                (u, poster(u, "/update_weights_from_distributed", body, self.timeout_s))
                for u in self.urls
            ],
            results,
            errors,
        )
        if self.load_format == FLATTENED_BUCKET:
            payload = platform.on_collective_device(bucket_bytes(bucket), self.group)
            dist.broadcast(payload, src=0, group=self.group)
        else:
            for _, view in bucket.tensors():
                dist.broadcast(
                    platform.on_collective_device(view, self.group), src=0, group=self.group
                )
        _join(threads, self.timeout_s)
        for url in self.urls:
            if url not in results and url not in errors:
                errors[url] = TimeoutError(f"no answer within {self.timeout_s}s")
        raise_engine_errors(errors, f"update_weights_from_distributed (bucket {index})")

    def close(self) -> None:
        if self.group is None:
            return
        name = self.plan.group_name if self.plan else ""
        run_parallel(
            [
                (u, poster(u, "/destroy_weights_update_group", {"group_name": name}, 30.0))
                for u in self.urls
            ]
        )  # best effort: a dead engine has no group left to destroy
        _destroy(self.group)
        self.group = None


def _start_posts(
    calls: Sequence[tuple[str, Callable[[], Any]]], results: dict, errors: dict
) -> list[threading.Thread]:
    def run(key: str, fn: Callable[[], Any]) -> None:
        try:
            results[key] = fn()
        except BaseException as exc:
            errors[key] = exc

    threads = [threading.Thread(target=run, args=call, daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    return threads


def _join(threads: list[threading.Thread], timeout: float) -> None:
    for thread in threads:
        thread.join(timeout)


def _destroy(group: Any) -> None:
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        dist.destroy_process_group(group)
