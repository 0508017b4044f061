"""JSON over HTTP for the engine servers: one call with bounded waits, and calls in parallel.

Every request has a finite timeout: ``connect_timeout_s`` for the TCP connection (a dead host
fails in seconds) and ``timeout`` for each socket read after that (sized to the work: a
generation may take minutes, a health probe seconds). Failures become :class:`HttpError`;
``unreachable`` separates "no usable answer" (refused, reset, timed out, 5xx: the server may be
gone) from an answer that says no (4xx, ``success: false``).
"""

from __future__ import annotations

import http.client
import json
import socket
import threading
import urllib.parse
from collections.abc import Callable, Sequence
from typing import Any

from megatron_mel.rollout.engine import EngineError

DEFAULT_CONNECT_TIMEOUT_S = 10.0


class HttpError(Exception):
    """A failed call. ``unreachable``: no usable answer at all (refused, reset, timed out, 5xx)."""

    def __init__(self, url: str, status: int | None, detail: str, *, unreachable: bool) -> None:
        self.url, self.status, self.detail, self.unreachable = url, status, detail, unreachable
        where = f"HTTP {status}" if status is not None else "no response"
        super().__init__(f"{url}: {where}: {detail}")


def request_json(
    method: str,
    url: str,
    payload: Any = None,
    *,
    timeout: float,
    connect_timeout_s: float = DEFAULT_CONNECT_TIMEOUT_S,
) -> Any:
    """One JSON call; the decoded answer (None when empty, text when not JSON).

    Never goes through an ``http_proxy`` from the environment: the servers are on the cluster's
    own network (or loopback).
    """
    parts = urllib.parse.urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise HttpError(url, None, "not an http:// URL", unreachable=True)
    data = None if payload is None else json.dumps(payload).encode()
    headers = {"Content-Type": "application/json"} if data is not None else {}
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    conn = http.client.HTTPConnection(parts.hostname, parts.port or 80, timeout=connect_timeout_s)
    try:
        conn.connect()
        assert conn.sock is not None
        conn.sock.settimeout(timeout)
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        raw = response.read()
    except (OSError, http.client.HTTPException) as exc:
        kind = "timed out" if isinstance(exc, socket.timeout | TimeoutError) else type(exc).__name__
        raise HttpError(url, None, f"{kind}: {exc}", unreachable=True) from exc
    finally:
        conn.close()
    if response.status >= 400:
        body = raw[:2000].decode(errors="replace")
        raise HttpError(url, response.status, body, unreachable=response.status >= 500)
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


def poster(url: str, route: str, body: Any, timeout: float) -> Callable[[], Any]:
    """A thunk that POSTs ``body`` to ``url + route`` and checks ``success``."""

    def call() -> Any:
        answer = request_json("POST", url + route, body, timeout=timeout)
        check_success(url, answer)
        return answer

    return call


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
