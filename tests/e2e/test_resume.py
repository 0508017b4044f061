"""Kill a training run with SIGKILL after step 2 is checkpointed and start it again: it resumes
from that checkpoint (sampler, RNG, optimizer, meta-experience store, MLflow run) and step 3's
metrics equal those of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from tests.e2e.conftest import run_train, train_command, train_env

pytestmark = pytest.mark.slow
STEPS = ["trainer.num_steps=3", "trainer.eval_every=0"]
# Wall-clock measurements differ between runs by nature; everything else must match.
VOLATILE = ("time/", "sync/seconds", "sync/gb_per_s")


def _steps(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {m["step"]: m for m in map(json.loads, lines)}


def _kill_after_checkpoint(run_dir, policy, step: int) -> None:
    proc = subprocess.Popen(train_command(run_dir, policy, *STEPS), env=train_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)  # fmt: skip
    latest = run_dir / "checkpoints" / "latest"
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline:
            if latest.is_file() and latest.read_text().strip() == f"step_{step:06d}":
                break
            if proc.poll() is not None:
                raise AssertionError(f"run ended before step {step} was checkpointed")
            time.sleep(0.05)
        else:
            raise AssertionError("no checkpoint in time")
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers, mid-step
        proc.wait()


def test_sigkill_then_resume_matches_uninterrupted_run(micro_policy, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_train(straight, micro_policy, *STEPS)
    _kill_after_checkpoint(resumed, micro_policy, step=2)
    stdout = run_train(resumed, micro_policy, *STEPS)
    assert "step 3/3" in stdout and "step 1/3" not in stdout  # it did not start over

    want, got = _steps(straight), _steps(resumed)
    assert sorted(got) == [1, 2, 3]
    for key, value in want[3].items():
        if not key.startswith(VOLATILE):
            assert got[3][key] == value, key
    assert got[3]["train/loss"] != 0 and got[3]["train/grad_norm"] > 0

    def store(run_dir):
        return [
            json.loads(x) for x in (run_dir / "meta_experiences.jsonl").read_text().splitlines()
        ]

    assert store(resumed) == store(straight)  # no duplicate records from the killed step
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{resumed / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
    assert len(runs) == 1  # the resumed run re-attached to the same MLflow run
    history = client.get_metric_history(runs[0].info.run_id, "train/loss")
    assert {m.step for m in history} == {1, 2, 3}
