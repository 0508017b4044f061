"""Fixtures for end-to-end runs of ``megatron-mel train`` on a micro random policy."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def run_train(run_dir: Path, policy: Path, *overrides: str, timeout: float = 900) -> str:
    proc = subprocess.run(train_command(run_dir, policy, *overrides), capture_output=True,
                          text=True, timeout=timeout, env=train_env())  # fmt: skip
    if proc.returncode != 0:
        raise AssertionError(
            f"train failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc.stdout
