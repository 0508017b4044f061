"""The tracker re-attaches a restarted run directory to its MLflow run (Slurm requeue before the
first checkpoint), but not across stores; rank 0 writes the exit status for launchers."""

from __future__ import annotations

import json

from megatron_mel import cli
from megatron_mel.config import TrackingConfig
from megatron_mel.tracking import RUN_FILE, Tracker


def _tracker(run_dir, **cfg) -> Tracker:
    return Tracker(TrackingConfig(**cfg), run_dir, params={"a": 1}, run_name="t", total_steps=2)


def test_a_restarted_run_directory_continues_its_mlflow_run(tmp_path):
    first = _tracker(tmp_path)
    first.log_metrics({"x": 1.0}, step=1)
    first.close("KILLED")
    saved = json.loads((tmp_path / RUN_FILE).read_text())
    assert saved == {"tracking_uri": first.tracking_uri, "run_id": first.run_id}
    second = _tracker(tmp_path)
    assert second.run_id == first.run_id
    second.close()
    # The record names its store: another store starts a run of its own.
    other = _tracker(tmp_path, tracking_uri=f"sqlite:///{tmp_path / 'other.db'}")
    assert other.run_id != first.run_id
    other.close()


def test_rank0_records_its_exit_status_for_the_launcher(tmp_path, monkeypatch):
    path = tmp_path / "status"
    monkeypatch.setenv(cli.EXIT_STATUS_ENV, str(path))
    monkeypatch.setenv("RANK", "1")
    cli.record_exit_status(75)
    assert not path.exists()  # only rank 0 speaks for the job
    monkeypatch.setenv("RANK", "0")
    cli.record_exit_status(75)
    assert path.read_text() == "75\n"
