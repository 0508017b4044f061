"""``sbatch slurm/mel_tiny_cpu.sh`` on a real (local, one-node) Slurm: 2 tasks on gloo, the micro
policy, 3 steps, logging to an MLflow tracking server.

* scancel once step 1 is checkpointed; a resubmission naming the same run directory resumes
  after the last checkpoint the first job left; the whole training is one MLflow run.
* SIGUSR1 to the batch shell (the time-limit warning): the job requeues itself and resumes.
* a recipe `megatron-mel plan` refuses stops the job before anything starts.
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


def _sbatch(
    cluster, out, env_run_dir, policy, mlflow_uri, experiment="mel-slurm-e2e", extra=()
) -> str:
    overrides = [*MICRO_OVERRIDES, f"model.hf_dir={policy}", f"trainer.num_steps={STEPS}",
                 "trainer.eval_every=0", "checkpoint.save_every=1", "checkpoint.keep_last=3"]  # fmt: skip
    args = [*(a for item in overrides for a in ("--set", item)), *extra]
    env = {**train_env(), **cluster.env, "MEL_RUN_DIR": str(env_run_dir),
           "MEL_PYTHON": sys.executable, "MLFLOW_TRACKING_URI": mlflow_uri,
           "MLFLOW_EXPERIMENT_NAME": experiment}  # fmt: skip
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


def test_sigusr1_before_the_time_limit_requeues_and_resumes(
    slurm_cluster, mlflow_server, micro_policy, tmp_path
):
    """What ``#SBATCH --signal=B:USR1@N`` does near the limit, sent by hand: the batch shell
    passes it on, the trainer stops, the launcher requeues the job, and the same job (same id,
    run directory and MLflow run) resumes from the newest checkpoint and finishes."""
    from mlflow.tracking import MlflowClient

    run_dir, out = tmp_path / "run", tmp_path / "job.out"
    env_name = "mel-slurm-requeue"
    job = _sbatch(slurm_cluster, out, run_dir, micro_policy, mlflow_server, experiment=env_name)
    deadline = time.monotonic() + 600
    while _latest(run_dir) < 1:
        assert slurm_cluster.job_state(job) in ("PENDING", "RUNNING", "CONFIGURING"), _read(out)
        assert time.monotonic() < deadline, _read(out)
        time.sleep(0.05)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    # Slurm holds a requeued job back for a while (Reason=BeginTime); a test need not wait.
    while "Restarts=1" not in (info := slurm_cluster.run("scontrol", "show", "job", "-o", job)):
        assert time.monotonic() < deadline, _read(out)
        time.sleep(0.1)
    while any(f"JobState={x} " in info for x in ("PENDING", "REQUEUED", "COMPLETING")):
        if "Reason=BeginTime" in info:
            slurm_cluster.run("scontrol", "update", f"JobId={job}", "StartTime=now")
        time.sleep(0.2)
        info = slurm_cluster.run("scontrol", "show", "job", "-o", job)
    assert slurm_cluster.wait_done(job) == "COMPLETED", _read(out)
    info = slurm_cluster.run("scontrol", "show", "job", "-o", job)
    assert "Restarts=1" in info, info
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name(env_name)
    (run,) = client.search_runs([experiment.experiment_id])  # the requeued job re-attached
    assert run.info.status == "FINISHED"
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert steps == {1, 2, 3}


def test_a_recipe_that_does_not_fit_stops_the_job_before_training(
    slurm_cluster, mlflow_server, micro_policy, tmp_path
):
    out = tmp_path / "job.out"
    job = _sbatch(slurm_cluster, out, tmp_path / "run", micro_policy, mlflow_server,
                  extra=["--set", "parallel.pp=3"])  # fmt: skip
    assert slurm_cluster.wait_done(job, timeout=300) == "FAILED"
    info = slurm_cluster.run("scontrol", "show", "job", "-o", job)
    assert "ExitCode=2:0" in info, info
    log = _read(out)
    assert "error: plan refused: parallel.pp=3 does not divide the 2 layers" in log, log
    assert "launch: megatron-mel plan refused this allocation" in log
    assert "step 1/" not in log and not (tmp_path / "run" / "checkpoints").exists()
