"""Starting a `megatron-mel train` in the background and accounting for every process it made.

Each run is tagged with an environment variable that every descendant inherits, so a test can
list the run's processes wherever they were re-parented to, and kill whatever is left (on a
build without the supervision, workers outlive their launcher).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.e2e.conftest import train_command, train_env

TAG = "MEL_TEST_RUN_TAG"
# Tiny steps that last >= 4 s (4 checks of a 1 s reward on one worker): room to signal mid-step.
QUICK = ["algorithm.name=grpo", "rollout.prompts_per_step=2", "rollout.samples_per_prompt=2",
         "rollout.max_new_tokens=8", "trainer.eval_every=0", "checkpoint.keep_last=5"]  # fmt: skip
SLOW_STEPS = [*QUICK, "reward.function=tests.contracts.rewards:slow_even_length"]


@dataclass
class Run:
    proc: subprocess.Popen
    run_dir: Path
    tag: str
    out: Path
    err: Path

    def processes(self) -> list[psutil.Process]:
        """Every live process of this run (launcher, workers, their helpers, orphans)."""
        found = []
        for proc in psutil.process_iter():
            with contextlib.suppress(psutil.Error, OSError):
                if proc.environ().get(TAG) == self.tag and proc.status() != psutil.STATUS_ZOMBIE:
                    found.append(proc)
        return found

    def workers(self) -> list[psutil.Process]:
        """The launcher's spawned ranks, rank 0 first."""
        kids = psutil.Process(self.proc.pid).children()
        ranks = [k for k in kids if "spawn_main" in " ".join(k.cmdline())]
        return sorted(ranks, key=lambda k: k.create_time())

    def wait_for_checkpoint(self, step: int, timeout: float = 300) -> None:
        latest = self.run_dir / "checkpoints" / "latest"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if latest.read_text().strip() == f"step_{step:06d}":
                    return
            if self.proc.poll() is not None:
                raise AssertionError(f"run ended ({self.proc.returncode}) before step {step}:\n"
                                     f"{self.stderr()[-4000:]}")  # fmt: skip
            time.sleep(0.05)
        raise AssertionError(f"no checkpoint of step {step} within {timeout} s")

    def wait_gone(self, timeout: float) -> list[psutil.Process]:
        """Wait up to ``timeout`` s for every process of the run to end; return those left."""
        deadline = time.monotonic() + timeout
        left = self.processes()
        while left and time.monotonic() < deadline:
            time.sleep(0.2)
            left = self.processes()
        return left

    def stderr(self) -> str:
        return self.err.read_text(errors="replace")

    def stdout(self) -> str:
        return self.out.read_text(errors="replace")

    def error_lines(self) -> list[str]:
        return [line for line in self.stderr().splitlines() if line.startswith("error:")]


@contextlib.contextmanager
def started(
    run_dir: Path, policy: Path, *overrides: str, new_session: bool = False
) -> Iterator[Run]:
    """`megatron-mel train` in the background; on exit, anything of it still alive is killed."""
    tag = uuid.uuid4().hex
    out, err = run_dir.with_suffix(".out"), run_dir.with_suffix(".err")
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(train_command(run_dir, policy, *overrides),
                                env={**train_env(), TAG: tag}, stdout=stdout, stderr=stderr,
                                start_new_session=new_session)  # fmt: skip
    run = Run(proc, run_dir, tag, out, err)
    try:
        yield run
    finally:
        for leftover in run.processes():
            with contextlib.suppress(psutil.Error):
                leftover.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=30)


def mlflow_runs(run_dir: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    return [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]


def metric_steps(run_dir: Path, key: str = "train/loss") -> list[int]:
    """Steps at which MLflow holds ``key``, with repeats (one MLflow run expected)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    (run,) = mlflow_runs(run_dir)
    return sorted(m.step for m in client.get_metric_history(run.info.run_id, key))


def jsonl_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def send(pid: int, sig: signal.Signals, *, group: bool = False) -> None:
    (os.killpg if group else os.kill)(pid, sig)
