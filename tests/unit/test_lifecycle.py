"""The stop handler, signal forwarding, shielded helpers and parent death (lifecycle.py).

Signals are sent to small subprocesses, never to the pytest process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

from megatron_mel import lifecycle
from tests.conftest import REPO, pid_alive

RANK = textwrap.dedent("""
    import os, sys, time
    os.environ["RANK"] = "0"
    from megatron_mel import lifecycle
    lifecycle.install_rank_handlers()
    lifecycle.on_exit_now(lambda status: print("hook", status, flush=True))
    print("ready", flush=True)
    while lifecycle.stop_requested() is None:
        time.sleep(0.01)
    print("stop", lifecycle.stop_requested().reason, flush=True)
    r, w = os.pipe()
    os.read(r, 1)  # blocked in a system call, as in a collective
""")


def _start(script: str, *args: str) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", script, *args], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_first_signal_requests_a_stop_and_a_late_second_exits_at_once():
    proc = _start(RANK)
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline().strip() == "stop SIGINT"
    proc.send_signal(signal.SIGTERM)  # within the window: the same request, delivered twice
    time.sleep(lifecycle.DUPLICATE_WINDOW_S + 0.5)
    assert proc.poll() is None
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM
    assert out.strip() == "hook KILLED"
    assert "SIGTERM again: exiting now without a final checkpoint" in err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


FORWARDER = textwrap.dedent("""
    import subprocess, sys, time
    from megatron_mel import lifecycle
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1]])
    time.sleep(1.0)
    with lifecycle.SignalForwarder(lambda: [child.pid]) as fwd:
        print("ready", flush=True)
        code = child.wait()
    print("child", code, "first", fwd.first, flush=True)
""")


def test_the_launcher_forwards_stop_signals_and_survives_them():
    proc = _start(FORWARDER, "import time; time.sleep(60)")
    proc.send_signal(signal.SIGUSR1)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0  # the launcher itself did not die of SIGUSR1
    assert out.strip() == f"child {-signal.SIGUSR1} first {int(signal.SIGUSR1)}"


SHIELD = textwrap.dedent("""
    import subprocess, sys
    from megatron_mel import lifecycle
    with lifecycle.shielded_children():
        helper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print(helper.pid, flush=True)
    print("ready", flush=True)
    helper.wait()
""")


def test_helpers_started_shielded_ignore_the_stop_signals():
    proc = subprocess.Popen([sys.executable, "-c", SHIELD], cwd=REPO, text=True,
                            stdout=subprocess.PIPE)  # fmt: skip
    helper = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "ready"
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
            os.kill(helper, sig)
        time.sleep(0.5)
        assert proc.poll() is None  # the helper is still running
    finally:
        os.kill(helper, signal.SIGKILL)
        proc.wait(timeout=30)


PARENT = textwrap.dedent("""
    import subprocess, sys
    child = subprocess.Popen([sys.executable, "-c", sys.argv[1], str(__import__("os").getpid())])
    print(child.pid, flush=True)
    print("ready", flush=True)
    child.wait()
""")
CHILD = textwrap.dedent("""
    import sys, time
    from megatron_mel import lifecycle
    lifecycle.install_rank_handlers(parent_pid=int(sys.argv[1]))
    time.sleep(60)
""")


def test_a_worker_dies_with_its_launcher():
    proc = subprocess.Popen([sys.executable, "-c", PARENT, CHILD], cwd=REPO, text=True,
                            stdout=subprocess.PIPE)  # fmt: skip
    child = int(proc.stdout.readline())
    assert proc.stdout.readline().strip() == "ready"
    time.sleep(1.0)  # the child has installed its handler
    proc.kill()
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline and pid_alive(child):
        time.sleep(0.1)
    assert not pid_alive(child)


def test_without_a_process_group_the_request_is_local():
    assert lifecycle.agree_to_stop() is lifecycle.stop_requested()


def test_jobs_without_safe_points_exit_on_the_first_signal():
    """Conversion and parity runs (graceful=False): Ctrl-C ends them at once, quietly."""
    proc = _start(RANK.replace("install_rank_handlers()", "install_rank_handlers(graceful=False)"))
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGINT
    assert out.strip() == "hook KILLED" and "SIGINT: exiting now" in err
    assert "Traceback" not in err
