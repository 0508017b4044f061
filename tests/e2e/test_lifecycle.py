"""Signals and deaths of a running `megatron-mel train` (megatron_mel/lifecycle.py, launch.py).

A background launcher that gets SIGTERM, a Ctrl-C to the terminal's process group, a second
signal, a worker killed mid-step (the OOM killer's SIGKILL) and a SIGKILLed launcher: each ends
the whole run as documented, and no process of it is left. The five runs go side by side (their
steps mostly sleep in a slow reward), each test checks one of them.
"""

from __future__ import annotations

import signal
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import pytest

from megatron_mel.lifecycle import EXIT_STOPPED
from tests.e2e.processes import QUICK, SLOW_STEPS, Run, jsonl_steps, mlflow_runs, send, started

pytestmark = pytest.mark.slow
STEPS = [*SLOW_STEPS, "trainer.num_steps=50"]


@dataclass
class Outcome:
    run: Run
    stderr: str = ""
    left: list = field(default_factory=list)
    notes: dict = field(default_factory=dict)


def _sigterm_to_launcher(run: Run, out: Outcome) -> None:
    run.wait_for_checkpoint(1)
    send(run.proc.pid, signal.SIGTERM)  # the launcher only, as `kill PID` does
    run.proc.wait(timeout=180)


def _ctrl_c(run: Run, out: Outcome) -> None:
    run.wait_for_checkpoint(1)
    send(run.proc.pid, signal.SIGINT, group=True)  # a terminal's Ctrl-C: the whole group
    run.proc.wait(timeout=180)


def _twice(run: Run, out: Outcome) -> None:
    run.wait_for_checkpoint(1)
    send(run.proc.pid, signal.SIGTERM)
    time.sleep(1.5)  # past the window in which a repeat counts as the same request
    send(run.proc.pid, signal.SIGTERM)
    run.proc.wait(timeout=120)


def _kill_rank1(run: Run, out: Outcome) -> None:
    run.wait_for_checkpoint(1)
    out.notes["before"] = len(run.processes())
    rank1 = run.workers()[1]
    out.notes["pid"] = rank1.pid
    killed_at = time.monotonic()
    rank1.kill()
    run.proc.wait(timeout=30)  # the criterion: the run exits within 30 s
    out.notes["exited_after"] = time.monotonic() - killed_at


def _kill_launcher(run: Run, out: Outcome) -> None:
    run.wait_for_checkpoint(1)
    out.notes["before"] = len(run.processes())
    run.proc.kill()
    run.proc.wait(timeout=10)


SCENARIOS = {
    "sigterm": (_sigterm_to_launcher, STEPS, False),
    "ctrl_c": (_ctrl_c, STEPS, True),
    "twice": (_twice, STEPS, False),
    "kill_rank1": (_kill_rank1, [*STEPS, "parallel.tp=2"], False),
    "kill_launcher": (_kill_launcher, [*QUICK, "trainer.num_steps=500"], False),
}


@pytest.fixture(scope="module")
def outcomes(micro_policy, tmp_path_factory) -> dict[str, Outcome]:
    def play(name: str) -> Outcome:
        action, overrides, new_session = SCENARIOS[name]
        run_dir = tmp_path_factory.mktemp(name) / "run"
        with started(run_dir, micro_policy, *overrides, new_session=new_session) as run:
            out = Outcome(run)
            try:
                action(run, out)
            except Exception as exc:  # reported by this scenario's test, not the others'
                out.notes["error"] = f"{type(exc).__name__}: {exc}"
            out.left = run.wait_gone(timeout=30)
            out.stderr = run.stderr()
        return out

    with ThreadPoolExecutor(len(SCENARIOS)) as pool:
        futures = {name: pool.submit(play, name) for name in SCENARIOS}
        return {name: future.result() for name, future in futures.items()}


def _played(out: Outcome) -> Outcome:
    assert "error" not in out.notes, f"{out.notes['error']}\n{out.stderr[-3000:]}"
    return out


def _assert_stopped_at_a_checkpoint(out: Outcome, signal_name: str) -> None:
    run, stderr = _played(out).run, out.stderr
    assert run.proc.returncode == EXIT_STOPPED, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    # The step in progress was finished and checkpointed, then the run stopped.
    latest = (run.run_dir / "checkpoints" / "latest").read_text().strip()
    last = jsonl_steps(run.run_dir)[-1]
    assert latest == f"step_{last:06d}" and last >= 2
    assert f"stopped by {signal_name} after step {last}" in stderr
    (mlflow_run,) = mlflow_runs(run.run_dir)
    assert mlflow_run.info.status == "KILLED"
    assert out.left == []


def test_sigterm_to_a_background_launcher_stops_at_a_checkpoint(outcomes):
    """`megatron-mel train ... &` then `kill PID`: the workers stop too, after a final save."""
    _assert_stopped_at_a_checkpoint(outcomes["sigterm"], "SIGTERM")


def test_ctrl_c_stops_the_same_way_without_tracebacks(outcomes):
    """A terminal's Ctrl-C reaches every process of the foreground group at once."""
    _assert_stopped_at_a_checkpoint(outcomes["ctrl_c"], "SIGINT")


def test_a_second_signal_exits_at_once(outcomes):
    out = _played(outcomes["twice"])
    run, stderr = out.run, out.stderr
    assert run.proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "SIGTERM again: exiting now without a final checkpoint" in stderr
    assert "Traceback" not in stderr
    # Step 2 was still scoring (>= 4 s): it was abandoned, not saved.
    assert (run.run_dir / "checkpoints" / "latest").read_text().strip() == "step_000001"
    (mlflow_run,) = mlflow_runs(run.run_dir)
    assert mlflow_run.info.status == "KILLED"
    assert out.left == []


def test_a_worker_killed_mid_step_stops_every_rank(outcomes):
    """The OOM killer's SIGKILL on rank 1 of 2: one line naming the rank and the signal, the run
    ends within 30 s, the driver marks MLflow FAILED, and nothing of the run is left."""
    out = _played(outcomes["kill_rank1"])
    print(f"worker SIGKILL: run exited after {out.notes['exited_after']:.1f} s; "
          f"{out.notes['before']} processes before, {len(out.left)} left")  # fmt: skip
    assert out.run.proc.returncode == 1
    assert out.left == []
    (line,) = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert f"rank 1 (pid {out.notes['pid']}) died from SIGKILL" in line
    assert "Traceback" not in out.stderr
    (mlflow_run,) = mlflow_runs(out.run.run_dir)
    assert mlflow_run.info.status == "FAILED"


def test_sigkill_of_the_launcher_takes_its_workers(outcomes):
    out = _played(outcomes["kill_launcher"])
    assert out.notes["before"] > 1
    assert out.left == []
