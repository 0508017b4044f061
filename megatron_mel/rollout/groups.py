"""A prompt's group of G responses, from generation through verification.

Generation fills the responses; the verifier fills ``rewards``. Everything after (advantages,
pairs, reflection, packing) reads groups, so they are the hand-off between phases of a step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from megatron_mel.data.datasets import Problem
from megatron_mel.data.prompts import PromptFormatter
from megatron_mel.rollout.engine import (
    Completion,
    GenerationRequest,
    RolloutEngine,
    SamplingParams,
)


@dataclass(slots=True)
class RolloutGroup:
    problem: Problem
    prompt_ids: list[int]
    completions: list[Completion]
    texts: list[str]
    rewards: list[float] = field(default_factory=list)

    @property
    def weight_version(self) -> int:
        return self.completions[0].weight_version


def generate_groups(
    engine: RolloutEngine,
    formatter: PromptFormatter,
    problems: Sequence[Problem],
    params: SamplingParams,
    *,
    request_prefix: str,
) -> list[RolloutGroup]:
    """One generate call with every prompt of the step (``params.n`` responses each)."""
    prompts = [formatter.solve_prompt(p.question) for p in problems]
    requests = [
        GenerationRequest(f"{request_prefix}/{i}/{p.id}", ids, params)
        for i, (p, ids) in enumerate(zip(problems, prompts))
    ]
    results = engine.generate(requests)
    return [
        RolloutGroup(
            problem=problem,
            prompt_ids=ids,
            completions=result.completions,
            texts=[formatter.decode(c.token_ids) for c in result.completions],
        )
        for problem, ids, result in zip(problems, prompts, results)
    ]
