"""Experiment tracking: an MLflow run per training run, plus a console progress line with ETA.

The store is ``tracking.tracking_uri``, else ``MLFLOW_TRACKING_URI``, else a local sqlite file
under the run directory (artifacts beside it). With a tracking server (``http://...``) the
server stores the artifacts (``mlflow server --artifacts-destination``); see docs/cluster.md. ``MLFLOW_EXPERIMENT_NAME`` overrides the
experiment and ``MLFLOW_RUN_ID`` attaches to an existing run; a resumed training run reattaches
to the run id saved in its checkpoint, or, stopped before its first checkpoint, to the one
recorded in ``<run_dir>/mlflow_run.json``, so one MLflow run shows the whole training (across
Slurm requeues too).

Only the driver rank (global rank 0) talks to MLflow; the other ranks get a tracker whose calls
do nothing, so call sites need no rank checks.

A resumed run re-runs the steps after its checkpoint. Their JSONL lines are trimmed
(:meth:`Tracker.forget_after`); MLflow cannot delete metric points, so every batch carries the
tag ``mel.last_logged_step`` and steps at or below it are not sent again. MLflow's HTTP client
gets bounded waits (timeout, retries with backoff; the ``MLFLOW_HTTP_REQUEST_*`` variables win
when set), and the run is marked when the process must exit at once (lifecycle.on_exit_now).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from megatron_mel import lifecycle
from megatron_mel.config import TrackingConfig

log = logging.getLogger(__name__)
_PARAM_MAX = 500  # MLflow rejects longer parameter values on some stores
LAST_STEP_TAG = "mel.last_logged_step"
# A metrics batch is a few kB: 30 s per request is ample; 3 retries back off 1, 2, 4 s.
MLFLOW_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_TIMEOUT": "30", "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "3",
                        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}  # fmt: skip


RUN_FILE = "mlflow_run.json"


def started_run(run_dir: Path, uri: str) -> str | None:
    """The MLflow run this run directory started in this store, if any: a job stopped (or
    requeued) before its first checkpoint continues that run instead of starting another."""
    path = run_dir / RUN_FILE
    if not path.is_file():
        return None
    saved = json.loads(path.read_text(encoding="utf-8"))
    return saved["run_id"] if saved.get("tracking_uri") == uri else None


def remember_run(run_dir: Path, uri: str, run_id: str) -> None:
    tmp = run_dir / f"{RUN_FILE}.tmp"
    tmp.write_text(json.dumps({"tracking_uri": uri, "run_id": run_id}) + "\n", encoding="utf-8")
    tmp.replace(run_dir / RUN_FILE)


def _artifact_location(uri: str, run_dir: Path) -> str | None:
    """Where a new experiment keeps artifacts: beside a local store; a tracking server decides
    itself (its --artifacts-destination, proxied), since the job's disk is not the server's."""
    if uri.startswith(("http://", "https://")):
        return None
    return (run_dir / "mlartifacts").as_uri()


class Tracker:
    def __init__(
        self,
        cfg: TrackingConfig,
        run_dir: str | Path,
        *,
        params: dict[str, Any],
        run_name: str,
        total_steps: int,
        resume_run_id: str | None = None,
        enabled: bool = True,
    ) -> None:
        self.enabled = enabled
        self.total_steps = total_steps
        self.run_id: str | None = None
        self.tracking_uri: str | None = None
        self._client = None
        self._started = time.monotonic()
        self._first_step: int | None = None
        self._mlflow_logged_through = 0
        # Every logged metric also lands in a JSONL file: greppable, and independent of MLflow.
        self.metrics_path = Path(run_dir) / "metrics.jsonl"
        if enabled:
            self.metrics_path.parent.mkdir(parents=True, exist_ok=True)
        if not enabled or cfg.backend != "mlflow":
            return
        from mlflow.tracking import MlflowClient

        run_dir = Path(run_dir).resolve()
        run_dir.mkdir(parents=True, exist_ok=True)
        uri = (
            cfg.tracking_uri
            or os.environ.get("MLFLOW_TRACKING_URI")
            or (f"sqlite:///{run_dir / 'mlflow.db'}")
        )
        self.tracking_uri = uri
        for key, value in MLFLOW_HTTP_DEFAULTS.items():
            os.environ.setdefault(key, value)
        client = MlflowClient(tracking_uri=uri)
        run_id = os.environ.get("MLFLOW_RUN_ID") or resume_run_id or started_run(run_dir, uri)
        if run_id:
            run = client.get_run(run_id)
            client.update_run(run_id, status="RUNNING")
            self._mlflow_logged_through = int(run.data.tags.get(LAST_STEP_TAG, 0))
        else:
            name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or cfg.experiment
            experiment = client.get_experiment_by_name(name)
            experiment_id = (
                experiment.experiment_id
                if experiment is not None
                else client.create_experiment(
                    name, artifact_location=_artifact_location(uri, run_dir)
                )
            )
            run = client.create_run(experiment_id, run_name=cfg.run_name or run_name)
            remember_run(run_dir, uri, run.info.run_id)
            for key, value in sorted(params.items()):
                client.log_param(run.info.run_id, key, str(value)[:_PARAM_MAX])
        self._client = client
        self.run_id = run.info.run_id
        lifecycle.on_exit_now(self.close)

    def forget_after(self, step: int) -> None:
        """Drop JSONL records of steps after ``step`` (a resumed run redoes them)."""
        if not self.enabled or not self.metrics_path.is_file():
            return
        lines = self.metrics_path.read_text(encoding="utf-8").splitlines()
        kept = [line for line in lines if json.loads(line)["step"] <= step]
        self.metrics_path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        with self.metrics_path.open("a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **metrics}, sort_keys=True) + "\n")
        if self._client is None or step <= self._mlflow_logged_through:
            return  # a re-run step of a resumed run: MLflow has it already
        from mlflow.entities import Metric, RunTag

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in sorted(metrics.items())]
        self._client.log_batch(self.run_id, metrics=batch, tags=[RunTag(LAST_STEP_TAG, str(step))])
        self._mlflow_logged_through = step

    def log_artifact(self, path: str | Path, artifact_path: str | None = None) -> None:
        if self._client is not None and Path(path).exists():
            self._client.log_artifact(self.run_id, str(path), artifact_path)

    def progress(self, step: int, metrics: dict[str, float], keys: dict[str, str]) -> str:
        """One console line for ``step`` with the chosen metrics and an ETA; printed on rank 0."""
        if self._first_step is None:
            self._first_step, self._started = (
                step - 1,
                time.monotonic() - metrics.get("time/step", 0.0),
            )
        done = step - self._first_step
        per_step = (time.monotonic() - self._started) / max(done, 1)
        eta = per_step * (self.total_steps - step)
        shown = " | ".join(f"{label} {metrics[k]:.4g}" for k, label in keys.items() if k in metrics)
        line = (
            f"step {step}/{self.total_steps} | {shown} | {per_step:.1f}s/step | "
            f"ETA {int(eta // 60)}m{int(eta % 60):02d}s"
        )
        if self.enabled:
            print(line, flush=True)
        return line

    def close(self, status: str = "FINISHED") -> None:
        client, self._client = self._client, None  # once, whichever thread gets here first
        if client is not None:
            client.set_terminated(self.run_id, status=status)
