"""SGLang rollout engine: the driver's client of N SGLang HTTP servers behind one router.

The servers are started per node by rollout/servers.py (or given by ``rollout.server.urls``);
this object only talks to them. Weights reach the servers from the training ranks through the
transports of rollout/sglang_sync.py; the engine opens the update (pause, flush,
``/begin_weight_update``) and commits it once (``/end_weight_update``, ``/update_weight_version``,
flush) after every bucket of every pipeline stage has landed.

Generation. Each :class:`GenerationRequest` becomes one ``POST /generate`` with a batch of
``n`` copies of the prompt. The body carries ``input_ids`` (a list of ``n`` prompts),
``sampling_params`` (one dict per copy), ``rid`` (one per copy) and ``return_logprob: true``.
Copies are sent as a batch, not with SGLang's ``n``, so each copy can carry its own
``sampling_seed`` (``request_seed(seed, request id) + i``). SGLang applies that seed only under
``--enable-deterministic-inference``. Tokens and log-probs come from
``meta_info.output_token_logprobs`` (``[logprob, token_id, text]`` triples, checked against
``output_ids`` when present). The finish reason comes from ``meta_info.finish_reason.type``
(stop / length / abort).

Log-probs. By default SGLang returns ``log_softmax(logits / T)``. The contract needs the
unscaled ``log_softmax(logits)``, which SGLang returns under ``SGLANG_RETURN_ORIGINAL_LOGPROB=1``
(launched servers always get it). With ``unscaled_logprobs=False`` only temperatures 0 and 1 are
accepted, where the two coincide. Stops: SGLang ends on ``stop_token_ids`` *and* on the model's
own EOS ids; ``ignore_eos`` would switch off both, so it is only set without stop tokens.

Routing and failures. A request goes to the healthy server with the fewest requests in flight.
A server that refuses, resets, times out or answers 5xx is marked unhealthy; its requests end in
:class:`EngineError` naming the server URL(s) and the lost request ids. Completed results are
kept, and a retry at the same weight version returns them without generating again. Unhealthy
servers are probed at the start of every call and taken back only if ``/model_info`` shows the
version the others serve (a server that missed an update never serves stale weights).

Versions of the HTTP API (read in SGLang 0.5.6 and 0.5.21): ``/model_info`` carries
``weight_version`` (``/get_weight_version`` answers 404 from 0.5.8 and is gone in 0.5.21, so it
is only a fallback); the ``/begin_weight_update`` session exists from 0.5.21 (a 404 means an
older server without sessions). Memory tags: ours are "weights" and "kv_cache"; SGLang's KV
cache release goes with its CUDA graphs ("cuda_graph"), and a resume must name exactly what
was released. ``/get_weights_by_name`` returns the first ``truncate_size`` rows of a 2-D weight
(first elements of a 1-D one) as float32 from TP rank 0; verification compares that prefix.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

import torch

from megatron_mel.config import RolloutConfig
from megatron_mel.net.health import backoff_delays
from megatron_mel.rollout.engine import (
    Completion,
    EngineError,
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    request_seed,
)
from megatron_mel.rollout.http import HttpError, raise_engine_errors, request_json, run_parallel

SGLANG_TAGS = {"weights": ["weights"], "kv_cache": ["kv_cache", "cuda_graph"]}


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


def sglang_tags(tags: Sequence[str]) -> list[str]:
    return [t for tag in tags for t in SGLANG_TAGS[tag]]


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
    """See the module docstring. Connects to ``urls``; never starts or stops a server."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        engine_tps: Sequence[int] | None = None,
        placement: Literal["colocate", "disaggregate"] = "colocate",
        request_timeout_s: float = 600.0,
        unscaled_logprobs: bool = True,
        health_timeout_s: float = 30.0,
        control_timeout_s: float = 600.0,
        flush_timeout_s: float = 60.0,
        max_concurrency: int = 256,
        truncate_size: int = 100,
        name: str = "sglang",
    ) -> None:
        super().__init__(name)
        if not urls:
            raise ValueError("SGLangEngine needs at least one server URL")
        urls = [u.rstrip("/") for u in urls]
        self.engine_tps = list(engine_tps or [1] * len(urls))
        if len(self.engine_tps) != len(urls):
            raise ValueError("one TP size per server URL")
        self.placement = placement
        self.request_timeout_s, self.unscaled_logprobs = request_timeout_s, unscaled_logprobs
        self.health_timeout_s, self.control_timeout_s = health_timeout_s, control_timeout_s
        self.flush_timeout_s, self.max_concurrency = flush_timeout_s, max_concurrency
        self.truncate_size = truncate_size
        self.router = LeastOutstandingRouter(urls)
        self._retry: dict[str, tuple[GenerationRequest, int, GenerationResult]] = {}
        self._nonce = 0
        self._sessions: dict[str, bool] = {}  # url -> a /begin_weight_update session is open
        self._initial_versions = {u: self._server_version(u) for u in urls}

    @classmethod
    def from_config(
        cls, rollout: RolloutConfig, urls: Sequence[str], engine_tps: Sequence[int]
    ) -> SGLangEngine:
        """The client of servers this run launched (their log-probs are unscaled)."""
        return cls(urls, engine_tps=engine_tps, placement=rollout.placement,
                   request_timeout_s=rollout.server.request_timeout_s)  # fmt: skip

    @classmethod
    def connect(cls, rollout: RolloutConfig) -> SGLangEngine:
        """The client of servers given by ``rollout.server.urls`` (started by someone else)."""
        if rollout.temperature not in (0.0, 1.0):
            warnings.warn(
                "SGLang servers given by URL must run with SGLANG_RETURN_ORIGINAL_LOGPROB=1, "
                "or their log-probs are scaled by the sampling temperature",
                stacklevel=2,
            )
        urls = rollout.server.urls
        return cls(urls, engine_tps=[rollout.server.engine_tp] * len(urls),
                   placement=rollout.placement,
                   request_timeout_s=rollout.server.request_timeout_s)  # fmt: skip

    @property
    def urls(self) -> list[str]:
        return self.router.urls

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
        """``weight_version`` from ``/model_info`` (``/get_weight_version`` before 0.5.6)."""
        for route in ("/model_info", "/get_weight_version"):
            try:
                body = request_json("GET", url + route, timeout=self.health_timeout_s)
            except HttpError as exc:
                if exc.status == 404:
                    continue
                return None
            if isinstance(body, dict) and "weight_version" in body:
                version = body["weight_version"]
                return None if version is None else str(version)
        return None

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

    def _control(self, route: str, body: Any, what: str, urls: Sequence[str] | None = None) -> dict:
        def call(url: str) -> Any:
            return request_json("POST", url + route, body, timeout=self.control_timeout_s)

        results, errors = run_parallel(
            [(u, lambda u=u: call(u)) for u in urls or self.router.healthy]
        )
        for url, exc in errors.items():
            if isinstance(exc, HttpError) and exc.unreachable:
                self.router.mark_unhealthy(url, str(exc))
        raise_engine_errors(errors, what)
        return results

    def _pause(self) -> None:
        self._control("/pause_generation", {"mode": "abort"}, "pause_generation")

    def _resume(self) -> None:
        self._control("/continue_generation", {}, "continue_generation")

    def _flush(self) -> None:
        def flush(url: str) -> None:
            deadline = time.monotonic() + self.flush_timeout_s
            delays = backoff_delays(first_s=0.25, max_s=4.0)
            while True:  # 400 while requests are still queued or running
                try:
                    request_json("POST", url + "/flush_cache", timeout=self.control_timeout_s)
                    return
                except HttpError as exc:
                    if exc.unreachable or time.monotonic() > deadline:
                        raise
                    time.sleep(next(delays))

        _, errors = run_parallel([(u, lambda u=u: flush(u)) for u in self.router.healthy])
        raise_engine_errors(errors, "flush_cache")

    def _release_memory(self, tags: tuple[str, ...]) -> int:
        self._flush()  # release asserts an idle server
        self._control("/release_memory_occupation", {"tags": sglang_tags(tags)},
                      "release_memory_occupation")  # fmt: skip
        return 0  # SGLang does not report the size it freed

    def _resume_memory(self, tags: tuple[str, ...]) -> None:
        self._control("/resume_memory_occupation", {"tags": sglang_tags(tags)},
                      "resume_memory_occupation")  # fmt: skip

    # -- weights ---------------------------------------------------------------------------

    def _begin_weight_update(self) -> None:
        """Open a weight-update session on every server that has them (SGLang >= 0.5.21)."""
        self._retry.clear()
        if self.router.unhealthy and self.placement == "disaggregate":
            raise EngineError(
                ",".join(self.router.unhealthy),
                "the NCCL weight group needs every server; restart the unhealthy ones",
            )

        def begin(url: str) -> bool:
            try:
                answer = request_json("POST", url + "/begin_weight_update", {"selector": "all"},
                                      timeout=self.control_timeout_s)  # fmt: skip
            except HttpError as exc:
                if exc.status == 404:
                    return False  # before 0.5.21: no sessions
                raise
            if isinstance(answer, dict) and answer.get("success") is False:
                raise HttpError(url, 200, str(answer.get("message")), unreachable=False)
            return True

        results, errors = run_parallel([(u, lambda u=u: begin(u)) for u in self.router.healthy])
        self._sessions = results
        self._fail_servers(errors, "begin_weight_update")

    def _commit_weights(self, version: int) -> None:
        open_sessions = [u for u, opened in self._sessions.items() if opened]
        self._sessions = {}
        if open_sessions:
            _, errors = run_parallel(
                [(u, lambda u=u: request_json("POST", u + "/end_weight_update", {},
                                              timeout=self.control_timeout_s))
                 for u in open_sessions]
            )  # fmt: skip
            self._fail_servers(errors, "end_weight_update")
        self._flush()
        body = {"new_version": str(version), "abort_all_requests": False}
        self._control("/update_weight_version", body, "update_weight_version")

    def fail_update(self, urls: Sequence[str], reason: str) -> None:
        """Servers that failed mid-update hold a mix of weights: out of the rotation (their
        version check keeps them out until a complete update)."""
        for url in urls:
            if url in self.urls:
                self.router.mark_unhealthy(url, f"failed a weight update: {reason}")

    def _fail_servers(self, errors: dict[str, BaseException], what: str) -> None:
        if errors:
            self.fail_update(list(errors), what)
            raise_engine_errors(errors, what)

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
