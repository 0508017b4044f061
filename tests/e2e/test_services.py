"""Network services a run needs are probed before the model is built (megatron_mel/net/health.py):
an MLflow server or SGLang URL that does not answer ends the run in seconds, with one line naming
the URL and what did not answer, and nothing built or logged. (Servers that accept and never
answer are covered in tests/unit/test_health.py with short timeouts.)"""

from __future__ import annotations

import socket

import pytest

from tests.e2e.processes import QUICK, started


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


@pytest.mark.parametrize("service", ["mlflow", "sglang"])
def test_an_unreachable_service_stops_the_run_before_the_model_is_built(
    service, micro_policy, tmp_path
):
    url = _closed_port_url()
    if service == "mlflow":
        overrides, key = [f"tracking.tracking_uri={url}"], "tracking.tracking_uri: the MLflow"
    else:
        overrides = ["rollout.engine=sglang", f"rollout.server.urls=[{url}]"]
        key = "rollout.server.urls: the SGLang"
    with started(tmp_path / "run", micro_policy, *QUICK, *overrides) as run:
        run.proc.wait(timeout=120)
        assert run.proc.returncode == 2, run.stderr()[-3000:]
        (line,) = run.error_lines()
        assert line.startswith(f"error: {key} server at {url}/health refused the connection")
        assert "Traceback" not in run.stderr()
        # Refused before anything was built or logged: only the run directory's lock exists.
        assert sorted(p.name for p in run.run_dir.iterdir()) == [".lock"]
