"""SGLang rollout engine: N HTTP servers (launched here or given by URL) behind one router.

Generation. Each :class:`GenerationRequest` becomes one ``POST /generate`` with a batch of
``n`` copies of the prompt. The body carries ``input_ids`` (a list of ``n`` prompts),
``sampling_params`` (one dict per copy), ``rid`` (one per copy) and ``return_logprob: true``.
Copies are sent as a batch, not with SGLang's ``n``, so each copy can carry its own
``sampling_seed`` (``request_seed(seed, request id) + i``). SGLang applies that seed only under
``--enable-deterministic-inference`` (``deterministic=True``). Tokens and log-probs come from
``meta_info.output_token_logprobs`` (``[logprob, token_id, text]`` triples, checked against
``output_ids`` when present). The finish reason comes from ``meta_info.finish_reason.type``
(stop / length / abort).

Log-probs. By default SGLang returns ``log_softmax(logits / T)``: its sampler scales the logits
in place before taking logprobs. The contract needs the unscaled ``log_softmax(logits)``. SGLang
returns that when the server runs with the env var ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``, so
launched servers always get it. Servers given by URL must be started the same way
(``unscaled_logprobs`` asserts this). With ``unscaled_logprobs=False``, only temperatures 0 and
1 are accepted, because there the two quantities coincide. Stops: SGLang ends on
``stop_token_ids`` *and* on the model's own EOS ids. ``ignore_eos`` would switch off both, so it
is only set when ``stop_token_ids`` is empty.

Routing and failures. A request goes to the healthy server with the fewest requests in flight.
A server that refuses, resets, times out (``request_timeout_s``) or answers 5xx is marked
unhealthy. Its requests end up in :class:`EngineError`, which names the server URL(s) and the
lost request ids. Results that did complete are kept, and a retry of the same requests at the
same weight version returns them without generating again. At the start of every call,
unhealthy servers are probed (``/health_generate``). A server is taken back only if
``/get_weight_version`` shows the version the others serve, so a server that missed an update
never serves stale weights.

Control. ``/pause_generation`` is sent with ``{"mode": "abort"}``, which aborts anything in
flight so no request mixes two versions. ``/flush_cache`` is retried while it answers 400
(requests still pending). ``/continue_generation``,
``/release_memory_occupation`` and ``/resume_memory_occupation`` take ``tags``
(``weights``, ``kv_cache``; ``None`` = all). Colocated servers are launched with
``--enable-memory-saver``. Weights go through :mod:`megatron_mel.rollout.sglang_weights`.
``get_weights`` uses ``/get_weights_by_name``, which returns the first ``truncate_size`` rows of
a 2-D weight (first elements of a 1-D one) as float32, from TP rank 0. Verification therefore
compares that prefix.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import torch

from megatron_mel.config import RolloutConfig
from megatron_mel.rollout.engine import (
    Completion,
    EngineError,
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    WeightBucket,
    request_seed,
)
from megatron_mel.rollout.sglang_weights import (
    GPU_HINT,
    ColocatedTensorTransport,
    DistributedTransport,
    GPUBackendUnavailable,
    HttpError,
    raise_engine_errors,
    request_json,
    require_cuda,
    run_parallel,
)

ORIGINAL_LOGPROB_ENV = ("SGLANG_RETURN_ORIGINAL_LOGPROB", "RETURN_ORIGINAL_LOGPROB")


# -- pure request/response handling ----------------------------------------------------------


def build_generate_payload(request: GenerationRequest, rid_base: str) -> dict[str, Any]:
    """The exact ``/generate`` body for one request (``n`` copies as a batch)."""
    p = request.params
    copies = []
    for i in range(p.n):
        sp: dict[str, Any] = {
            "temperature": p.temperature,
            "top_p": p.top_p,
            "top_k": p.top_k,
            "max_new_tokens": p.max_new_tokens,
            "stop_token_ids": list(p.stop_token_ids),
            "ignore_eos": not p.stop_token_ids,
        }
        if p.seed is not None:
            sp["sampling_seed"] = request_seed(p.seed, request.request_id) + i
        copies.append(sp)
    return {
        "input_ids": [list(request.prompt_token_ids) for _ in range(p.n)],
        "sampling_params": copies,
        "rid": [f"{rid_base}/{i}" for i in range(p.n)],
        "return_logprob": True,
        "stream": False,
    }


def parse_generate_response(
    body: Any, n: int, version: int, expected_server_version: str | None = None
) -> list[Completion]:
    """``n`` completions from a ``/generate`` answer (a list for a batch, a dict for one)."""
    items = body if isinstance(body, list) else [body]
    if len(items) != n or not all(isinstance(item, dict) for item in items):
        raise ValueError(f"expected {n} generation outputs, got {str(body)[:200]}")
    completions = []
    for item in items:
        meta = item.get("meta_info") or {}
        pairs = meta.get("output_token_logprobs")
        if pairs is None:
            raise ValueError("answer has no meta_info.output_token_logprobs")
        if any(pair[0] is None for pair in pairs):
            raise ValueError("answer has a null log-prob")
        token_ids = [int(pair[1]) for pair in pairs]
        logprobs = [float(pair[0]) for pair in pairs]
        output_ids = item.get("output_ids")
        if output_ids is not None and [int(t) for t in output_ids] != token_ids:
            raise ValueError("output_ids disagree with output_token_logprobs")
        reason = meta.get("finish_reason")
        kind = reason.get("type") if isinstance(reason, dict) else reason
        if kind not in ("stop", "length", "abort"):
            raise ValueError(f"unknown finish_reason {reason!r}")
        served = meta.get("weight_version")
        expected = expected_server_version
        if expected is not None and isinstance(served, str) and served != expected:
            raise ValueError(f"served by weight version {served!r}, expected {expected!r}")
        completions.append(Completion(token_ids, logprobs, kind, version))
    return completions


def launch_command(
    model_path: str,
    *,
    host: str,
    port: int,
    tp: int,
    mem_fraction_static: float,
    colocate: bool,
    deterministic: bool = False,
    base_gpu_id: int = 0,
    seed: int = 1234,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """``python -m sglang.launch_server`` with the flags RL needs."""
    cmd = [
        sys.executable, "-m", "sglang.launch_server",
        "--model-path", str(model_path),
        "--tp-size", str(tp),
        "--mem-fraction-static", str(mem_fraction_static),
        "--host", host,
        "--port", str(port),
        "--base-gpu-id", str(base_gpu_id),
        "--random-seed", str(seed),
        "--skip-server-warmup",
    ]  # fmt: skip
    if colocate:
        cmd.append("--enable-memory-saver")  # release/resume_memory_occupation need it
    if deterministic:
        cmd.append("--enable-deterministic-inference")  # batch-invariant ops + sampling_seed
    return cmd + list(extra_args)


def launch_env(base: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ if base is None else base)
    for key in ORIGINAL_LOGPROB_ENV:
        env[key] = "1"
    # SGLang's memory saver does not work with expandable segments (slime drops these too).
    env.pop("PYTORCH_CUDA_ALLOC_CONF", None)
    env.pop("PYTORCH_ALLOC_CONF", None)
    return env


# -- routing ---------------------------------------------------------------------------------


class LeastOutstandingRouter:
    """Pick the healthy URL with the fewest requests in flight (ties: the earlier URL)."""

    def __init__(self, urls: Sequence[str]) -> None:
        self.urls = list(urls)
        self._outstanding = dict.fromkeys(self.urls, 0)
        self._unhealthy: dict[str, str] = {}
        self._lock = threading.Lock()

    def acquire(self) -> str | None:
        with self._lock:
            live = [u for u in self.urls if u not in self._unhealthy]
            if not live:
                return None
            url = min(live, key=lambda u: self._outstanding[u])
            self._outstanding[url] += 1
            return url

    def release(self, url: str) -> None:
        with self._lock:
            self._outstanding[url] -= 1

    def mark_unhealthy(self, url: str, reason: str) -> None:
        with self._lock:
            self._unhealthy[url] = reason

    def mark_healthy(self, url: str) -> None:
        with self._lock:
            self._unhealthy.pop(url, None)

    @property
    def healthy(self) -> list[str]:
        with self._lock:
            return [u for u in self.urls if u not in self._unhealthy]

    @property
    def unhealthy(self) -> dict[str, str]:
        with self._lock:
            return dict(self._unhealthy)


class _Lost(Exception):
    def __init__(self, url: str | None, detail: str) -> None:
        self.url, self.detail = url, detail
        super().__init__(detail)


# -- the engine ------------------------------------------------------------------------------


class SGLangEngine(RolloutEngine):
    """See the module docstring. ``rollout.sglang.urls`` set: connect; empty: launch servers."""

    def __init__(
        self,
        rollout: RolloutConfig,
        *,
        model_path: str | None = None,
        deterministic: bool = False,
        unscaled_logprobs: bool = True,
        base_gpu_id: int = 0,
        seed: int = 1234,
        extra_server_args: Sequence[str] = (),
        launch_timeout_s: float = 900.0,
        health_timeout_s: float = 30.0,
        control_timeout_s: float = 600.0,
        flush_timeout_s: float = 60.0,
        max_concurrency: int = 256,
        truncate_size: int = 100,
        weight_stage: int = 0,
        weight_backend: str = "nccl",
        master_address: str = "127.0.0.1",
        serializer: Any = None,
        log_dir: str | None = None,
        name: str = "sglang",
    ) -> None:
        super().__init__(name)
        cfg = rollout.sglang
        self.placement: Literal["colocate", "disaggregate"] = rollout.placement
        self.request_timeout_s = cfg.request_timeout_s
        self.health_timeout_s, self.control_timeout_s = health_timeout_s, control_timeout_s
        self.flush_timeout_s, self.max_concurrency = flush_timeout_s, max_concurrency
        self.truncate_size, self.unscaled_logprobs = truncate_size, unscaled_logprobs
        self.weight_stage, self.weight_backend = weight_stage, weight_backend
        self.master_address, self._serializer = master_address, serializer
        self._processes: list[subprocess.Popen] = []
        self._logs: list[Path] = []
        self._sender: DistributedTransport | None = None
        self._retry: dict[str, tuple[GenerationRequest, int, GenerationResult]] = {}
        self._nonce = 0
        if cfg.urls:
            urls = [u.rstrip("/") for u in cfg.urls]
            if rollout.temperature not in (0.0, 1.0):
                warnings.warn(
                    "SGLang servers given by URL must run with SGLANG_RETURN_ORIGINAL_LOGPROB=1, "
                    "or their log-probs are scaled by the sampling temperature",
                    stacklevel=2,
                )
        else:
            if model_path is None:
                raise ValueError("SGLangEngine needs model_path to launch servers (or sglang.urls)")
            require_cuda("SGLang rollout")
            if importlib.util.find_spec("sglang") is None:  # the servers import it, not us
                raise GPUBackendUnavailable(f"SGLang rollout {GPU_HINT} (sglang is not installed)")
            urls = self._launch(
                model_path, rollout, deterministic, base_gpu_id, seed, extra_server_args,
                launch_timeout_s, log_dir,
            )  # fmt: skip
        self.engine_tps = [cfg.engine_tp] * len(urls)
        self.router = LeastOutstandingRouter(urls)
        self._initial_versions = {u: self._server_version(u) for u in urls}

    @property
    def urls(self) -> list[str]:
        return self.router.urls

    # -- launching -------------------------------------------------------------------------

    def _launch(
        self, model_path, rollout, deterministic, base_gpu_id, seed, extra, timeout, log_dir
    ):
        cfg = rollout.sglang
        logs = Path(log_dir or tempfile.mkdtemp(prefix="mel-sglang-"))
        logs.mkdir(parents=True, exist_ok=True)
        urls = []
        try:
            for i in range(cfg.num_engines):
                port = cfg.base_port + i
                cmd = launch_command(
                    model_path,
                    host=cfg.host,
                    port=port,
                    tp=cfg.engine_tp,
                    mem_fraction_static=cfg.mem_fraction_static,
                    colocate=rollout.placement == "colocate",
                    deterministic=deterministic,
                    base_gpu_id=base_gpu_id + i * cfg.engine_tp,
                    seed=seed + i,
                    extra_args=extra,
                )
                log = logs / f"sglang-{i}.log"
                with open(log, "wb") as out:
                    proc = subprocess.Popen(
                        cmd, stdout=out, stderr=subprocess.STDOUT, env=launch_env(),
                        start_new_session=True,
                    )  # fmt: skip
                self._processes.append(proc)
                self._logs.append(log)
                urls.append(f"http://{cfg.host}:{port}")
            deadline = time.monotonic() + timeout
            for url, proc, log in zip(urls, self._processes, self._logs):
                self._wait_ready(url, proc, log, deadline)
        except BaseException:
            self._kill_processes()
            raise
        return urls

    def _wait_ready(self, url: str, proc: subprocess.Popen, log: Path, deadline: float) -> None:
        while True:
            if proc.poll() is not None:
                raise EngineError(url, f"server exited with {proc.returncode}: {_tail(log)}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise EngineError(url, f"not healthy before the launch timeout: {_tail(log)}")
            try:
                request_json("GET", url + "/health_generate", timeout=min(remaining, 30.0))
                return
            except HttpError:
                time.sleep(min(2.0, max(remaining, 0.0)))

    def _kill_processes(self) -> None:
        for proc in self._processes:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)  # its own session: server + schedulers
        for proc in self._processes:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        self._processes.clear()

    # -- generation ------------------------------------------------------------------------

    def _generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        if not self.unscaled_logprobs:
            scaled = [r.request_id for r in requests if r.params.temperature not in (0.0, 1.0)]
            if scaled:
                raise EngineError(
                    self.name,
                    "servers return temperature-scaled log-probs; start them with "
                    "SGLANG_RETURN_ORIGINAL_LOGPROB=1 or sample at temperature 0/1",
                    scaled,
                )
        self._probe_unhealthy()
        done, todo = [], []
        for request in requests:
            kept = self._retry.get(request.request_id)
            if kept and kept[0] == request and kept[1] == self._version:
                done.append(kept[2])
            else:
                todo.append(request)
        self._nonce += 1
        lost: dict[str | None, list[tuple[str, str]]] = {}
        if todo:
            workers = max(1, min(len(todo), self.max_concurrency))
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sglang") as pool:
                futures = [(r, pool.submit(self._generate_one, r, self._nonce)) for r in todo]
                for request, future in futures:
                    try:
                        result = future.result()
                    except _Lost as exc:
                        lost.setdefault(exc.url, []).append((request.request_id, exc.detail))
                        continue
                    self._retry[request.request_id] = (request, self._version, result)
                    done.append(result)
        if lost:
            ids = sorted(rid for items in lost.values() for rid, _ in items)
            servers = sorted(u for u in lost if u is not None) or [self.name]
            first = next(iter(lost.values()))[0][1]
            raise EngineError(
                ",".join(servers),
                f"{len(ids)} request(s) failed (first: {first}); "
                f"{len(done)} completed request(s) are kept for the retry",
                ids,
            )
        self._retry.clear()
        return done

    def _generate_one(self, request: GenerationRequest, nonce: int) -> GenerationResult:
        url = self.router.acquire()
        if url is None:
            raise _Lost(None, f"no healthy SGLang server: {self.router.unhealthy}")
        payload = build_generate_payload(request, f"{request.request_id}@{nonce}")
        try:
            body = request_json("POST", url + "/generate", payload, timeout=self.request_timeout_s)
            expected = str(self._version) if self._version > 0 else None
            completions = parse_generate_response(body, request.params.n, self._version, expected)
        except HttpError as exc:
            if exc.unreachable:
                self.router.mark_unhealthy(url, str(exc))
            raise _Lost(url, str(exc)) from exc
        except (ValueError, TypeError, KeyError, IndexError) as exc:
            raise _Lost(url, f"bad answer: {exc}") from exc
        finally:
            self.router.release(url)
        return GenerationResult(request.request_id, list(request.prompt_token_ids), completions)

    # -- health ----------------------------------------------------------------------------

    def _server_version(self, url: str) -> str | None:
        try:
            body = request_json("GET", url + "/get_weight_version", timeout=self.health_timeout_s)
        except HttpError:
            return None
        return body.get("weight_version") if isinstance(body, dict) else None

    def _expected_version(self, url: str) -> str | None:
        return str(self._version) if self._version > 0 else self._initial_versions.get(url)

    def _probe(self, url: str) -> None:
        request_json("GET", url + "/health_generate", timeout=self.health_timeout_s)

    def _probe_unhealthy(self) -> None:
        def readmit(url: str) -> None:
            self._probe(url)
            served, expected = self._server_version(url), self._expected_version(url)
            if served != expected:
                raise RuntimeError(f"serves weight version {served!r}, expected {expected!r}")
            self.router.mark_healthy(url)

        down = list(self.router.unhealthy)
        if down:
            _, errors = run_parallel([(u, lambda u=u: readmit(u)) for u in down])
            for url, exc in errors.items():
                self.router.mark_unhealthy(url, str(exc))

    def _health(self) -> str:
        def check(url: str) -> None:
            self._probe(url)
            self.router.mark_healthy(url)

        _, errors = run_parallel([(u, lambda u=u: check(u)) for u in self.urls])
        for url, exc in errors.items():
            self.router.mark_unhealthy(url, str(exc))
        healthy = len(self.router.healthy)
        if healthy == 0:
            raise RuntimeError(f"no healthy SGLang server: {self.router.unhealthy}")
        return f"{healthy}/{len(self.urls)} servers healthy"

    # -- control ---------------------------------------------------------------------------

    def _control(self, route: str, body: Any, what: str, method: str = "POST") -> None:
        def call(url: str) -> Any:
            return request_json(method, url + route, body, timeout=self.control_timeout_s)

        _, errors = run_parallel([(u, lambda u=u: call(u)) for u in self.router.healthy])
        for url, exc in errors.items():
            if isinstance(exc, HttpError) and exc.unreachable:
                self.router.mark_unhealthy(url, str(exc))
        raise_engine_errors(errors, what)

    def _pause(self) -> None:
        self._control("/pause_generation", {"mode": "abort"}, "pause_generation")

    def _resume(self) -> None:
        self._control("/continue_generation", {}, "continue_generation")

    def _flush(self) -> None:
        def flush(url: str) -> None:
            deadline = time.monotonic() + self.flush_timeout_s
            while True:  # 400 while requests are still queued or running
                try:
                    request_json("POST", url + "/flush_cache", timeout=self.control_timeout_s)
                    return
                except HttpError as exc:
                    if exc.unreachable or time.monotonic() > deadline:
                        raise
                    time.sleep(0.5)

        _, errors = run_parallel([(u, lambda u=u: flush(u)) for u in self.router.healthy])
        raise_engine_errors(errors, "flush_cache")

    def release_memory(self, tags: Sequence[str] | None = None) -> None:
        self._flush()
        body = {"tags": list(tags) if tags is not None else None}
        self._control("/release_memory_occupation", body, "release_memory_occupation")

    def resume_memory(self, tags: Sequence[str] | None = None) -> None:
        body = {"tags": list(tags) if tags is not None else None}
        self._control("/resume_memory_occupation", body, "resume_memory_occupation")

    # -- weights ---------------------------------------------------------------------------

    def weight_sender(self, stage: int | None = None, **kwargs: Any) -> DistributedTransport:
        """A disaggregated sender for one pipeline stage (module docstring of sglang_weights)."""
        return DistributedTransport(
            self.urls,
            self.engine_tps,
            stage=self.weight_stage if stage is None else stage,
            backend=kwargs.pop("backend", self.weight_backend),
            master_address=kwargs.pop("master_address", self.master_address),
            timeout_s=kwargs.pop("timeout_s", self.control_timeout_s),
            **kwargs,
        )

    def _update_weights(self, buckets: Iterable[WeightBucket], version: int) -> None:
        self._retry.clear()
        if self.placement == "colocate":
            healthy = self.router.healthy
            tps = [tp for u, tp in zip(self.urls, self.engine_tps) if u in healthy]
            if self._serializer is None:
                from megatron_mel.rollout.sglang_weights import sglang_serializer

                self._serializer = sglang_serializer()
            transport = ColocatedTensorTransport(
                healthy, tps, timeout_s=self.control_timeout_s, serializer=self._serializer
            )
            sent = self._send(transport, buckets, version)
        else:
            if self.router.unhealthy:
                raise EngineError(
                    ",".join(self.router.unhealthy),
                    "the NCCL weight group needs every server; restart the unhealthy ones",
                )
            if self._sender is None:
                self._sender = self.weight_sender()
            sent = self._send(self._sender, buckets, version)
        if sent == 0:  # stages sent their own buckets (or nothing changed): stamp the version
            self._flush()
            body = {"new_version": str(version), "abort_all_requests": False}
            self._control("/update_weight_version", body, "update_weight_version")

    def _send(self, transport: Any, buckets: Iterable[WeightBucket], version: int) -> int:
        """A server that failed mid-update holds a mix of weights: it leaves the rotation (and
        its version check keeps it out). Retry ``update_weights`` before ``resume``."""
        try:
            return transport.send(buckets, version)
        except EngineError as exc:
            for url in exc.engine.split(","):
                if url in self.urls:
                    self.router.mark_unhealthy(url, f"failed a weight update: {exc}")
            raise

    def get_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        healthy = self.router.healthy
        if not healthy:
            raise EngineError(self.name, f"no healthy SGLang server: {self.router.unhealthy}")
        url, out = healthy[0], {}
        for name in names:
            body = {"name": name, "truncate_size": self.truncate_size}
            try:
                value = request_json(
                    "POST", url + "/get_weights_by_name", body, timeout=self.control_timeout_s
                )
            except HttpError as exc:
                raise EngineError(url, f"get_weights_by_name({name!r}): {exc}") from exc
            if value is None:
                raise EngineError(url, f"get_weights_by_name({name!r}) returned nothing")
            out[name] = torch.tensor(value, dtype=torch.float32)
        return out

    def shutdown(self) -> None:
        if self._sender is not None:
            with contextlib.suppress(Exception):
                self._sender.close()
            self._sender = None
        self._kill_processes()


def _tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return f"(no log at {log})"
