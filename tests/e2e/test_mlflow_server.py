"""A training run on 2 ranks logs to a real MLflow tracking server (``mlflow server`` on
127.0.0.1 with its own sqlite store and artifact folder); the run is read back with
MlflowClient: one run, one metric point per step (rank 0 is the only writer), its parameters,
and its artifacts stored by the server."""

from __future__ import annotations

import pytest

from tests.e2e.conftest import run_train

pytestmark = pytest.mark.slow


def test_training_run_logs_to_a_tracking_server(mlflow_server, micro_policy, tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": "mel-server-e2e"}
    stdout = run_train(run_dir, micro_policy, "parallel.dp=2", "trainer.num_steps=2",
                       "trainer.eval_every=0", env=env)  # fmt: skip
    assert f"in {mlflow_server}" in stdout
    assert not (run_dir / "mlflow.db").exists()  # nothing went to the local fallback store

    client = MlflowClient(tracking_uri=mlflow_server)
    experiment = client.get_experiment_by_name("mel-server-e2e")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")  # the server's store
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["rollout.prompts_per_step"] == "3"
    assert run.data.params["parallel.dp"] == "2"
    for key in ("train/loss", "reward/mean", "sync/weight_version"):
        history = client.get_metric_history(run.info.run_id, key)
        assert sorted(m.step for m in history) == [1, 2], key  # one writer: one point per step
    versions = {
        m.step: m.value for m in client.get_metric_history(run.info.run_id, "sync/weight_version")
    }
    assert versions == {1: 1.0, 2: 2.0}
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "meta_experiences"} <= artifacts
