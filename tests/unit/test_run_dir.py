"""The run-directory lock: one holder, named to whoever else tries, released by the kernel."""

from __future__ import annotations

import socket
import subprocess
import sys
import textwrap

import pytest

from megatron_mel.config import ConfigError
from megatron_mel.run_dir import RunDirLocked, check_run_dir, claim_run_dir
from tests.conftest import REPO

HOLD = textwrap.dedent("""
    import sys, time
    from megatron_mel.run_dir import claim_run_dir
    claim_run_dir(sys.argv[1])
    print("held", flush=True)
    time.sleep(600)
""")


def _holder(run_dir):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE,
                            text=True, cwd=REPO)  # fmt: skip
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_held_run_dir_is_refused_naming_the_holder(tmp_path):
    holder = _holder(tmp_path / "run")
    try:
        with pytest.raises(RunDirLocked) as info:
            claim_run_dir(tmp_path / "run")
        message = str(info.value)
        assert message.startswith(f"launch.run_dir: {tmp_path / 'run'} is in use by another run")
        assert f"pid {holder.pid} on host {socket.gethostname()}" in message
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the lock with its holder: no stale lock blocks a restart.
    claim_run_dir(tmp_path / "run")
    claim_run_dir(tmp_path / "run")  # idempotent in the holding process


def test_a_run_dir_that_is_a_file(tmp_path):
    (tmp_path / "run").write_text("x")
    with pytest.raises(ConfigError, match=r"launch.run_dir: .*run is a file, not a directory"):
        check_run_dir(tmp_path / "run")
    with pytest.raises(ConfigError, match=r"\(a parent of .*\) is a file"):
        check_run_dir(tmp_path / "run" / "sub")
