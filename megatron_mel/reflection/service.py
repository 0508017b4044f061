"""The reflection stage: contrastive pairs -> meta-experiences -> replay validation (MEL.md 4-6).

For every mixed group, each (y+, y-) pair becomes one analysis request through the same rollout
engine, at the weight version that produced the rollouts (nothing syncs in between; we assert
it). A candidate M is dropped if generation hit the length limit (counted), if its NLL sequence
(reflection prompt + M) would exceed model.max_seq_len ("too_long", counted; not a candidate
either), and optionally if it leaks the gold answer or lacks heuristics. Each survivor is validated by a replay: the policy
re-solves the question with M in its prompt, once, sampled like a rollout (rollout.top_p and
top_k, reflection.replay_temperature) and scored like one (a truncated replay scores 0 unless
reward.score_truncated); M is kept only if that answer verifies. The replay is a filter only
and is never trained on.

Every analysis and every replay is its own request, so each draws its own random stream
(derived from the call's seed and the request id by the engine): the replays of one question
with different meta-experiences are independent draws.

Kept meta-experiences become NLL samples: context = the exact reflection prompt the engine saw
([I, x, y-, y+], chat-formatted), targets = M's generated tokens including the end-of-turn token.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass, field

from megatron_mel.config import ReflectionConfig, RolloutConfig
from megatron_mel.data.packing import TrainSample
from megatron_mel.data.prompts import PromptFormatter
from megatron_mel.reflection.pairs import contrastive_pairs, is_mixed
from megatron_mel.reflection.parsing import leaks_answer, parse_experience
from megatron_mel.reflection.store import ExperienceRecord
from megatron_mel.reflection.templates import ReflectionTemplates
from megatron_mel.rewards.verifier import RewardPool, extract_answer, outcome_score
from megatron_mel.rollout.engine import GenerationRequest, RolloutEngine, SamplingParams
from megatron_mel.rollout.groups import RolloutGroup
from megatron_mel.timing import PhaseTimer


@dataclass(slots=True)
class _Candidate:
    group: RolloutGroup
    pair: tuple[int, int]
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    truncated: bool = False
    reason: str = ""
    replay_answer: str | None = None
    replay_text: str | None = None


@dataclass(slots=True)
class ReflectionOutcome:
    samples: list[TrainSample]
    records: list[ExperienceRecord]
    metrics: dict[str, float]
    generated_tokens: dict[str, int]
    """Tokens generated per phase: reflection, replay."""


class Reflector:
    def __init__(
        self,
        cfg: ReflectionConfig,
        templates: ReflectionTemplates,
        formatter: PromptFormatter,
        reward_pool: RewardPool,
        *,
        rollout: RolloutConfig,
        score_truncated: bool,
        max_seq_len: int,
        seed: int,
    ) -> None:
        self.cfg = cfg
        self.templates = templates
        self.formatter = formatter
        self.pool = reward_pool
        self.rollout = rollout
        if cfg.replay_max_new_tokens is None:  # RunConfig resolves it to rollout.max_new_tokens
            raise ValueError("reflection.replay_max_new_tokens is unresolved (None)")
        self.score_truncated = score_truncated
        self.max_seq_len = max_seq_len
        self.seed = seed

    def run(
        self, engine: RolloutEngine, groups: list[RolloutGroup], step: int, timer: PhaseTimer
    ) -> ReflectionOutcome:
        """Reflect on every mixed group of the step; collective-free (runs on the driver rank).

        ``timer`` (the step's) gets the phases "reflection" (analyses) and "replay" (validation
        solves + verify)."""
        rng = random.Random(f"{self.seed}:pairs:{step}")
        candidates = [
            _Candidate(g, pair, self._experience_ids(g, pair))
            for g in groups
            if is_mixed(g.rewards)
            for pair in contrastive_pairs(
                g.rewards, max_pairs=self.cfg.max_pairs_per_prompt, rng=rng
            )
        ]
        counts = Counter(mixed_groups=sum(is_mixed(g.rewards) for g in groups),
                         pairs=len(candidates))  # fmt: skip
        versions = {g.weight_version for g in groups}
        with timer("reflection"):
            reflection_tokens = self._analyse(engine, candidates, step, versions)
        survivors = [c for c in candidates if not c.reason]
        with timer("replay"):
            replay_tokens = self._replay(engine, survivors, step, versions)
        tokens = {"reflection": reflection_tokens, "replay": replay_tokens}

        kept = [c for c in candidates if c.reason == "kept"]
        per_prompt = Counter(c.group.problem.id for c in kept)
        samples = [
            TrainSample(tokens=c.prompt_ids + c.token_ids, num_context=len(c.prompt_ids),
                        term="me", group_size=per_prompt[c.group.problem.id],
                        prompt_id=c.group.problem.id)
            for c in kept
        ]  # fmt: skip
        records = [self._record(c, step) for c in candidates]
        # Cut by a length limit: not a candidate (MEL.md step 5), counted.
        too_long = {"truncated", "too_long"}
        leaked = sum(r.leaked for r in records if r.reason not in too_long)
        complete = [r for r in records if r.reason not in too_long]
        dropped = sum(c.reason in too_long for c in candidates)
        counts.update(candidates=len(candidates) - dropped, kept=len(kept),
                      truncated=sum(c.truncated for c in candidates),
                      too_long=sum(c.reason == "too_long" for c in candidates))  # fmt: skip
        metrics = {
            "mel/mixed_groups": float(counts["mixed_groups"]),
            "mel/pairs": float(counts["pairs"]),
            "mel/candidates": float(counts["candidates"]),
            "mel/kept": float(counts["kept"]),
            "mel/retention": counts["kept"] / counts["candidates"] if counts["candidates"] else 0.0,
            "mel/truncation_rate": counts["truncated"] / counts["pairs"]
            if counts["pairs"]
            else 0.0,
            "mel/too_long": float(counts["too_long"]),
            "mel/leak_rate": leaked / len(complete) if complete else 0.0,
            "mel/heuristics_rate": (
                sum(r.has_heuristics for r in complete) / len(complete) if complete else 0.0
            ),
            "mel/sections_rate": (
                sum(r.all_sections for r in complete) / len(complete) if complete else 0.0
            ),
            "mel/me_length": (sum(len(c.token_ids) for c in kept) / len(kept) if kept else 0.0),
        }
        return ReflectionOutcome(samples, records, metrics, tokens)

    # -- phases -------------------------------------------------------------------------------

    def _experience_ids(self, group: RolloutGroup, pair: tuple[int, int]) -> list[int]:
        good, bad = pair
        prompt = self.templates.experience_prompt(
            group.problem.question, incorrect=group.texts[bad], correct=group.texts[good]
        )
        return self.formatter.encode(prompt)

    def _analyse(
        self,
        engine: RolloutEngine,
        candidates: list[_Candidate],
        step: int,
        versions: set[int],
    ) -> int:
        """Generate every candidate's M and mark the ones dropped; returns the tokens generated."""
        params = SamplingParams(temperature=self.cfg.temperature,
                                max_new_tokens=self.cfg.max_new_tokens,
                                stop_token_ids=self.formatter.stop_token_ids,
                                seed=self.seed + 7919 * step)  # fmt: skip
        requests = [GenerationRequest(f"reflect/{step}/{i}", c.prompt_ids, params)
                    for i, c in enumerate(candidates)]  # fmt: skip
        generated = 0
        for candidate, result in zip(candidates, engine.generate(requests)):
            completion = result.completions[0]
            _check_version(completion.weight_version, versions)
            candidate.token_ids = completion.token_ids
            candidate.text = self.formatter.decode(completion.token_ids)
            candidate.truncated = completion.truncated
            generated += len(completion.token_ids)
            if candidate.truncated and self.cfg.drop_truncated:
                candidate.reason = "truncated"
            elif len(candidate.prompt_ids) + len(candidate.token_ids) > self.max_seq_len:
                candidate.reason = "too_long"
            elif self.cfg.reject_answer_leaks and leaks_answer(
                candidate.text, candidate.group.problem.answer
            ):
                candidate.reason = "leak"
            elif (
                self.cfg.require_heuristics and not parse_experience(candidate.text).has_heuristics
            ):
                candidate.reason = "no_heuristics"
        return generated

    def _replay(
        self,
        engine: RolloutEngine,
        survivors: list[_Candidate],
        step: int,
        versions: set[int],
    ) -> int:
        """Re-solve with each survivor's M and keep the ones that verify; returns the tokens
        generated."""
        params = SamplingParams(temperature=self.cfg.replay_temperature,
                                top_p=self.rollout.top_p, top_k=self.rollout.top_k,
                                max_new_tokens=self.cfg.replay_max_new_tokens,
                                stop_token_ids=self.formatter.stop_token_ids,
                                seed=self.seed + 104729 * step)  # fmt: skip
        if not survivors:
            return 0
        requests = [
            GenerationRequest(
                f"replay/{step}/{i}",
                self.formatter.encode(
                    self.templates.replay_prompt(c.text, c.group.problem.question)
                ),
                params,
            )
            for i, c in enumerate(survivors)
        ]
        completions = [result.completions[0] for result in engine.generate(requests)]
        for completion in completions:
            _check_version(completion.weight_version, versions)
        texts = [self.formatter.decode(c.token_ids) for c in completions]
        scores = self.pool.score([(t, c.group.problem.answer) for t, c in zip(texts, survivors)])
        for candidate, text, completion, score in zip(survivors, texts, completions, scores):
            candidate.replay_answer = extract_answer(text)
            candidate.replay_text = text
            score = outcome_score(score, completion.truncated, self.score_truncated)
            candidate.reason = "kept" if score > 0 else "replay_failed"
        return sum(len(c.token_ids) for c in completions)

    def _record(self, c: _Candidate, step: int) -> ExperienceRecord:
        parsed = parse_experience(c.text)
        return ExperienceRecord(
            step=step,
            prompt_id=c.group.problem.id,
            pair=c.pair,
            weight_version=c.group.weight_version,
            text=c.text,
            kept=c.reason == "kept",
            reason=c.reason,
            replay_answer=c.replay_answer,
            replay_text=c.replay_text,
            failure_point=parsed.failure_point,
            leaked=leaks_answer(c.text, c.group.problem.answer),
            has_heuristics=parsed.has_heuristics,
            all_sections=parsed.complete,
            num_tokens=len(c.token_ids),
        )


def _check_version(version: int, expected: set[int]) -> None:
    if version not in expected:
        raise RuntimeError(
            f"reflection ran at weight version {version}, the rollouts at {sorted(expected)}: "
            "the engine was updated mid-step"
        )
