"""Fixtures for end-to-end runs of ``megatron-mel train`` on a micro random policy, and the
services some of them use (a local Slurm cluster, an MLflow tracking server)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from megatron_mel.platform import free_port
from tests.conftest import REPO
from tests.factories import make_micro_policy

# Small enough for seconds per step; the contract verifier makes about half the responses
# "correct", so every group is likely mixed and every part of MEL runs.
MICRO_OVERRIDES = [
    "rollout.prompts_per_step=3",
    "rollout.samples_per_prompt=4",
    "rollout.max_new_tokens=24",
    "reflection.max_new_tokens=32",
    "reflection.replay_max_new_tokens=24",
    "reflection.drop_truncated=false",
    "reward.function=tests.contracts.rewards:even_length",
    "reward.score_truncated=true",
    "reward.num_workers=1",
    "trainer.eval_every=2",
    "trainer.eval_limit=2",
    "trainer.eval_k=2",
    "trainer.eval_max_new_tokens=8",
    "checkpoint.save_every=1",
    "rollout.verify_weights=true",
]


@pytest.fixture(scope="session")
def micro_policy(assets, tmp_path_factory) -> Path:
    return make_micro_policy(tmp_path_factory.mktemp("micro") / "policy", assets.model_dir)


def train_command(run_dir: Path, policy: Path, *overrides: str) -> list[str]:
    args = [sys.executable, "-m", "megatron_mel.cli", "train", str(REPO / "examples" / "tiny_cpu.yaml"),
            "--set", f"model.hf_dir={policy}", "--set", f"launch.run_dir={run_dir}"]  # fmt: skip
    for item in (*MICRO_OVERRIDES, *overrides):
        args += ["--set", item]
    return args


def train_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def run_train(
    run_dir: Path, policy: Path, *overrides: str, timeout: float = 900, env: dict | None = None
) -> str:
    proc = subprocess.run(train_command(run_dir, policy, *overrides), capture_output=True,
                          text=True, timeout=timeout, env={**train_env(), **(env or {})})  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(
            f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc.stdout


# -- services: a local Slurm cluster and an MLflow tracking server ----------------------------


@dataclass
class SlurmCluster:
    env: dict[str, str]
    """SLURM_CONF of the cluster: add it to the environment of sbatch/squeue/scancel."""

    def run(self, *args: str, timeout: float = 60) -> str:
        proc = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.env})  # fmt: skip
        if proc.returncode != 0:
            raise AssertionError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc.stdout

    def job_state(self, job: str) -> str:
        out = self.run("scontrol", "show", "job", "-o", job)
        return out.split("JobState=", 1)[1].split()[0]

    def wait_done(self, job: str, timeout: float = 600) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job)
            if state not in ("PENDING", "RUNNING", "COMPLETING", "CONFIGURING", "REQUEUED"):
                return state
            time.sleep(0.5)
        raise AssertionError(f"job {job} still {state} after {timeout}s")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory) -> Iterator[SlurmCluster]:
    """tools/local_slurm.sh up in a temporary folder (installs Slurm first as root); down after."""
    if os.geteuid() != 0:
        pytest.skip(
            "the local Slurm cluster runs its daemons as root (CI runs `make test-slow` as root)"
        )
    script = str(REPO / "tools" / "local_slurm.sh")
    folder = tmp_path_factory.mktemp("slurm")
    up = subprocess.run(["bash", script, "up", str(folder)], capture_output=True, text=True,
                        timeout=600)  # fmt: skip
    if up.returncode != 0:
        pytest.fail(f"tools/local_slurm.sh up failed:\n{up.stdout}\n{up.stderr}")
    try:
        yield SlurmCluster(env={"SLURM_CONF": str(folder / "slurm.conf")})
    finally:
        # The daemons' logs outlive the cluster (down removes its folder), for a failed test.
        shutil.copytree(folder / "log", folder.parent / f"{folder.name}-logs", dirs_exist_ok=True)
        subprocess.run(["bash", script, "down", str(folder)], timeout=120)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory) -> Iterator[str]:
    """`mlflow server` on 127.0.0.1 with its own sqlite store and artifact folder; its URI."""
    pytest.importorskip("mlflow.server", reason="the full mlflow package (a dev dependency)")
    folder = tmp_path_factory.mktemp("mlflow_server")
    port = free_port()
    log = (folder / "server.log").open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{folder / 'mlflow.db'}",
         "--artifacts-destination", str(folder / "artifacts"), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"mlflow server did not come up:\n{(folder / 'server.log').read_text()}"
                )
            time.sleep(0.3)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
