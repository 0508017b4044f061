"""Health probes: bounded waits, backoff, and one line naming the URL and what did not answer."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice
from types import SimpleNamespace

import pytest

from megatron_mel.net import health
from megatron_mel.net.health import Backoff, ServiceUnavailable, backoff_delays, probe

QUICK = Backoff(retries=2, first_s=0.01, max_s=0.02)


@contextmanager
def silent_server() -> Iterator[str]:
    """Accepts connections and never answers (a wedged server)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


@contextmanager
def http_server(status: int) -> Iterator[str]:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


def test_a_closed_port_is_refused_after_bounded_retries():
    url = closed_port_url()
    with pytest.raises(ServiceUnavailable) as info:
        probe(f"{url}/health", what="the MLflow server", backoff=QUICK)
    assert str(info.value).startswith(f"the MLflow server at {url}/health refused the connection")
    assert "(3 attempts)" in str(info.value)


def test_a_server_that_never_answers_is_given_up_on_after_the_read_timeout():
    with silent_server() as url:
        start = time.monotonic()
        with pytest.raises(ServiceUnavailable) as info:
            probe(url, read_timeout_s=0.2, backoff=QUICK)
        elapsed = time.monotonic() - start
    assert "accepted the connection but sent no answer within 0.2 s (3 attempts)" in str(info.value)
    assert elapsed < 30  # bounded: 3 x 0.2 s plus backoff, not the 600 s of a request timeout


def test_a_5xx_answer_is_retried_then_reported():
    with http_server(503) as url, pytest.raises(ServiceUnavailable, match=r"answered HTTP 503"):
        probe(url, backoff=QUICK)


def test_any_answer_below_500_means_the_server_is_there():
    with http_server(404) as url:
        assert probe(url, backoff=QUICK) == 404


def test_backoff_grows_and_is_capped():
    assert list(islice(backoff_delays(1.0, 2.0, 5.0), 5)) == [1.0, 2.0, 4.0, 5.0, 5.0]


def _cfg(**sections):
    tracking = SimpleNamespace(backend="mlflow", tracking_uri="")
    rollout = SimpleNamespace(engine="embedded", server=SimpleNamespace(urls=[]))
    return SimpleNamespace(**{"tracking": tracking, "rollout": rollout, **sections})


def test_check_services_probes_what_the_run_uses(monkeypatch):
    asked = []
    monkeypatch.setattr(health, "probe", lambda url, what, **kw: asked.append((url, what)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.lab:5000/")
    sglang = SimpleNamespace(engine="sglang", server=SimpleNamespace(urls=["http://n1:30000"]))
    health.check_services(_cfg(rollout=sglang))
    assert asked == [
        ("http://mlflow.lab:5000/health", "MLFLOW_TRACKING_URI: the MLflow server"),
        ("http://n1:30000/health", "rollout.server.urls: the SGLang server"),
    ]
    asked.clear()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///runs/x/mlflow.db")
    health.check_services(_cfg())
    assert asked == []  # a local store has nothing to probe
