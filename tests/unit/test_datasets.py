"""Prompt datasets: configurable keys, dotted paths, and bad records that fail before training
with file:line and the key; the resumable sampler."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from megatron_mel.config import ConfigError
from megatron_mel.data.datasets import Problem, drop_long_prompts, load_problems
from megatron_mel.data.sampler import PromptSampler
from tests.conftest import REPO

KEYS = dict(id_key="id", question_key="question", answer_key="answer")


def _write(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return path


def test_loads_jsonl_with_nested_keys(tmp_path):
    path = _write(tmp_path / "d.jsonl", [
        json.dumps({"uid": 1, "prompt": "2+2?", "reward_model": {"ground_truth": "4"}}), "",
        json.dumps({"uid": 2, "prompt": "3+3?", "reward_model": {"ground_truth": 6}}),
    ])  # fmt: skip
    problems = load_problems(path, id_key="uid", question_key="prompt",
                             answer_key="reward_model.ground_truth")  # fmt: skip
    assert [(p.id, p.question, p.answer) for p in problems] == [
        ("1", "2+2?", "4"),
        ("2", "3+3?", "6"),
    ]
    assert problems[1].source == f"{path}:3"


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(
        pa.table({"id": ["a", "b"], "question": ["q1", "q2"], "answer": ["1", "2"]}), path
    )
    assert [p.answer for p in load_problems(path, **KEYS)] == ["1", "2"]


@pytest.mark.parametrize(
    ("lines", "message"),
    [
        (['{"id": 1, "question": "q", "answer": "a"}', "{not json"], r"d\.jsonl:2: not valid JSON"),
        (['{"id": 1, "question": "q"}'], r"d\.jsonl:1: missing key 'answer' \(data\.answer_key\)"),
        (['[1, 2]'], r"d\.jsonl:1: expected a JSON object"),
        (['{"id": 1, "question": "q", "answer": "a"}'] * 2, r"d\.jsonl:2: duplicate id '1' \(first at .*d\.jsonl:1\)"),
        (['{"id": 1, "question": {"x": 1}, "answer": "a"}'], r"'question' must be a string"),
    ],
)  # fmt: skip
def test_bad_records_name_file_line_and_key(tmp_path, lines, message):
    with pytest.raises(ConfigError, match=message):
        load_problems(_write(tmp_path / "d.jsonl", lines), **KEYS)


def test_missing_file_and_empty(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_problems(tmp_path / "nope.jsonl", **KEYS)
    with pytest.raises(ConfigError, match="no records"):
        load_problems(_write(tmp_path / "d.jsonl", [""]), **KEYS)
    with pytest.raises(ConfigError, match=r"expected a \.jsonl or \.parquet"):
        load_problems(_write(tmp_path / "d.csv", ["a,b"]), **KEYS)


def test_train_command_fails_before_starting(tmp_path, assets):
    bad = _write(
        tmp_path / "train.jsonl",
        ['{"id": 1, "question": "q", "answer": "a"}', '{"id": 2, "question": "q"}'],
    )
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_mel.cli", "train", str(REPO / "examples" / "tiny_cpu.yaml"),
         "--set", f"data.train_path={bad}", "--set", f"launch.run_dir={tmp_path / 'run'}"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert f"error: {bad}:2: missing key 'answer' (data.answer_key)" in proc.stderr
    assert not (tmp_path / "run").exists()  # nothing started


def test_sampler_resumes_exactly():
    from megatron_mel.data.datasets import Problem

    problems = [Problem(str(i), f"q{i}", str(i), "t") for i in range(7)]
    a = PromptSampler(problems, seed=3)
    first = a.next_batch(5)
    state = a.state_dict()
    rest = a.next_batch(6)  # crosses into epoch 1 with a new order
    b = PromptSampler(problems, seed=3)
    b.load_state_dict(state)
    assert b.next_batch(6) == rest and a.epoch == 1
    assert sorted(p.id for p in first + rest[:2]) == sorted(p.id for p in problems)
    with pytest.raises(ValueError, match="dataset or seed changed"):
        PromptSampler(problems[:3], seed=3).load_state_dict(state)


class _CharFormatter:
    """One token per character, so prompt lengths are known exactly."""

    class tokenizer:  # stands in for a HF tokenizer
        @staticmethod
        def get_vocab() -> dict[str, int]:
            return {"a": 0, "bb": 1}

    @staticmethod
    def solve_prompt(question: str) -> list[int]:
        return [0] * len(question)


def test_long_prompts_are_dropped_and_counted():
    problems = [Problem(str(i), "q" * n, "1", f"d.jsonl:{i + 1}") for i, n in enumerate([3, 9, 4])]
    kept, dropped = drop_long_prompts(problems, _CharFormatter(), max_tokens=4)
    assert [p.id for p in kept] == ["0", "2"] and dropped == 1
    with pytest.raises(ConfigError, match=r"data\.max_prompt_tokens=2: every prompt is longer"):
        drop_long_prompts(problems, _CharFormatter(), max_tokens=2)
