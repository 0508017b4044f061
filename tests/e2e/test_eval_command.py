"""`megatron-mel eval`: Pass@1 (greedy), Avg@k and Pass@k with per-benchmark counts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.e2e.conftest import train_env

pytestmark = pytest.mark.slow


def test_eval_writes_a_table_with_counts(micro_policy, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_mel.cli", "eval", str(REPO / "examples" / "tiny_cpu.yaml"),
         "--hf-dir", str(micro_policy), "--set", f"launch.run_dir={tmp_path}",
         "--set", "trainer.eval_limit=3", "--set", "trainer.eval_k=2",
         "--set", "trainer.eval_max_new_tokens=8", "--set", "reward.score_truncated=true",
         "--set", "reward.function=tests.contracts.rewards:even_length"],
        capture_output=True, text=True, timeout=600, env=train_env(),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "eval.md").read_text().splitlines()
    assert table[0].startswith(
        "| benchmark | problems | Pass@1 (correct) | Avg@2 | Pass@2 (solved)"
    )
    rows = {line.split("|")[1].strip(): line for line in table[2:]}
    assert set(rows) == {"gsm8k", "math500"}
    for row in rows.values():
        cells = [c.strip() for c in row.split("|")[1:-1]]
        assert cells[1] == "3" and cells[3].endswith("/6)")  # 3 problems, 3 x k=2 samples
