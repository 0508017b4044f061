"""Synthetic one-step arithmetic word problems: a warm-up task the 135M default model can solve.

SmolLM2-135M-Instruct (the CPU default) solves essentially no GSM8K or MATH problem (measured:
0 of 96 sampled answers on either, 0 of 200 greedy on MATH level 1), so a MEL run on them has
no mixed groups and never reflects. These problems ("Tom has 7 apples and buys 5 more...") are
within its reach some of the time, which is exactly the regime where GRPO and the reflection
stage have signal. They are generated from a seed, so the split is reproducible.
"""

from __future__ import annotations

import random
from typing import Any

_ITEMS = ("apples", "books", "marbles", "pencils", "stickers", "cookies", "stamps", "cards")
_NAMES = ("Tom", "Ana", "Li", "Sara", "Omar", "Maya", "Ben", "Zoe")
_TEMPLATES = (
    ("{n} has {a} {item} and gets {b} more. How many {item} does {n} have now?", "+"),
    ("{n} had {a} {item} and gave away {b}. How many {item} are left?", "-"),
    ("There are {a} boxes with {b} {item} in each box. How many {item} are there in total?", "*"),
    ("{n} buys {a} {item}, then {b} more. How many {item} did {n} buy?", "+"),
    ("A shelf holds {a} {item}. {b} are taken away. How many {item} remain on the shelf?", "-"),
)


def arithmetic_problems(count: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``count`` records ``{id, question, answer, source}`` (answers are non-negative ints)."""
    rng = random.Random(seed)
    records = []
    for index in range(count):
        template, op = rng.choice(_TEMPLATES)
        a, b = rng.randint(2, 20), rng.randint(2, 20)
        if op == "-" and b > a:
            a, b = b, a
        if op == "*":
            a, b = rng.randint(2, 9), rng.randint(2, 9)
        answer = {"+": a + b, "-": a - b, "*": a * b}[op]
        question = template.format(n=rng.choice(_NAMES), item=rng.choice(_ITEMS), a=a, b=b)
        records.append(
            {"id": f"arith/{index}", "question": question, "answer": str(answer),
             "source": "synthetic-arithmetic"}
        )  # fmt: skip
    return records
