"""Inputs that used to end in a traceback end in one `error:` line naming the file, key or flag
and the fix, before any worker starts (the issue-13 list; a reward returning NaN is the
verifier's business, see tests/unit/test_verifier.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_convert_tool

RECIPE = REPO / "examples" / "tiny_cpu.yaml"


def _megatron_mel(*args: str, env_path: Path | None = None) -> subprocess.CompletedProcess:
    import os

    paths = [str(REPO), *([str(env_path)] if env_path else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    return subprocess.run([sys.executable, "-m", "megatron_mel.cli", *args], capture_output=True,
                          text=True, timeout=180, env=env)  # fmt: skip


def _assert_one_line_error(proc: subprocess.CompletedProcess, pattern: str) -> None:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr[-3000:]
    assert lines[0].startswith("error: ") and re.search(pattern, lines[0]), lines[0]


@pytest.fixture
def broken_policy(micro_policy, tmp_path) -> Path:
    copy = tmp_path / "policy"
    shutil.copytree(micro_policy, copy)
    return copy


def _train(policy: Path, run_dir: Path, *overrides: str, recipe: Path = RECIPE, **kw):
    args = ["train", str(recipe), "--set", f"model.hf_dir={policy}",
            "--set", f"launch.run_dir={run_dir}"]  # fmt: skip
    for item in overrides:
        args += ["--set", item]
    return _megatron_mel(*args, **kw)


def test_recipe_that_is_not_utf8(micro_policy, tmp_path):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes(RECIPE.read_bytes() + "# réglage fin\n".encode("latin-1"))
    proc = _train(micro_policy, tmp_path / "run", recipe=recipe)
    _assert_one_line_error(proc, rf"{recipe}:\d+: not UTF-8 text \(byte 0xe9 .*iconv")


def test_dataset_line_that_is_not_utf8(micro_policy, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_bytes(b'{"id": "1", "question": "1+1", "answer": "2"}\n'
                     + '{"id": "2", "question": "caf\xe9", "answer": "3"}\n'.encode("latin-1"))  # fmt: skip
    proc = _train(micro_policy, tmp_path / "run", f"data.train_path={data}")
    _assert_one_line_error(proc, rf"{data}:2: not UTF-8 text \(byte 0xe9")


def test_corrupt_parquet(micro_policy, tmp_path):
    data = tmp_path / "train.parquet"
    data.write_bytes(b"PAR1" + b"\x00" * 64)
    proc = _train(micro_policy, tmp_path / "run", f"data.train_path={data}")
    _assert_one_line_error(proc, rf"{data}: not a readable Parquet file")


def test_truncated_safetensors(broken_policy, tmp_path):
    weights = broken_policy / "model.safetensors"
    with weights.open("r+b") as handle:
        handle.truncate(weights.stat().st_size // 2)
    proc = _train(broken_policy, tmp_path / "run")
    _assert_one_line_error(proc, rf"{weights}: not a readable safetensors file .*truncated")


def test_missing_tokenizer_files(broken_policy, tmp_path):
    (broken_policy / "tokenizer.json").unlink()
    proc = _train(broken_policy, tmp_path / "run")
    _assert_one_line_error(proc, r"model\.hf_dir: .* has no tokenizer \(tokenizer\.json")


def test_reward_module_that_raises_at_import(micro_policy, tmp_path):
    (tmp_path / "bad_reward.py").write_text(
        "import os\nraise RuntimeError('REWARD_TOKEN is not set')\n\n"
        "def score(response, answer):\n    return 0.0\n"
    )
    proc = _train(micro_policy, tmp_path / "run", "reward.function=bad_reward:score",
                  env_path=tmp_path)  # fmt: skip
    _assert_one_line_error(
        proc,
        r"reward\.function: importing 'bad_reward' raised RuntimeError: REWARD_TOKEN is not set "
        rf"\(at {tmp_path / 'bad_reward.py'}:2\)",
    )


def test_run_dir_that_is_a_file(micro_policy, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.write_text("not a directory\n")
    proc = _train(micro_policy, run_dir)
    _assert_one_line_error(proc, rf"launch\.run_dir: {run_dir} is a file, not a directory")
    assert run_dir.read_text() == "not a directory\n"


# -- the small items ----------------------------------------------------------------------------


def test_grpo_with_one_sample_per_prompt_is_refused():
    proc = _megatron_mel("config", str(RECIPE), "--set", "algorithm.name=grpo",
                         "--set", "rollout.samples_per_prompt=1")  # fmt: skip
    _assert_one_line_error(
        proc, r"--set rollout\.samples_per_prompt: .*grpo advantages are all 0 with one response"
    )


def test_unknown_override_key_is_blamed_on_the_override():
    proc = _megatron_mel("config", str(RECIPE), "--set", "nosuch.key=1")
    _assert_one_line_error(proc, r"^error: --set nosuch\.key: unknown key 'nosuch'")


def test_converter_tp_zero_names_the_flag(tiny_models, tmp_path):
    proc = run_convert_tool("hf-to-mcore", "--hf-dir", str(tiny_models["llama"]),
                            "--out-dir", str(tmp_path / "m"), "--tp", "0", timeout=120)  # fmt: skip
    _assert_one_line_error(proc, r"^error: --tp 0: must be >= 1")


def test_a_huge_prompt_is_dropped_without_being_tokenized(micro_policy, tmp_path, monkeypatch):
    """A 5 MB question (50 MB in the report) never reaches the tokenizer: tokenising it through
    the chat template is what cost gigabytes of memory before it was dropped."""
    from megatron_mel.config import load_config
    from megatron_mel.data.datasets import Problem
    from megatron_mel.data.prompts import PromptFormatter
    from megatron_mel.models.arch import load_arch
    from megatron_mel.trainer import build

    asked: list[int] = []
    original = PromptFormatter.solve_prompt

    def recording(self, question):
        asked.append(len(question))
        return original(self, question)

    class NoPool:
        def close(self):
            pass

    monkeypatch.setattr(PromptFormatter, "solve_prompt", recording)
    monkeypatch.setattr(build, "build_reward_pool", lambda reward: NoPool())
    monkeypatch.setattr(build, "build_engine", lambda *args, **kwargs: None)
    cfg = load_config(RECIPE, [f"model.hf_dir={micro_policy}", f"launch.run_dir={tmp_path}"])
    huge = "1 + " * 1_250_000 + "1 = ?"
    train = [Problem("small", "What is 2 + 3?", "5", "t:1"), Problem("huge", huge, "1", "t:2")]
    driver = build.build_driver(cfg, load_arch(micro_policy), train, {}, layout=None)
    assert [p.id for p in driver.sampler.problems] == ["small"]
    assert max(asked) < 100_000, max(asked)
