"""Benchmark evaluation through a rollout engine: Pass@1 (greedy), Avg@k and Pass@k.

Pass@1 decodes greedily once per problem. Avg@k is the mean accuracy of k samples at
``temperature``; Pass@k the share of problems with at least one correct sample among them
(MEL.md: k = 8 at temperature 0.6). Every benchmark reports its problem count and correct counts
beside the rates, so small benchmarks (AIME: 30 problems) are read with their granularity.
"""

from __future__ import annotations

from dataclasses import dataclass

from megatron_mel.config import RewardConfig, TrainerConfig
from megatron_mel.data.datasets import Problem
from megatron_mel.data.prompts import PromptFormatter
from megatron_mel.rewards.verifier import RewardPool
from megatron_mel.rollout.engine import RolloutEngine, SamplingParams
from megatron_mel.rollout.groups import generate_groups
from megatron_mel.trainer.phases import score_groups


@dataclass(frozen=True, slots=True)
class EvalSpec:
    k: int = 8
    temperature: float = 0.6
    max_new_tokens: int = 4096
    seed: int = 0
    score_truncated: bool = False
    """As reward.score_truncated: otherwise a response cut by the budget counts as wrong."""

    @classmethod
    def from_config(cls, trainer: TrainerConfig, reward: RewardConfig, *, seed: int) -> EvalSpec:
        """The trainer.eval_* settings (of a RunConfig, which resolved the budget) and
        reward.score_truncated; ``seed`` is launch.seed."""
        if trainer.eval_max_new_tokens is None:
            raise ValueError("trainer.eval_max_new_tokens is unresolved (None)")
        return cls(k=trainer.eval_k, temperature=trainer.eval_temperature,
                   max_new_tokens=trainer.eval_max_new_tokens, seed=seed,
                   score_truncated=reward.score_truncated)  # fmt: skip


@dataclass(frozen=True, slots=True)
class BenchmarkResult:
    name: str
    problems: int
    pass1_correct: int
    sampled_correct: int
    """Correct samples among problems x k."""
    pass_k_solved: int
    k: int

    @property
    def pass1(self) -> float:
        return self.pass1_correct / self.problems

    @property
    def avg_k(self) -> float:
        return self.sampled_correct / (self.problems * self.k)

    @property
    def pass_k(self) -> float:
        return self.pass_k_solved / self.problems

    def metrics(self) -> dict[str, float]:
        return {
            # MLflow metric names allow no "@".
            f"eval/{self.name}/pass_at_1": self.pass1,
            f"eval/{self.name}/avg_at_{self.k}": self.avg_k,
            f"eval/{self.name}/pass_at_{self.k}": self.pass_k,
            f"eval/{self.name}/problems": float(self.problems),
        }

    def row(self) -> str:
        return (
            f"| {self.name} | {self.problems} | {self.pass1:.4f} ({self.pass1_correct}) | "
            f"{self.avg_k:.4f} ({self.sampled_correct}/{self.problems * self.k}) | "
            f"{self.pass_k:.4f} ({self.pass_k_solved}) |"
        )


def evaluate(
    engine: RolloutEngine,
    formatter: PromptFormatter,
    pool: RewardPool,
    benchmarks: dict[str, list[Problem]],
    spec: EvalSpec,
    *,
    tag: str = "eval",
) -> list[BenchmarkResult]:
    results = []
    stop = formatter.stop_token_ids
    for name, problems in benchmarks.items():
        greedy = SamplingParams(n=1, temperature=0.0, max_new_tokens=spec.max_new_tokens,
                                stop_token_ids=stop)  # fmt: skip
        sampled = SamplingParams(n=spec.k, temperature=spec.temperature,
                                 max_new_tokens=spec.max_new_tokens, stop_token_ids=stop,
                                 seed=spec.seed)  # fmt: skip
        first = generate_groups(
            engine, formatter, problems, greedy, request_prefix=f"{tag}/{name}/g"
        )
        many = generate_groups(
            engine, formatter, problems, sampled, request_prefix=f"{tag}/{name}/s"
        )
        greedy_scores = score_groups(pool, first, score_truncated=spec.score_truncated)
        sampled_scores = score_groups(pool, many, score_truncated=spec.score_truncated)
        results.append(
            BenchmarkResult(
                name=name,
                problems=len(problems),
                pass1_correct=int(sum(s[0] for s in greedy_scores)),
                sampled_correct=int(sum(sum(s) for s in sampled_scores)),
                pass_k_solved=sum(any(v > 0 for v in s) for s in sampled_scores),
                k=spec.k,
            )
        )
    return results


def markdown_table(results: list[BenchmarkResult]) -> str:
    k = results[0].k if results else 8
    head = f"| benchmark | problems | Pass@1 (correct) | Avg@{k} | Pass@{k} (solved) |\n|---|---|---|---|---|"
    return "\n".join([head, *(r.row() for r in results)])
