"""The reflection stage against a scripted engine: pairs, prompts, truncation, replay filter and
the NLL samples are exactly as MEL.md says (steps 4-7)."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_mel.algorithms.token_loss import IGNORE, NLL
from megatron_mel.config import ReflectionConfig, RolloutConfig
from megatron_mel.data.datasets import Problem
from megatron_mel.data.packing import pack_samples
from megatron_mel.data.prompts import PromptFormatter
from megatron_mel.reflection.pairs import contrastive_pairs
from megatron_mel.reflection.parsing import leaks_answer, parse_experience
from megatron_mel.reflection.service import Reflector
from megatron_mel.reflection.templates import ReflectionTemplates
from megatron_mel.rewards.verifier import RewardPool
from megatron_mel.rollout.engine import Completion, GenerationResult, RolloutEngine
from megatron_mel.rollout.groups import RolloutGroup
from megatron_mel.timing import PhaseTimer

ROLLOUT = RolloutConfig(max_new_tokens=64)


def _reflection(**kwargs) -> ReflectionConfig:
    """A ReflectionConfig as RunConfig resolves it (replay budget = rollout.max_new_tokens)."""
    return ReflectionConfig(**{"replay_max_new_tokens": ROLLOUT.max_new_tokens, **kwargs})


class ScriptedEngine(RolloutEngine):
    """Answers by rule: analyses are "analysis <n>" (the 2nd one truncated); replays answer
    correctly when the analysis number is odd (and hit the length limit if
    ``truncate_replays``)."""

    def __init__(self, formatter: PromptFormatter, truncate_replays: bool = False) -> None:
        super().__init__("scripted")
        self.formatter = formatter
        self.truncate_replays = truncate_replays
        self.requests: list = []

    def _generate(self, requests):
        results = []
        for request in requests:
            self.requests.append(request)
            prompt = self.formatter.decode(request.prompt_token_ids)
            kind, _, index = request.request_id.split("/")
            if kind == "reflect":
                n = int(index)
                text = f"### 1. Failure Point and Latent Reasoning Defect\nFailure point: step {n}\n" \
                       f"### 4. Subject Heuristics\n- If A, then B. analysis {n}"  # fmt: skip
                reason = "length" if n == 1 else "stop"
            else:
                n = int(prompt.split("analysis ")[1].split()[0])
                text = "so \\boxed{42}" if n % 2 else "so \\boxed{41}"
                reason = "length" if self.truncate_replays else "stop"
            ids = self.formatter.tokenizer(text, add_special_tokens=False)["input_ids"]
            if reason == "stop":
                ids = [*ids, self.formatter.stop_token_ids[0]]
            results.append(GenerationResult(request.request_id, request.prompt_token_ids,
                                            [Completion(ids, [0.0] * len(ids), reason, 3)]))  # fmt: skip
        return results

    def _update_weights(self, buckets, version):
        raise NotImplementedError

    def get_weights(self, names):
        return {}


@pytest.fixture(scope="module")
def formatter(assets):
    return PromptFormatter.from_dir(assets.model_dir)


def _group(formatter, pid, rewards):
    problem = Problem(pid, f"question {pid}", "42", "test")
    texts = [f"response {pid}-{i}" for i in range(len(rewards))]
    completions = [Completion([1], [0.0], "stop", 3) for _ in rewards]
    return RolloutGroup(problem, formatter.solve_prompt(problem.question), completions, texts,
                        list(rewards))  # fmt: skip


def test_reflection_pipeline_exactly(formatter):
    groups = [_group(formatter, "A", [1, 0, 0, 1]), _group(formatter, "B", [1, 1, 1, 1]),
              _group(formatter, "C", [0, 0, 0, 0])]  # fmt: skip
    engine = ScriptedEngine(formatter)
    with RewardPool(num_workers=1, timeout_s=5) as pool:
        reflector = Reflector(_reflection(), ReflectionTemplates(), formatter, pool,
                              rollout=ROLLOUT, score_truncated=False, max_seq_len=8192, seed=0)  # fmt: skip
        timer = PhaseTimer()
        outcome = reflector.run(engine, groups, step=5, timer=timer)
    assert set(timer.seconds) == {"reflection", "replay"}  # the step's timer has both phases

    reflect = [r for r in engine.requests if r.request_id.startswith("reflect/")]
    # Step 4: only the mixed group, every (correct, incorrect) pair.
    assert len(reflect) == 4
    expected_pairs = [(0, 1), (0, 2), (3, 1), (3, 2)]
    templates = ReflectionTemplates()
    for request, (good, bad) in zip(reflect, expected_pairs):
        prompt = templates.experience_prompt("question A", incorrect=f"response A-{bad}",
                                             correct=f"response A-{good}")  # fmt: skip
        assert request.prompt_token_ids == formatter.encode(prompt)
        text = formatter.decode(request.prompt_token_ids)
        # The incorrect solution comes first, each with its verdict.
        assert text.index(f"response A-{bad}") < text.index(f"response A-{good}")
        assert "Incorrect </judge>" in text and "Correct </judge>" in text
    # Step 5: the truncated analysis (index 1) is dropped and counted, never replayed.
    replays = [r for r in engine.requests if r.request_id.startswith("replay/")]
    assert len(replays) == 3
    assert all("analysis 1\n" not in formatter.decode(r.prompt_token_ids) for r in replays)
    # Step 6: replay answers 42 (correct) for odd analyses: only analysis 3 survives.
    kept = [r for r in outcome.records if r.kept]
    assert [r.pair for r in kept] == [expected_pairs[3]]
    assert {r.reason for r in outcome.records} == {"kept", "truncated", "replay_failed"}
    assert outcome.metrics["mel/mixed_groups"] == 1 and outcome.metrics["mel/pairs"] == 4
    assert outcome.metrics["mel/candidates"] == 3 and outcome.metrics["mel/kept"] == 1
    assert outcome.metrics["mel/retention"] == pytest.approx(1 / 3)
    assert outcome.metrics["mel/truncation_rate"] == pytest.approx(1 / 4)
    assert kept[0].failure_point == "step 3" and kept[0].replay_answer == "42"
    # Step 7: the NLL sample is [reflection prompt] + M (+ end of turn); only M carries loss.
    (sample,) = outcome.samples
    prompt_ids = reflect[3].prompt_token_ids
    assert sample.term == "me" and sample.num_context == len(prompt_ids)
    assert sample.tokens[: len(prompt_ids)] == prompt_ids
    assert sample.tokens[-1] == formatter.stop_token_ids[0]
    mb = pack_samples([sample], [0])
    nll = (mb.loss_type == NLL).nonzero().flatten().tolist()
    assert nll == list(range(len(prompt_ids) - 1, len(sample.tokens) - 1))
    assert mb.labels[nll].tolist() == sample.tokens[len(prompt_ids) :]
    assert int((mb.loss_type != IGNORE).sum()) == sample.num_targets


def test_pair_cap_prefers_distinct_incorrect():
    pairs = contrastive_pairs([1, 1, 1, 0, 0], max_pairs=2)
    assert len(pairs) == 2 and len({w for _, w in pairs}) == 2
    assert contrastive_pairs([1, 1]) == [] and contrastive_pairs([0, 0]) == []
    assert len(contrastive_pairs([1, 0] * 4)) == 16  # all pairs at G = 8


def test_parsing_and_leaks():
    parsed = parse_experience(
        "### 1. Failure Point and Latent Reasoning Defect\nFailure point: used sin(A/2)\n"
        "### 2. Why the Correct Solution Worked\nchecked\n### 3. First-Person Reflective Summary\n"
        "Review\n### 4. Subject Heuristics\n- If X, then Y."
    )
    assert parsed.complete and parsed.has_heuristics and parsed.failure_point == "used sin(A/2)"
    assert not parse_experience("no sections at all").has_heuristics
    assert leaks_answer("the result is 12 apples", "12")
    assert not leaks_answer("the result is 123 or 1.2", "12")
    assert leaks_answer("so x = \\frac{1}{2}", "\\frac{1}{2}")


def test_leak_and_heuristics_filters(formatter):
    groups = [_group(formatter, "A", [1, 0])]
    engine = ScriptedEngine(formatter)
    cfg = _reflection(require_heuristics=True, reject_answer_leaks=True)
    with RewardPool(num_workers=1, timeout_s=5) as pool:
        outcome = Reflector(cfg, ReflectionTemplates(), formatter, pool,
                            rollout=ROLLOUT, score_truncated=False, max_seq_len=8192, seed=0).run(engine, groups, step=1, timer=PhaseTimer())  # fmt: skip
    (record,) = outcome.records
    assert record.has_heuristics and not record.leaked  # "analysis 0" has no 42 in it
    assert record.reason == "replay_failed"  # analysis 0 is even: the replay answers 41


def test_replay_samples_and_scores_like_a_rollout(formatter):
    """Replays take rollout.top_p / top_k, and a truncated replay counts only with
    reward.score_truncated (the same rule as rollouts)."""
    rollout = RolloutConfig(max_new_tokens=64, top_p=0.9, top_k=20)
    groups = [_group(formatter, "A", [1, 0, 0, 1])]
    kept = {}
    with RewardPool(num_workers=1, timeout_s=5) as pool:
        for score_truncated in (False, True):
            engine = ScriptedEngine(formatter, truncate_replays=True)
            reflector = Reflector(_reflection(replay_temperature=0.7), ReflectionTemplates(),
                                  formatter, pool, rollout=rollout,
                                  score_truncated=score_truncated, max_seq_len=8192, seed=0)  # fmt: skip
            outcome = reflector.run(engine, groups, step=2, timer=PhaseTimer())
            replays = [r for r in engine.requests if r.request_id.startswith("replay/")]
            assert replays and all(
                (r.params.top_p, r.params.top_k, r.params.temperature, r.params.max_new_tokens)
                == (0.9, 20, 0.7, 64)
                for r in replays
            )
            kept[score_truncated] = outcome.metrics["mel/kept"]
    # Analysis 3 answers 42 but is cut by the length limit: kept only when truncation scores.
    assert kept == {False: 0.0, True: 1.0}


def test_replays_of_one_question_draw_independent_streams(formatter, tmp_path):
    """Two replays of one question with two different meta-experiences in the same call are
    independent draws. A zero-weight model makes every next-token distribution uniform, so the
    tokens depend on the random stream alone: shared streams would give identical texts."""
    from megatron_mel.models.arch import load_arch
    from megatron_mel.rollout.embedded import EmbeddedEngine
    from tests.factories import make_micro_policy

    class Recording(RolloutEngine):
        def __init__(self, inner: RolloutEngine) -> None:
            super().__init__("recording")
            self.inner, self.results = inner, []

        def _generate(self, requests):
            out = self.inner.generate(requests)
            self.results += out
            return out

        def _update_weights(self, buckets, version):
            raise NotImplementedError

        def get_weights(self, names):
            return {}

    policy = make_micro_policy(tmp_path / "policy", Path(formatter.tokenizer.name_or_path))
    engine = Recording(EmbeddedEngine(load_arch(policy)))  # no weights loaded: all zeros
    group = _group(formatter, "A", [1, 0, 0])
    group.completions = [Completion([1], [0.0], "stop", 0) for _ in range(3)]
    cfg = _reflection(max_new_tokens=12, replay_max_new_tokens=12, drop_truncated=False)
    with RewardPool(num_workers=1, timeout_s=5) as pool:
        Reflector(cfg, ReflectionTemplates(), formatter, pool, rollout=ROLLOUT,
                  score_truncated=False, max_seq_len=8192, seed=0).run(engine, [group], step=1, timer=PhaseTimer())  # fmt: skip
    analyses = [r for r in engine.results if r.request_id.startswith("reflect/")]
    replays = [r for r in engine.results if r.request_id.startswith("replay/")]
    assert len(analyses) == len(replays) == 2
    assert replays[0].prompt_token_ids != replays[1].prompt_token_ids  # two different M
    for pair in (analyses, replays):
        first, second = (r.completions[0].token_ids for r in pair)
        assert first != second


def test_meta_experience_longer_than_max_seq_len_is_dropped_and_counted(formatter):
    groups = [_group(formatter, "A", [1, 0])]
    engine = ScriptedEngine(formatter)
    prompt_len = len(Reflector(_reflection(), ReflectionTemplates(), formatter, None,
                               rollout=ROLLOUT, score_truncated=False, max_seq_len=1,
                               seed=0)._experience_ids(groups[0], (0, 1)))  # fmt: skip
    with RewardPool(num_workers=1, timeout_s=5) as pool:
        outcome = Reflector(_reflection(), ReflectionTemplates(), formatter, pool,
                            rollout=ROLLOUT, score_truncated=False, max_seq_len=prompt_len + 3,
                            seed=0).run(engine, groups, step=1, timer=PhaseTimer())  # fmt: skip
    (record,) = outcome.records
    assert record.reason == "too_long" and not outcome.samples
    assert outcome.metrics["mel/too_long"] == 1 and outcome.metrics["mel/candidates"] == 0
    assert not [r for r in engine.requests if r.request_id.startswith("replay/")]
