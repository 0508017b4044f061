"""Bounded waits on the network services a run depends on: health probes and backoff.

:func:`probe` asks a URL for an answer with a connect timeout of seconds and a separate read
timeout sized to the request, retries a bounded number of times with exponential backoff, and
raises :class:`ServiceUnavailable`, one line naming the URL and what did not answer (refused the
connection, did not accept it in time, accepted it and said nothing, answered 5xx).

:func:`check_services` runs before the model is built (the training loop calls it on the driver
rank) for the services a run is configured with:

* the MLflow tracking server, when the tracking URI is http(s): ``GET <uri>/health``;
* SGLang servers given by ``rollout.server.urls``: ``GET <url>/health`` (cheap; the engine's own
  ``/health_generate`` probe runs a forward pass and gets a longer read timeout).

:func:`backoff_delays` is the schedule every retry loop of the project sleeps by.
"""

from __future__ import annotations

import http.client
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from megatron_mel.config import ConfigError

CONNECT_TIMEOUT_S = 5.0
HEALTH_READ_TIMEOUT_S = 10.0


class ServiceUnavailable(ConfigError):
    """A network service did not answer; the message names the URL and what failed."""


@dataclass(frozen=True, slots=True)
class Backoff:
    """``retries`` more attempts after the first, sleeping first_s, first_s*factor, ... (<= max_s)."""

    retries: int = 2
    first_s: float = 1.0
    factor: float = 2.0
    max_s: float = 10.0


def backoff_delays(
    first_s: float = 1.0, factor: float = 2.0, max_s: float = 10.0
) -> Iterator[float]:
    """Endless exponential delays: first_s, first_s*factor, ... capped at max_s."""
    delay = first_s
    while True:
        yield min(delay, max_s)
        delay *= factor


def probe(
    url: str,
    *,
    what: str = "service",
    connect_timeout_s: float = CONNECT_TIMEOUT_S,
    read_timeout_s: float = HEALTH_READ_TIMEOUT_S,
    backoff: Backoff = Backoff(),
) -> int:
    """``GET url`` until it answers below HTTP 500; return the status, else ServiceUnavailable.

    Any answer below 500 (even 401 or 404) proves a server is there and responding, which is
    all a health probe can promise; the caller's real requests report their own HTTP errors.
    """
    delays = backoff_delays(backoff.first_s, backoff.factor, backoff.max_s)
    failure = ""
    for attempt in range(backoff.retries + 1):
        if attempt:
            time.sleep(next(delays))
        try:
            return _get(url, connect_timeout_s, read_timeout_s)
        except _NoAnswer as exc:
            failure = str(exc)
    tries = backoff.retries + 1
    raise ServiceUnavailable(
        f"{what} at {url} {failure} ({tries} attempt{'s' if tries > 1 else ''}); check that it "
        "is running and reachable from this host"
    )


class _NoAnswer(Exception):
    pass


def _get(url: str, connect_timeout_s: float, read_timeout_s: float) -> int:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServiceUnavailable(f"{url}: not an http(s) URL")
    if urllib.request.getproxies() and not urllib.request.proxy_bypass(parts.hostname):
        return _get_via_proxy(url, max(connect_timeout_s, read_timeout_s))
    https = parts.scheme == "https"
    port = parts.port or (443 if https else 80)
    cls = http.client.HTTPSConnection if https else http.client.HTTPConnection
    conn: Any = cls(parts.hostname, port, timeout=connect_timeout_s)
    try:
        try:
            conn.connect()
        except TimeoutError:
            raise _NoAnswer(f"did not accept a connection within {connect_timeout_s:g} s") from None
        except OSError as exc:
            raise _NoAnswer(f"refused the connection ({exc.strerror or exc})") from None
        conn.sock.settimeout(read_timeout_s)
        target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        try:
            conn.request("GET", target)
            response = conn.getresponse()
            response.read()
        except TimeoutError:
            raise _NoAnswer(
                f"accepted the connection but sent no answer within {read_timeout_s:g} s"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise _NoAnswer(f"broke off the answer ({type(exc).__name__}: {exc})") from None
    finally:
        conn.close()
    if response.status >= 500:
        raise _NoAnswer(f"answered HTTP {response.status} {response.reason}")
    return int(response.status)


def _get_via_proxy(url: str, timeout_s: float) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        if exc.code >= 500:
            raise _NoAnswer(f"answered HTTP {exc.code} (through the proxy)") from None
        return int(exc.code)
    except (urllib.error.URLError, OSError) as exc:
        raise _NoAnswer(
            f"did not answer through the proxy within {timeout_s:g} s ({exc})"
        ) from None


def mlflow_http_uri(tracking_uri: str) -> str | None:
    """The MLflow server URL a run will talk to, or None for a local/sqlite/file store."""
    uri = tracking_uri or os.environ.get("MLFLOW_TRACKING_URI", "")
    return uri.rstrip("/") if uri.startswith(("http://", "https://")) else None


def check_services(cfg: Any) -> None:
    """Probe the services ``cfg`` (a RunConfig) needs; ServiceUnavailable names the first silent
    one. Called before the model is built, on the driver rank."""
    tracking = cfg.tracking
    mlflow = mlflow_http_uri(tracking.tracking_uri) if tracking.backend == "mlflow" else None
    if mlflow:
        key = "tracking.tracking_uri" if tracking.tracking_uri else "MLFLOW_TRACKING_URI"
        probe(f"{mlflow}/health", what=f"{key}: the MLflow server")
    if cfg.rollout.engine == "sglang":
        for url in cfg.rollout.server.urls:
            probe(f"{url.rstrip('/')}/health", what="rollout.server.urls: the SGLang server")
