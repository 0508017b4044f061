"""The stop handler in ranks that torchrun started (megatron_mel/lifecycle.py)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

from tests.conftest import REPO


def test_ranks_under_torchrun_stop_together_on_sigterm():
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "parallel" / "workers" / "stop_agreement.py")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        ready = set()
        while len(ready) < 2:
            line = proc.stdout.readline()
            assert line, proc.stderr.read()[-3000:]
            ready |= set(re.findall(r"rank (\d) ready", line))
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)  # to torchrun only; it forwards to the ranks
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stops = dict(re.findall(r"rank (\d) stopped by SIGTERM after (\d+)", out))
    assert sorted(stops) == ["0", "1"], out + err[-3000:]
    assert stops["0"] == stops["1"]  # the same iteration on every rank
    assert "KeyboardInterrupt" not in err
