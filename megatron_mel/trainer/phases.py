"""The verbs of a training step that are not the actor's: verify, build samples, retry.

The generation side of a step (rollout, verification, reflection, replay) runs on the driver
rank (global rank 0), which owns the engine handle, the verifier pool and the tokenizer; its
result reaches every rank through :func:`megatron_mel.platform.from_driver`. Training is
collective.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

import torch

from megatron_mel.algorithms.advantages import compute_advantages
from megatron_mel.config import AlgorithmConfig
from megatron_mel.data.packing import TrainSample
from megatron_mel.net.health import backoff_delays
from megatron_mel.rewards.verifier import RewardPool, outcome_score
from megatron_mel.rollout.engine import EngineError
from megatron_mel.rollout.groups import RolloutGroup

T = TypeVar("T")
log = logging.getLogger(__name__)


def with_retries(fn: Callable[[], T], retries: int, what: str) -> T:
    """Call ``fn``; on an EngineError call it again, up to ``retries`` more times.

    The phase is re-run whole with the same inputs and seeds, so a retried step produces what
    an undisturbed one would have (an engine may return results it finished before failing).
    Retries back off (0.5 s, 1 s, 2 s, ... at most 10 s) so a restarting server gets time.
    """
    delays = backoff_delays(first_s=0.5, max_s=10.0)
    for attempt in range(retries + 1):
        try:
            return fn()
        except EngineError as exc:
            if attempt == retries:
                raise
            delay = next(delays)
            log.warning("%s failed (%s); retry %d of %d in %.1f s", what, exc, attempt + 1,
                        retries, delay)  # fmt: skip
            time.sleep(delay)
    raise AssertionError("unreachable")


def score_groups(
    pool: RewardPool, groups: list[RolloutGroup], *, score_truncated: bool = False
) -> list[list[float]]:
    """One reward per completion, group by group; a truncated response scores 0 unless
    ``score_truncated`` (MEL.md step 2 DEFAULT)."""
    items = [(text, g.problem.answer) for g in groups for text in g.texts]
    scores = iter(pool.score(items))
    # zip consumes exactly one score per completion, in order.
    return [
        [outcome_score(s, c.truncated, score_truncated) for c, s in zip(g.completions, scores)]
        for g in groups
    ]


def verify_groups(
    pool: RewardPool, groups: list[RolloutGroup], *, score_truncated: bool = False
) -> dict[str, float]:
    """Fill ``group.rewards`` (see score_groups) and return the reward metrics."""
    for group, rewards in zip(groups, score_groups(pool, groups, score_truncated=score_truncated)):
        group.rewards = rewards
    flat = [r for g in groups for r in g.rewards]
    lengths = [len(c.token_ids) for g in groups for c in g.completions]
    truncated = [c.truncated for g in groups for c in g.completions]
    return {
        "reward/mean": sum(flat) / len(flat),
        "rollout/response_length": sum(lengths) / len(lengths),
        "rollout/truncation_rate": sum(truncated) / len(truncated),
        **pool.metrics(),
    }


def policy_samples(groups: list[RolloutGroup], algorithm: AlgorithmConfig) -> list[TrainSample]:
    """The rollout responses as training samples for ``algorithm.name``.

    grpo / mel / reinforce_pp: every response is a PG sample with its outcome advantage.
    rft: correct responses only, trained with NLL (rejection-sampling fine-tuning).
    Behaviour log-probs come from the engine; the loop may make the samples on-policy instead
    (``algorithm.recompute_old_logprobs``).
    """
    if algorithm.name == "rft":
        samples = []
        for group in groups:
            positives = [i for i, r in enumerate(group.rewards) if r > 0]
            for i in positives:
                samples.append(_sample(group, i, term="rft", group_size=len(positives)))
        return samples
    rewards = torch.tensor([g.rewards for g in groups], dtype=torch.float64)
    lengths = torch.tensor([[len(c.token_ids) for c in g.completions] for g in groups])
    advantages = compute_advantages(
        algorithm.estimator, rewards, num_tokens=lengths, std_normalize=algorithm.std_normalize
    )
    return [
        _sample(group, i, term="pg", advantage=float(advantages[g, i]))
        for g, group in enumerate(groups)
        for i in range(len(group.completions))
    ]


def _sample(
    group: RolloutGroup, index: int, *, term: str, advantage: float = 0.0, group_size: int = 1
) -> TrainSample:
    completion = group.completions[index]
    return TrainSample(
        tokens=group.prompt_ids + completion.token_ids,
        num_context=len(group.prompt_ids),
        term=term,
        advantage=advantage,
        old_logprobs=list(completion.logprobs),
        group_size=group_size,
        prompt_id=group.problem.id,
    )


def logprob_mismatch(
    engine: Sequence[Sequence[float] | None], trainer: Sequence[Sequence[float]]
) -> dict[str, float]:
    """Mean and max |engine - trainer| log-prob over target tokens (rollout/train consistency),
    sample by sample; a sample without engine log-probs contributes nothing."""
    diffs = [
        abs(a - b) for ours, theirs in zip(engine, trainer) for a, b in zip(ours or [], theirs)
    ]
    if not diffs:
        return {"rollout/train_logprob_abs_diff": 0.0, "rollout/train_logprob_max_diff": 0.0}
    return {
        "rollout/train_logprob_abs_diff": sum(diffs) / len(diffs),
        "rollout/train_logprob_max_diff": max(diffs),
    }
