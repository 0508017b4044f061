"""Prompt datasets (JSONL or Parquet) with configurable field names, validated up front.

Every record must hold the configured id / question / answer fields; keys may be dotted paths
into nested records (``reward_model.ground_truth``). A line that is not JSON or not UTF-8, a
Parquet file that does not read, or a record that lacks a field fails at load time with one line
naming ``file:line`` and the key, before any model is built.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_mel.config import ConfigError, DataConfig
from megatron_mel.config.loader import not_utf8

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Problem:
    id: str
    question: str
    answer: str
    source: str
    """``file:line`` (or ``file:row``) the record came from."""


def _lookup(record: dict[str, Any], key: str) -> Any:
    node: Any = record
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise KeyError(key)
        node = node[part]
    return node


def _records(path: Path) -> list[tuple[str, Any]]:
    """(``file:line`` location, parsed record) for every record of ``path``."""
    if not path.is_file():
        raise ConfigError(f"dataset {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as exc:  # pragma: no cover - pyarrow is a dependency
            raise ConfigError(
                f"{path}: reading Parquet needs pyarrow (pip install pyarrow)"
            ) from exc
        try:
            rows = pq.read_table(path).to_pylist()
        except (OSError, ValueError) as exc:  # pyarrow's ArrowInvalid is a ValueError
            raise ConfigError(
                f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]}); re-export "
                "it, or convert it to JSONL"
            ) from None
        return [(f"{path}:row {i}", row) for i, row in enumerate(rows)]
    if path.suffix not in (".jsonl", ".json"):
        raise ConfigError(f"{path}: expected a .jsonl or .parquet dataset")
    out = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ConfigError(f"{path}:{number}: {not_utf8(raw, exc, 'the line')}") from None
            if not line.strip():
                continue
            try:
                out.append((f"{path}:{number}", json.loads(line)))
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
    return out


def load_problems(
    path: str | Path, *, id_key: str, question_key: str, answer_key: str
) -> list[Problem]:
    """All records of ``path`` as Problems; ConfigError naming file:line and key on bad input."""
    problems = []
    seen: dict[str, str] = {}
    for where, record in _records(Path(path)):
        if not isinstance(record, dict):
            raise ConfigError(f"{where}: expected a JSON object, got {type(record).__name__}")
        fields = {}
        for role, key in (("id", id_key), ("question", question_key), ("answer", answer_key)):
            try:
                value = _lookup(record, key)
            except KeyError:
                raise ConfigError(
                    f"{where}: missing key {key!r} (data.{role}_key); the record has "
                    f"{sorted(record)}"
                ) from None
            if isinstance(value, list | dict) or value is None:
                raise ConfigError(f"{where}: {key!r} must be a string or number, got {value!r}")
            fields[role] = str(value)
        if fields["id"] in seen:
            raise ConfigError(
                f"{where}: duplicate id {fields['id']!r} (first at {seen[fields['id']]})"
            )
        seen[fields["id"]] = where
        problems.append(Problem(fields["id"], fields["question"], fields["answer"], where))
    if not problems:
        raise ConfigError(f"dataset {path} has no records")
    return problems


def load_run_datasets(
    data: DataConfig, *, eval_limit: int | None
) -> tuple[list[Problem], dict[str, list[Problem]]]:
    """Training prompts and evaluation benchmarks of a run; fails on bad records before
    anything heavy (cheap to import: the CLI calls it before starting any worker)."""
    if not data.train_path:
        raise ConfigError("data.train_path: a training dataset is required")
    return load_problems(data.train_path, **_keys(data)), load_benchmarks(data, limit=eval_limit)


def load_benchmarks(data: DataConfig, *, limit: int | None) -> dict[str, list[Problem]]:
    """data.eval_paths loaded, each cut to its first ``limit`` problems (trainer.eval_limit)."""
    return {
        name: load_problems(path, **_keys(data))[:limit] for name, path in data.eval_paths.items()
    }


def _keys(data: DataConfig) -> dict[str, str]:
    return {"id_key": data.id_key, "question_key": data.question_key, "answer_key": data.answer_key}


def drop_long_prompts(
    problems: list[Problem], formatter: Any, max_tokens: int
) -> tuple[list[Problem], int]:
    """(problems whose solve prompt fits ``max_tokens`` (data.max_prompt_tokens) in order, how
    many were dropped); the count is reported every step as ``data/prompts_dropped_too_long``.

    A token stands for at most ``L`` characters (its longest spelling in the vocabulary), so
    a question longer than ``2 * max_tokens * L`` characters cannot fit (the factor 2 absorbs
    normalisers that drop characters) and is dropped without being tokenised: tokenising a
    50 MB question through a chat template costs gigabytes of memory for nothing.
    """
    vocab = formatter.tokenizer.get_vocab()
    longest = max((len(token) for token in vocab), default=1)
    char_limit = 2 * max_tokens * max(longest, 1)
    kept, dropped = [], []
    for problem in problems:
        too_long = len(problem.question) > char_limit
        if too_long or len(formatter.solve_prompt(problem.question)) > max_tokens:
            dropped.append(problem)
        else:
            kept.append(problem)
    if dropped:
        log.warning(
            "data.max_prompt_tokens=%d: dropped %d of %d prompts that are longer (first: %s)",
            max_tokens, len(dropped), len(problems), dropped[0].source,
        )  # fmt: skip
    if not kept:
        raise ConfigError(f"data.max_prompt_tokens={max_tokens}: every prompt is longer")
    return kept, len(dropped)
