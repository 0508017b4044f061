"""Contrastive pairs (y+, y-) of a mixed group (MEL.md step 4).

Only groups with at least one correct and one incorrect response take part. By default every
(correct, incorrect) pair is used (at most 16 at G = 8). With ``max_pairs`` the pairs are drawn
uniformly without replacement, preferring pairs whose incorrect response has not been used yet,
so the analyses cover as many distinct failures as the budget allows.
"""

from __future__ import annotations

import random
from collections.abc import Sequence


def contrastive_pairs(
    rewards: Sequence[float], *, max_pairs: int | None = None, rng: random.Random | None = None
) -> list[tuple[int, int]]:
    """(index of y+, index of y-) pairs of one group; empty unless the group is mixed."""
    correct = [i for i, r in enumerate(rewards) if r > 0]
    wrong = [i for i, r in enumerate(rewards) if r <= 0]
    pairs = [(c, w) for c in correct for w in wrong]
    if max_pairs is None or len(pairs) <= max_pairs:
        return pairs
    rng = rng or random.Random(0)
    shuffled = pairs[:]
    rng.shuffle(shuffled)
    chosen: list[tuple[int, int]] = []
    used_wrong: set[int] = set()
    # First pass: one pair per distinct incorrect response; then fill up uniformly.
    for pair in shuffled:
        if len(chosen) == max_pairs:
            break
        if pair[1] not in used_wrong:
            chosen.append(pair)
            used_wrong.add(pair[1])
    for pair in shuffled:
        if len(chosen) == max_pairs:
            break
        if pair not in chosen:
            chosen.append(pair)
    return sorted(chosen)


def is_mixed(rewards: Sequence[float]) -> bool:
    return any(r > 0 for r in rewards) and any(r <= 0 for r in rewards)
