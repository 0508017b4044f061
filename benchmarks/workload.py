"""The fixed GRPO workload of bench_vs_trl.py, shared by both sides (no megatron_mel imports: the
TRL side runs in its own virtual environment).

* data: the first ``NUM_QUESTIONS`` GSM8K test questions of the offline asset, in file order;
* prompt: one user turn ``question + USER_SUFFIX`` through the model's chat template;
* reward: 1.0 when the last number of the completion equals the gold number, else 0.0.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

NUM_QUESTIONS = 8
USER_SUFFIX = " Put the final answer after ####."
PROMPTS_PER_STEP = 4
GROUP_SIZE = 4
MAX_NEW_TOKENS = 128
LEARNING_RATE = 1e-6
CLIP_GRAD = 1.0
SEED = 0
WARMUP_STEPS = 1
MEASURED_STEPS = 3

# A number with optional sign, thousands separators and decimals ("1,234.5", "-3", ".5").
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def last_number_reward(response: str, answer: str) -> tuple[float, str]:
    """1.0 if the last number in ``response`` equals the gold number ``answer``."""
    numbers = _NUMBER.findall(response)
    if not numbers:
        return 0.0, "answerless"
    try:
        same = float(numbers[-1].replace(",", "")) == float(answer.replace(",", ""))
    except ValueError:
        return 0.0, "unparsed"
    return (1.0, "correct") if same else (0.0, "incorrect")


def first_questions(gsm8k_path: str | Path, count: int = NUM_QUESTIONS) -> list[dict]:
    """The first ``count`` records of a GSM8K JSONL file (``id, question, answer, ...``)."""
    records = []
    with open(gsm8k_path, encoding="utf-8") as handle:
        for line in handle:
            records.append(json.loads(line))
            if len(records) == count:
                break
    if len(records) < count:
        raise SystemExit(
            f"error: {gsm8k_path} has {len(records)} records, the workload needs {count}"
        )
    return records
