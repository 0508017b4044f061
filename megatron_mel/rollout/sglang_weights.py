"""Moving trainer weights into SGLang servers: HTTP plumbing and the two transports.

Both transports stream :class:`~megatron_mel.rollout.engine.WeightBucket` objects (HF-named
tensors of one dtype flattened into one 1-D buffer) and stamp the server's ``weight_version`` on
the last bucket only, so a server reports the new version once every bucket has landed.

* :class:`ColocatedTensorTransport` (engines share the trainer's GPUs): each bucket's flat buffer
  is shared by CUDA IPC. It calls ``POST /update_weights_from_tensor`` with
  ``load_format="flattened_bucket"`` and ``serialized_named_tensors`` = one base64 string per
  engine TP rank, each a ``MultiprocessingSerializer`` dump of
  ``{"flattened_tensor": flat, "metadata": [FlattenedTensorMetadata, ...]}``. SGLang's
  unpickler only accepts its own classes, so those two come from SGLang, imported on first use.
  CUDA IPC needs ``cudaMalloc`` memory: buckets must not come from an allocator running with
  ``expandable_segments:True``.
* :class:`DistributedTransport` (engines on their own GPUs): one NCCL group per trainer
  pipeline stage, ``mel-pp{stage}``. Rank 0 is the trainer process that owns the stage's
  tensors. Engine ``i`` takes ranks ``1 + sum(tp[:i])`` up to ``sum(tp[:i+1])``, because SGLang
  gives each TP rank ``rank_offset + tp_rank``. Setup posts ``/init_weights_update_group`` to
  every engine in URL order while the trainer joins the rendezvous, all with a finite timeout.
  After that, each bucket is one ``/update_weights_from_distributed`` request per engine (names,
  dtypes, shapes, group name, ``load_format="flattened_bucket"``) plus one broadcast of the flat
  buffer from rank 0. SGLang allocates the bucket with the same layout (``FlattenedTensorBucket``
  over the names/dtypes/shapes in order) and receives it in one broadcast. With
  ``load_format=None`` each tensor is broadcast on its own, which suits SGLang versions without
  bucketed receive.

Pipeline stages: each stage's source process drives its own ``DistributedTransport(stage=s)``.
The stages must not send at the same time, because two engines could block in different groups'
broadcasts. Pass ``lock`` (a cross-process lock) or run the stages one after another. The
driver then calls ``engine.update_weights([], version)``, which flushes the cache and stamps the
version through ``/update_weight_version``.
"""

from __future__ import annotations

import contextlib
import http.client
import inspect
import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch

from megatron_mel.rollout.engine import EngineError, WeightBucket

FLATTENED_BUCKET = "flattened_bucket"
GPU_HINT = "needs CUDA and `pip install -e .[gpu]`; on CPU use rollout.engine: embedded"


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


# -- HTTP ------------------------------------------------------------------------------------

# Loopback servers must never be reached through an http_proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class HttpError(Exception):
    """A failed call. ``unreachable``: no usable answer at all (refused, reset, timed out, 5xx)."""

    def __init__(self, url: str, status: int | None, detail: str, *, unreachable: bool) -> None:
        self.url, self.status, self.detail, self.unreachable = url, status, detail, unreachable
        where = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{url}: {where}: {detail}")


def request_json(method: str, url: str, payload: Any = None, *, timeout: float) -> Any:
    """One JSON call. ``timeout`` bounds each socket operation (connect, every read)."""
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as exc:
        body = exc.read()[:2000].decode(errors="replace")
        raise HttpError(url, exc.code, body, unreachable=exc.code >= 500) from exc
    except (urllib.error.URLError, http.client.HTTPException, OSError) as exc:
        raise HttpError(url, None, f"{type(exc).__name__}: {exc}", unreachable=True) from exc
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def check_success(url: str, body: Any) -> None:
    """Weight routes answer ``{"success": bool, "message": str}``; raise on ``success: false``."""
    if isinstance(body, dict) and body.get("success") is False:
        raise HttpError(url, 200, str(body.get("message", body)), unreachable=False)


def run_parallel(calls: Sequence[tuple[str, Callable[[], Any]]]) -> tuple[dict, dict]:
    """Run ``(key, fn)`` pairs in threads, started in order. Returns (results, errors) by key."""
    results: dict[str, Any] = {}
    errors: dict[str, BaseException] = {}

    def run(key: str, fn: Callable[[], Any]) -> None:
        try:
            results[key] = fn()
        except BaseException as exc:  # reported to the caller, never swallowed
            errors[key] = exc

    threads = [threading.Thread(target=run, args=call, daemon=True) for call in calls]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, errors


def raise_engine_errors(errors: dict[str, BaseException], what: str) -> None:
    if errors:
        detail = "; ".join(f"{url}: {exc}" for url, exc in sorted(errors.items()))
        raise EngineError(",".join(sorted(errors)), f"{what} failed: {detail}")


# -- pure payload builders -------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def bucket_metadata(bucket: WeightBucket) -> list[dict[str, Any]]:
    """Per-tensor layout of a bucket in SGLang's ``FlattenedTensorMetadata`` terms."""
    dtype = bucket.flat.dtype
    return [
        {
            "name": e.name,
            "shape": list(e.shape),
            "dtype": dtype,
            "start_idx": e.offset,
            "end_idx": e.offset + e.numel,
            "numel": e.numel,
        }
        for e in bucket.entries
    ]


def tensor_request(
    serialized: Sequence[str], *, flush_cache: bool, weight_version: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "serialized_named_tensors": list(serialized),
        "load_format": FLATTENED_BUCKET,
        "flush_cache": flush_cache,
    }
    if weight_version is not None:
        body["weight_version"] = weight_version
    return body


def distributed_request(
    bucket: WeightBucket,
    group_name: str,
    *,
    flush_cache: bool,
    weight_version: str | None,
    load_format: str | None,
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "names": [e.name for e in bucket.entries],
        "dtypes": [dtype_name(bucket.flat.dtype)] * len(bucket.entries),
        "shapes": [list(e.shape) for e in bucket.entries],
        "group_name": group_name,
        "flush_cache": flush_cache,
    }
    if load_format is not None:
        body["load_format"] = load_format
    if weight_version is not None:
        body["weight_version"] = weight_version
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


def iter_buckets(
    named: Iterable[tuple[str, torch.Tensor]], max_bytes: int
) -> Iterator[WeightBucket]:
    """Pack HF-named tensors into one-dtype buckets of at most ``max_bytes`` (a tensor larger
    than that gets a bucket of its own). Order is kept within each dtype."""
    if max_bytes < 1:
        raise ValueError("max_bytes must be >= 1")
    pending: dict[torch.dtype, list[tuple[str, torch.Tensor]]] = {}
    sizes: dict[torch.dtype, int] = {}
    for name, tensor in named:
        nbytes = tensor.numel() * tensor.element_size()
        group = pending.setdefault(tensor.dtype, [])
        if group and sizes[tensor.dtype] + nbytes > max_bytes:
            yield WeightBucket.from_tensors(group)
            group.clear()
            sizes[tensor.dtype] = 0
        group.append((name, tensor))
        sizes[tensor.dtype] = sizes.get(tensor.dtype, 0) + nbytes
    for group in pending.values():
        if group:
            yield WeightBucket.from_tensors(group)


def with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Yield ``(item, is_last)`` with one item of lookahead (buckets may be a generator)."""
    iterator = iter(items)
    try:
        current = next(iterator)
    except StopIteration:
        return
    for following in iterator:
        yield current, False
        current = following
    yield current, True


# -- process group for the disaggregated transport --------------------------------------------


def init_custom_process_group(
    *, backend: str, init_method: str, world_size: int, rank: int, group_name: str, timeout: float
) -> Any:
    """A torch process group outside the default one, created the way SGLang's engines create
    their side (TCP rendezvous, store prefixed by the group name, no default-group membership),
    so both ends agree on the store keys. Rank 0 hosts the TCP store."""
    from torch.distributed import distributed_c10d as c10d

    delta = timedelta(seconds=timeout)
    store, rank, world_size = next(c10d.rendezvous(init_method, rank, world_size, timeout=delta))
    store.set_timeout(delta)
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


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


# -- transports ------------------------------------------------------------------------------


def sglang_serializer() -> Callable[[WeightBucket], str]:
    """SGLang's own IPC payload for a CUDA bucket (imports SGLang; CUDA only)."""
    require_cuda("SGLang colocated weight sync")
    utils = import_or_explain("sglang.srt.utils", "SGLang colocated weight sync")
    try:
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorMetadata
    except ImportError:  # older SGLang kept it in the model runner
        from sglang.srt.model_executor.model_runner import FlattenedTensorMetadata
    try:
        from sglang.srt.utils.patch_torch import monkey_patch_torch_reductions
    except ImportError:
        from sglang.srt.patch_torch import monkey_patch_torch_reductions
    monkey_patch_torch_reductions()  # IPC handles name devices by UUID, not visible index

    def serialize(bucket: WeightBucket) -> str:
        if not bucket.flat.is_cuda:
            raise ValueError("colocated weight sync shares CUDA memory; got a CPU bucket")
        metadata = [
            FlattenedTensorMetadata(**{**m, "shape": torch.Size(m["shape"])})
            for m in bucket_metadata(bucket)
        ]
        payload = {"flattened_tensor": bucket.flat, "metadata": metadata}
        return utils.MultiprocessingSerializer.serialize(payload, output_str=True)

    return serialize


class ColocatedTensorTransport:
    """``/update_weights_from_tensor`` with CUDA IPC handles to the trainer's buckets."""

    def __init__(
        self,
        urls: Sequence[str],
        engine_tps: Sequence[int],
        *,
        timeout_s: float,
        serializer: Callable[[WeightBucket], str] | None = None,
    ) -> None:
        self.urls, self.engine_tps, self.timeout_s = list(urls), list(engine_tps), timeout_s
        self._serialize = serializer or sglang_serializer()

    def requests_for(
        self, bucket: WeightBucket, *, last: bool, version: int
    ) -> list[tuple[str, dict]]:
        out = []
        for url, tp in zip(self.urls, self.engine_tps):
            # One dump per TP rank: each rank opens (and later releases) its own handle.
            serialized = [self._serialize(bucket) for _ in range(tp)]
            body = tensor_request(
                serialized, flush_cache=last, weight_version=str(version) if last else None
            )
            out.append((url, body))
        return out

    def send(self, buckets: Iterable[WeightBucket], version: int) -> int:
        keep: list[WeightBucket] = []  # IPC handles point here until every engine has copied
        count = 0
        for bucket, last in with_last(buckets):
            keep.append(bucket)
            if bucket.flat.is_cuda:
                torch.cuda.synchronize(bucket.flat.device)
            calls = [
                (url, _poster(url, "/update_weights_from_tensor", body, self.timeout_s))
                for url, body in self.requests_for(bucket, last=last, version=version)
            ]
            _, errors = run_parallel(calls)
            raise_engine_errors(errors, f"update_weights_from_tensor (bucket {count})")
            count += 1
        if keep and torch.cuda.is_available():
            torch.cuda.ipc_collect()
        return count


class DistributedTransport:
    """NCCL (or gloo, for CPU tests) broadcast from this process, rank 0 of ``mel-pp{stage}``."""

    def __init__(
        self,
        urls: Sequence[str],
        engine_tps: Sequence[int],
        *,
        stage: int = 0,
        backend: str = "nccl",
        master_address: str = "127.0.0.1",
        master_port: int | None = None,
        timeout_s: float = 600.0,
        init_timeout_s: float = 300.0,
        load_format: str | None = FLATTENED_BUCKET,
        lock: contextlib.AbstractContextManager | None = None,
    ) -> None:
        self.urls, self.engine_tps, self.stage = list(urls), list(engine_tps), stage
        self.backend, self.master_address = backend, master_address
        self.master_port = master_port
        self.timeout_s, self.init_timeout_s = timeout_s, init_timeout_s
        self.load_format, self.lock = load_format, lock
        self.group: Any = None
        self.plan: GroupPlan | None = None

    def connect(self) -> GroupPlan:
        """Create the group once: engines are told in URL order, then the trainer joins."""
        if self.group is not None:
            return self.plan  # type: ignore[return-value]
        if self.backend == "nccl":
            require_cuda("SGLang NCCL weight sync")
        port = self.master_port or free_port(self.master_address)
        plan = plan_weight_group(
            self.urls,
            self.engine_tps,
            stage=self.stage,
            master_address=self.master_address,
            master_port=port,
            backend=self.backend,
        )
        results: dict[str, Any] = {}
        errors: dict[str, BaseException] = {}
        threads = []
        for url, body in plan.requests:  # deterministic order: engine 0 first
            fn = _poster(url, "/init_weights_update_group", body, self.init_timeout_s)
            thread = threading.Thread(
                target=_store_result, args=(url, fn, results, errors), daemon=True
            )
            thread.start()
            threads.append(thread)
        try:
            group = init_custom_process_group(
                backend=self.backend,
                init_method=f"tcp://{self.master_address}:{port}",
                world_size=plan.world_size,
                rank=0,
                group_name=plan.group_name,
                timeout=self.init_timeout_s,
            )
        except Exception as exc:
            for thread in threads:
                thread.join(self.init_timeout_s)
            silent = [u for u, _ in plan.requests if u not in results]
            raise EngineError(
                ",".join(silent) or ",".join(self.urls),
                f"weight group {plan.group_name} did not form within {self.init_timeout_s}s: "
                f"{exc}; engine errors: {errors or 'none'}",
            ) from exc
        for thread in threads:
            thread.join(self.init_timeout_s)
        hung = [u for u, _ in plan.requests if u not in results and u not in errors]
        for url in hung:
            errors[url] = TimeoutError(f"no answer within {self.init_timeout_s}s")
        if errors:
            _destroy(group)
            raise_engine_errors(errors, f"init_weights_update_group {plan.group_name}")
        self.group, self.plan = group, plan
        return plan

    def send(self, buckets: Iterable[WeightBucket], version: int | None) -> int:
        """Broadcast every bucket; ``version`` (if any) is stamped with the last one."""
        plan = self.connect()
        count = 0
        for bucket, last in with_last(buckets):
            stamp = str(version) if (last and version is not None) else None
            body = distributed_request(
                bucket,
                plan.group_name,
                flush_cache=last,
                weight_version=stamp,
                load_format=self.load_format,
            )
            with self.lock or contextlib.nullcontext():
                self._send_one(bucket, body, count)
            count += 1
        return count

    def _send_one(self, bucket: WeightBucket, body: dict, index: int) -> None:
        import torch.distributed as dist

        calls = [
            (url, _poster(url, "/update_weights_from_distributed", body, self.timeout_s))
            for url in self.urls
        ]
        results: dict[str, Any] = {}
        errors: dict[str, BaseException] = {}
        threads = [
            threading.Thread(target=_store_result, args=(u, fn, results, errors), daemon=True)
            for u, fn in calls
        ]
        for thread in threads:
            thread.start()
        if self.load_format == FLATTENED_BUCKET:
            dist.broadcast(bucket.flat, src=0, group=self.group)
        else:
            for _, view in bucket.tensors():
                dist.broadcast(view, src=0, group=self.group)
        for thread in threads:
            thread.join(self.timeout_s)
        for url in self.urls:
            if url not in results and url not in errors:
                errors[url] = TimeoutError(f"no answer within {self.timeout_s}s")
        raise_engine_errors(errors, f"update_weights_from_distributed (bucket {index})")

    def close(self) -> None:
        if self.group is None:
            return
        name = self.plan.group_name if self.plan else ""
        calls = [
            (u, _poster(u, "/destroy_weights_update_group", {"group_name": name}, 30.0))
            for u in self.urls
        ]
        run_parallel(calls)  # best effort: a dead engine has no group left to destroy
        _destroy(self.group)
        self.group = None


def _poster(url: str, route: str, body: dict, timeout: float) -> Callable[[], Any]:
    def call() -> Any:
        answer = request_json("POST", url + route, body, timeout=timeout)
        check_success(url, answer)
        return answer

    return call


def _store_result(key: str, fn: Callable[[], Any], results: dict, errors: dict) -> None:
    try:
        results[key] = fn()
    except BaseException as exc:
        errors[key] = exc


def _destroy(group: Any) -> None:
    import torch.distributed as dist

    with contextlib.suppress(Exception):
        dist.destroy_process_group(group)
