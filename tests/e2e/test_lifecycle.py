"""Signals and deaths of a running `megatron-mel train` (megatron_mel/lifecycle.py, launch.py).

A background launcher that gets SIGTERM, a Ctrl-C to the terminal's process group, a second
signal, a worker killed mid-step (the OOM killer's SIGKILL) and a SIGKILLed launcher: each ends
the whole run as documented, and no process of it is left.
"""

from __future__ import annotations

import signal
import time

import pytest

from megatron_mel.lifecycle import EXIT_STOPPED
from tests.e2e.processes import QUICK, SLOW_STEPS, jsonl_steps, mlflow_runs, send, started

pytestmark = pytest.mark.slow
STEPS = [*SLOW_STEPS, "trainer.num_steps=50"]


def _assert_stopped_at_a_checkpoint(run, signal_name: str) -> None:
    assert run.proc.returncode == EXIT_STOPPED, run.stderr()[-3000:]
    stderr = run.stderr()
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    # The step in progress was finished and checkpointed, then the run stopped.
    latest = (run.run_dir / "checkpoints" / "latest").read_text().strip()
    last = jsonl_steps(run.run_dir)[-1]
    assert latest == f"step_{last:06d}" and last >= 2
    assert f"stopped by {signal_name} after step {last}" in stderr
    (mlflow_run,) = mlflow_runs(run.run_dir)
    assert mlflow_run.info.status == "KILLED"
    assert run.wait_gone(timeout=20) == []


def test_sigterm_to_a_background_launcher_stops_at_a_checkpoint(micro_policy, tmp_path):
    """`megatron-mel train ... &` then `kill PID`: the workers stop too, after a final save."""
    with started(tmp_path / "run", micro_policy, *STEPS) as run:
        run.wait_for_checkpoint(1)
        send(run.proc.pid, signal.SIGTERM)  # the launcher only, as `kill PID` does
        run.proc.wait(timeout=120)
        _assert_stopped_at_a_checkpoint(run, "SIGTERM")


def test_ctrl_c_stops_the_same_way_without_tracebacks(micro_policy, tmp_path):
    """A terminal's Ctrl-C reaches every process of the foreground group at once."""
    with started(tmp_path / "run", micro_policy, *STEPS, new_session=True) as run:
        run.wait_for_checkpoint(1)
        send(run.proc.pid, signal.SIGINT, group=True)
        run.proc.wait(timeout=120)
        _assert_stopped_at_a_checkpoint(run, "SIGINT")


def test_a_second_signal_exits_at_once(micro_policy, tmp_path):
    with started(tmp_path / "run", micro_policy, *STEPS) as run:
        run.wait_for_checkpoint(1)
        send(run.proc.pid, signal.SIGTERM)
        time.sleep(1.5)  # past the window in which a repeat counts as the same request
        send(run.proc.pid, signal.SIGTERM)
        run.proc.wait(timeout=60)
        assert run.proc.returncode == 128 + signal.SIGTERM, run.stderr()[-3000:]
        assert "SIGTERM again: exiting now without a final checkpoint" in run.stderr()
        assert "Traceback" not in run.stderr()
        # Step 2 was still scoring (>= 4 s): it was abandoned, not saved.
        assert (run.run_dir / "checkpoints" / "latest").read_text().strip() == "step_000001"
        (mlflow_run,) = mlflow_runs(run.run_dir)
        assert mlflow_run.info.status == "KILLED"
        assert run.wait_gone(timeout=20) == []


def test_a_worker_killed_mid_step_stops_every_rank(micro_policy, tmp_path):
    """The OOM killer's SIGKILL on rank 1 of 2: one line naming the rank and the signal, the run
    ends within 30 s, the driver marks MLflow FAILED, and nothing of the run is left."""
    with started(tmp_path / "run", micro_policy, *STEPS, "parallel.tp=2") as run:
        run.wait_for_checkpoint(1)
        before = run.processes()
        rank1 = run.workers()[1]
        killed_at = time.monotonic()
        rank1.kill()
        run.proc.wait(timeout=30)  # the criterion: the run exits within 30 s
        exited_after = time.monotonic() - killed_at
        left = run.wait_gone(timeout=10)
        print(f"worker SIGKILL: run exited after {exited_after:.1f} s; {len(before)} processes "
              f"before, {len(left)} left")  # fmt: skip
        assert run.proc.returncode == 1
        assert left == []
        (line,) = run.error_lines()
        assert f"rank 1 (pid {rank1.pid}) died from SIGKILL" in line
        assert "Traceback" not in run.stderr()
        (mlflow_run,) = mlflow_runs(run.run_dir)
        assert mlflow_run.info.status == "FAILED"


def test_sigkill_of_the_launcher_takes_its_workers(micro_policy, tmp_path):
    with started(tmp_path / "run", micro_policy, *QUICK, "trainer.num_steps=500") as run:
        run.wait_for_checkpoint(1)
        assert len(run.processes()) > 1
        run.proc.kill()
        run.proc.wait(timeout=10)
        assert run.wait_gone(timeout=30) == []
