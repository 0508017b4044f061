"""``sbatch slurm/mel_tiny_cpu.sh`` on a real (local, one-node) Slurm: 2 tasks on gloo, the micro
policy, 3 steps, logging to an MLflow tracking server. The job is cancelled with ``scancel`` once
step 1 is checkpointed; a resubmission naming the same run directory resumes after the last
checkpoint the first job left, and the whole training is one MLflow run with every step once.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from tests.e2e.conftest import MICRO_OVERRIDES, train_env

pytestmark = pytest.mark.slow
STEPS = 3


def _sbatch(cluster, out, env_run_dir, policy, mlflow_uri) -> str:
    overrides = [*MICRO_OVERRIDES, f"model.hf_dir={policy}", f"trainer.num_steps={STEPS}",
                 "trainer.eval_every=0", "checkpoint.save_every=1", "checkpoint.keep_last=3"]  # fmt: skip
    args = [a for item in overrides for a in ("--set", item)]
    env = {**train_env(), **cluster.env, "MEL_RUN_DIR": str(env_run_dir),
           "MEL_PYTHON": sys.executable, "MLFLOW_TRACKING_URI": mlflow_uri,
           "MLFLOW_EXPERIMENT_NAME": "mel-slurm-e2e"}  # fmt: skip
    proc = subprocess.run(["sbatch", "--parsable", f"--output={out}", "slurm/mel_tiny_cpu.sh", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def _latest(run_dir) -> int:
    pointer = run_dir / "checkpoints" / "latest"
    return int(pointer.read_text().strip().removeprefix("step_")) if pointer.is_file() else 0


def test_sbatch_scancel_and_resubmit_resume_under_one_mlflow_run(
    slurm_cluster, mlflow_server, micro_policy, tmp_path
):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    first_log, second_log = tmp_path / "job1.out", tmp_path / "job2.out"
    job = _sbatch(slurm_cluster, first_log, run_dir, micro_policy, mlflow_server)
    deadline = time.monotonic() + 600
    while _latest(run_dir) < 1:
        state = slurm_cluster.job_state(job)
        assert state in ("PENDING", "RUNNING", "CONFIGURING"), (state, _read(first_log))
        assert time.monotonic() < deadline, _read(first_log)
        time.sleep(0.05)
    slurm_cluster.run("scancel", job)
    assert slurm_cluster.wait_done(job) == "CANCELLED"
    stopped_after = _latest(run_dir)
    assert 1 <= stopped_after < STEPS, _read(first_log)
    log = _read(first_log)
    assert "placement colocate: 1 training node(s) x 2 rank(s)" in log  # plan ran first
    assert "step 1/3" in log and "step 3/3" not in log

    resumed = _sbatch(slurm_cluster, second_log, run_dir, micro_policy, mlflow_server)
    assert slurm_cluster.wait_done(resumed) == "COMPLETED", _read(second_log)
    log = _read(second_log)
    assert f"step {stopped_after + 1}/3" in log and f"step {stopped_after}/3" not in log, log
    assert "step 3/3" in log

    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("mel-slurm-e2e")
    (run,) = client.search_runs([experiment.experiment_id])  # one run across both jobs
    assert run.info.status == "FINISHED"
    for key in ("train/loss", "sync/weight_version"):
        steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, key))
        assert steps == [1, 2, 3], (key, steps)


def _read(path) -> str:
    return path.read_text(errors="replace")[-6000:] if path.is_file() else "(no job log yet)"
