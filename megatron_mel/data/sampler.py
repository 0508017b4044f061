"""A resumable prompt sampler: epochs of seeded permutations, state saved with checkpoints.

``next_batch(n)`` returns the next n problems, crossing into a fresh permutation at the end of
an epoch. The state is (epoch, position); with the seed it reproduces the exact order, so a run
resumed from a checkpoint sees the same prompts as an uninterrupted one.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from megatron_mel.data.datasets import Problem


@dataclass
class PromptSampler:
    problems: list[Problem]
    seed: int
    shuffle: bool = True
    epoch: int = 0
    position: int = 0
    dropped_too_long: int = 0
    """Prompts of the dataset left out for exceeding data.max_prompt_tokens (a metric)."""

    def __post_init__(self) -> None:
        if not self.problems:
            raise ValueError("PromptSampler needs at least one problem")
        self._order = self._permutation(self.epoch)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.problems)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Problem]:
        batch = []
        while len(batch) < n:
            if self.position == len(self._order):
                self.epoch += 1
                self.position = 0
                self._order = self._permutation(self.epoch)
            batch.append(self.problems[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_problems": len(self.problems), "shuffle": self.shuffle}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["num_problems"] != len(self.problems) or state["seed"] != self.seed:
            raise ValueError(
                f"sampler state is for {state['num_problems']} problems / seed {state['seed']}, "
                f"this run has {len(self.problems)} / {self.seed}: the dataset or seed changed"
            )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._permutation(self.epoch)
