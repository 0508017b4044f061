"""The run directory and its checkpoints under a careless operator (run_dir.py, checkpoint.py).

One finished 3-step run is the template; each test works on a copy: a second run on a live run
directory, a resume without a trustworthy ``latest``, corrupt and partial checkpoints, re-run
steps in MLflow, a resume with another dataset or model, and a disk that fills up mid-save.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import train_command, train_env
from tests.e2e.processes import QUICK, jsonl_steps, metric_steps, mlflow_runs, started

pytestmark = pytest.mark.slow
# MEL (not GRPO) so the meta-experience store fills; 3 checkpoints kept.
STEPS = [*[o for o in QUICK if not o.startswith("algorithm.")], "trainer.num_steps=3"]


def _train(run_dir: Path, policy: Path, *overrides: str, timeout: float = 300):
    return subprocess.run(train_command(run_dir, policy, *STEPS, *overrides), env=train_env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _error_lines(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


@pytest.fixture(scope="module")
def finished(micro_policy, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("template") / "run"
    proc = _train(run_dir, micro_policy)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def _copy(template: Path, dest: Path) -> Path:
    shutil.copytree(template, dest)
    return dest


def _store(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "meta_experiences.jsonl").read_text().splitlines()]


def _snapshot(root: Path) -> dict[str, tuple[int, int, str]]:
    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        stat = path.stat()
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        out[str(path.relative_to(root))] = (stat.st_size, stat.st_mtime_ns, digest)
    return out


def test_a_second_run_on_a_live_run_dir_is_refused_and_changes_nothing(micro_policy, tmp_path):
    run_dir = tmp_path / "run"
    slow = ["reward.function=tests.contracts.rewards:slow_even_length", "trainer.num_steps=50",
            "tracking.backend=console"]  # fmt: skip
    with started(run_dir, micro_policy, *STEPS, *slow, new_session=True) as first:
        first.wait_for_checkpoint(1)
        rank0 = first.workers()[0].pid
        os.killpg(first.proc.pid, signal.SIGSTOP)  # frozen: whatever changes now is the second's
        try:
            before = _snapshot(run_dir)
            second = _train(run_dir, micro_policy, "trainer.num_steps=2", timeout=180)
            after = _snapshot(run_dir)
        finally:
            os.killpg(first.proc.pid, signal.SIGCONT)
    assert second.returncode == 2, second.stderr[-3000:]
    (line,) = _error_lines(second)
    assert f"launch.run_dir: {run_dir} is in use by another run" in line
    assert f"pid {rank0} on host {socket.gethostname()}, launcher pid {first.proc.pid}" in line
    assert after == before  # not a metrics line, store record, checkpoint or MLflow row


def test_resume_without_latest_continues_from_the_newest_checkpoint(
    finished, micro_policy, tmp_path
):
    run_dir = _copy(finished, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints" / "step_000003")
    (run_dir / "checkpoints" / "latest").unlink()
    proc = _train(run_dir, micro_policy)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 3/3" in proc.stdout and "step 1/3" not in proc.stdout
    assert jsonl_steps(run_dir) == [1, 2, 3]
    assert _store(run_dir) == _store(finished)  # restored from step 2, not doubled
    assert len(mlflow_runs(run_dir)) == 1  # re-attached to the run's MLflow run
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_000003"


@pytest.fixture(scope="module")
def damaged(finished, micro_policy, tmp_path_factory):
    """``latest`` names a step that is not there, step 3 has a flipped byte in a model shard,
    step 2 a truncated trainer_state.json; step 1 is intact."""
    run_dir = _copy(finished, tmp_path_factory.mktemp("damaged") / "run")
    ckpts = run_dir / "checkpoints"
    (ckpts / "latest").write_text("step_000009\n")
    shard = next((ckpts / "step_000003" / "model").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    state = ckpts / "step_000002" / "trainer_state.json"
    state.write_text(state.read_text()[:40])
    proc = _train(run_dir, micro_policy)
    return run_dir, shard, state, proc


def test_resume_ignores_a_latest_naming_a_missing_step(damaged):
    run_dir, _, _, proc = damaged
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"{run_dir / 'checkpoints' / 'latest'} names 'step_000009'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_corrupt_checkpoints_are_skipped_for_the_previous_one(damaged, finished):
    run_dir, shard, state, proc = damaged
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"skipping checkpoint step_000003: {shard}: checksum mismatch" in proc.stderr
    assert f"skipping checkpoint step_000002: {state}:" in proc.stderr
    assert "step 2/3" in proc.stdout and "step 1/3" not in proc.stdout  # resumed from step 1
    want = [json.loads(x) for x in (finished / "metrics.jsonl").read_text().splitlines()]
    got = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in got] == [1, 2, 3]
    assert got[1]["train/loss"] == want[1]["train/loss"]  # step 2 redone from step 1's weights


def test_re_run_steps_are_not_logged_to_mlflow_twice(finished, micro_policy, tmp_path):
    """The run logged step 3, then lost its checkpoint (killed mid-save): step 3 runs again."""
    run_dir = _copy(finished, tmp_path / "run")
    shutil.rmtree(run_dir / "checkpoints" / "step_000003")
    (run_dir / "checkpoints" / "latest").write_text("step_000002\n")
    proc = _train(run_dir, micro_policy)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step 3/3" in proc.stdout
    assert metric_steps(run_dir) == [1, 2, 3]
    assert jsonl_steps(run_dir) == [1, 2, 3]


def test_resume_with_another_dataset_is_refused_in_one_line(finished, micro_policy, tmp_path):
    from megatron_mel.assets.cache import expand_path
    from megatron_mel.config import load_config

    run_dir = _copy(finished, tmp_path / "run")
    recipe = load_config(train_command(run_dir, micro_policy)[4], [f"model.hf_dir={micro_policy}"])
    lines = Path(expand_path(recipe.data.train_path)).read_text().splitlines()
    record = json.loads(lines[0])
    record["answer"] = record["answer"] + "0"  # same size, other content
    edited = tmp_path / "edited.jsonl"
    edited.write_text("\n".join([json.dumps(record), *lines[1:]]) + "\n")
    proc = _train(run_dir, micro_policy, f"data.train_path={edited}", "trainer.num_steps=4")
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _error_lines(proc)
    assert re.match(r"error: data\.train_path: step_000003 was saved for \d+ training prompts, "
                    r"this run has \d+ \(or other ones", line), line  # fmt: skip
    assert "Traceback" not in proc.stderr


def test_resume_with_another_model_is_refused_in_one_line(finished, micro_policy, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    run_dir = _copy(finished, tmp_path / "run")
    wider = tmp_path / "wider"
    shutil.copytree(micro_policy, wider)
    config = AutoConfig.from_pretrained(micro_policy)
    config.intermediate_size *= 2
    AutoModelForCausalLM.from_config(config).save_pretrained(wider)
    proc = _train(run_dir, micro_policy, f"model.hf_dir={wider}", "trainer.num_steps=4")
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _error_lines(proc)
    assert line.startswith("error: model.hf_dir: ") and "ffn_hidden_size 128 -> 256" in line
    assert "Traceback" not in proc.stderr


def _in_small_filesystem(mount: Path, command: list[str]) -> list[str] | None:
    """``command`` in a private mount namespace with a 20 MiB tmpfs on ``mount``, or None."""
    mount.mkdir()
    prefix = ["unshare", "-m"] if os.geteuid() == 0 else ["unshare", "-r", "-m"]
    probe = subprocess.run([*prefix, "mount", "-t", "tmpfs", "-o", "size=20m", "tmpfs", str(mount)],
                           capture_output=True)  # fmt: skip
    if probe.returncode != 0:
        return None
    script = f"mount -t tmpfs -o size=20m tmpfs {mount} && exec {shlex.join(command)}"
    return [*prefix, "sh", "-c", script]


def test_a_disk_full_during_save_is_one_line(micro_policy, tmp_path):
    mount = tmp_path / "small"
    overrides = [*STEPS, f"checkpoint.dir={mount}", "tracking.backend=console"]
    command = _in_small_filesystem(mount, train_command(tmp_path / "run", micro_policy, *overrides))
    if command is None:
        pytest.skip("needs `unshare -m` (root) or unprivileged user namespaces to mount a tmpfs")
    proc = subprocess.run(command, env=train_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    (line,) = _error_lines(proc)
    assert line.startswith(f"error: checkpoint.dir: the disk is full while writing {mount}/")
    assert "Traceback" not in proc.stderr and "ERROR" not in proc.stderr
