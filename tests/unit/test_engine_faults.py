"""Engine faults: errors name the engine and the lost requests, survive the trip between ranks,
and a failed generation phase is retried with the same inputs."""

from __future__ import annotations

import pickle

import pytest

from megatron_mel.rollout.engine import (
    Completion,
    EngineError,
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    SamplingParams,
)
from megatron_mel.trainer.phases import with_retries


class FlakyEngine(RolloutEngine):
    """Dies (raises) on its first ``fail_times`` calls, then answers."""

    def __init__(self, fail_times: int) -> None:
        super().__init__("flaky-0")
        self.fail_times = fail_times
        self.calls = 0
        self.commits: list[int] = []

    def _generate(self, requests):
        self.calls += 1
        if self.calls <= self.fail_times:
            raise ConnectionResetError("server went away")
        return [GenerationResult(r.request_id, r.prompt_token_ids,
                                 [Completion([5], [-0.1], "stop", self.weight_version)])
                for r in requests]  # fmt: skip

    def _load_weights(self, buckets):
        self.loaded = list(buckets)

    def _commit_weights(self, version):
        self.commits.append(version)

    def get_weights(self, names):
        return {}


REQUESTS = [GenerationRequest(f"r{i}", [1, 2], SamplingParams()) for i in range(3)]


def test_failure_names_engine_and_lost_requests():
    engine = FlakyEngine(fail_times=1)
    with pytest.raises(EngineError) as err:
        engine.generate(REQUESTS)
    assert err.value.engine == "flaky-0" and err.value.lost == ["r0", "r1", "r2"]
    assert (
        str(err.value)
        == "engine flaky-0: ConnectionResetError: server went away; lost requests: r0, r1, r2"
    )
    clone = pickle.loads(pickle.dumps(err.value))  # broadcast from the driver to every rank
    assert (clone.engine, clone.lost, str(clone)) == (
        err.value.engine,
        err.value.lost,
        str(err.value),
    )


def test_phase_is_retried_without_restarting():
    engine = FlakyEngine(fail_times=2)
    results = with_retries(lambda: engine.generate(REQUESTS), retries=2, what="rollout")
    assert [r.request_id for r in results] == ["r0", "r1", "r2"] and engine.calls == 3
    engine = FlakyEngine(fail_times=3)
    with pytest.raises(EngineError):
        with_retries(lambda: engine.generate(REQUESTS), retries=2, what="rollout")


def test_guards():
    engine = FlakyEngine(fail_times=0)
    engine.pause()
    with pytest.raises(EngineError, match="while paused"):
        engine.generate(REQUESTS)
    engine.update_weights([], version=1)
    with pytest.raises(EngineError, match="version 1 <= current 1"):
        engine.update_weights([], version=1)
    with pytest.raises(EngineError, match="version 1 <= current 1"):
        engine.commit_weights(1)
    engine.resume()
    with pytest.raises(EngineError, match="needs pause"):
        engine.update_weights([], version=2)
    with pytest.raises(EngineError, match="needs pause"):
        engine.commit_weights(2)
    with pytest.raises(EngineError, match="needs pause"):
        engine.load_weights([])
    assert engine.generate(REQUESTS)[0].completions[0].weight_version == 1
    assert engine.commits == [1]  # one commit per version, however the buckets arrived
    with pytest.raises(ValueError, match="unique"):
        engine.generate([REQUESTS[0], REQUESTS[0]])
