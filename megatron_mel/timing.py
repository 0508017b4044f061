"""Wall seconds per named phase of a training step: the one clock of a step.

The training loop owns one :class:`PhaseTimer` per step; the stages it calls (rollout, reward,
reflection and replay, reference, train) report their phases through it, and the loop logs
``time/<phase>``.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class PhaseTimer:
    """Wall seconds per named phase (a phase timed twice, e.g. by a retry, adds up)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - start

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}": v for k, v in self.seconds.items()}
