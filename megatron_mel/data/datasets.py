"""Prompt datasets (JSONL or Parquet) with configurable field names, validated up front.

Every record must hold the configured id / question / answer fields; keys may be dotted paths
into nested records (``reward_model.ground_truth``). A line that is not JSON, or lacks a field,
fails at load time with ``file:line`` and the key, before any model is built.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_mel.config import ConfigError


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
        rows = pq.read_table(path).to_pylist()
        return [(f"{path}:row {i}", row) for i, row in enumerate(rows)]
    if path.suffix not in (".jsonl", ".json"):
        raise ConfigError(f"{path}: expected a .jsonl or .parquet dataset")
    out = []
    with path.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
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
