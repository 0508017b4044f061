"""Rule-based rewards checked in worker processes, each check under a hard timeout.

math-verify's own timeouts use ``signal.alarm``, which only works in a process's main thread
and can be defeated by C code (sympy on a 10^100000-digit number). So checks run in a small pool
of worker processes with the library's timeouts off; the parent enforces a per-check deadline,
kills a worker that overruns it and starts a fresh one. A hang or a crash scores 0 and is
counted (``reward/timeouts``, ``reward/crashes``); it never stalls a step.

Workers come from a forkserver that has already imported the reward modules, so replacing a
killed worker costs milliseconds, not a sympy import.

The built-in reward (:func:`math_reward`) extracts the final answer itself: the last
``\\boxed{}`` or a GSM8K ``#### N``; a response without one scores 0 and is labelled
"answerless" (MEL.md step 2).
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from megatron_mel.rewards.extract import extract_gsm8k_answer, extract_last_boxed

log = logging.getLogger(__name__)
# math-verify warns on every call that its own timeouts are off; ours are on (module docstring).
logging.getLogger("math_verify").setLevel(logging.ERROR)

DEFAULT_REWARD = "megatron_mel.rewards.verifier:math_reward"
# Final answers of math problems are short; a longer "answer" is not one, and parsing it can
# take sympy seconds (deeply nested braces).
MAX_ANSWER_CHARS = 512
STARTUP_TIMEOUT_S = 120.0


def extract_answer(response: str) -> str | None:
    """The final answer of a completion: last ``\\boxed{}``, else a GSM8K ``#### N``."""
    boxed = extract_last_boxed(response)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    return extract_gsm8k_answer(response)


def outcome_score(score: float, truncated: bool, score_truncated: bool) -> float:
    """The reward of one response: ``score``, or 0 when the length limit cut the response and
    ``reward.score_truncated`` is off (MEL.md step 2 DEFAULT: a truncated response has no final
    answer to trust). Rollouts, replays and evaluation all use this rule."""
    return 0.0 if truncated and not score_truncated else score


def math_reward(response: str, answer: str) -> tuple[float, str]:
    """1.0 if the completion's final answer is mathematically equal to ``answer`` (math-verify)."""
    from math_verify import parse, verify

    predicted = extract_answer(response)
    if predicted is None:
        return 0.0, "answerless"
    if len(predicted) > MAX_ANSWER_CHARS:
        return 0.0, "answer_too_long"
    # Timeouts off: the pool enforces its own deadline around this call (module docstring).
    gold = parse(f"\\boxed{{{answer}}}", parsing_timeout=None)
    pred = parse(f"\\boxed{{{predicted}}}", parsing_timeout=None)
    if not gold or not pred:
        return 0.0, "unparsed"
    correct = verify(gold, pred, timeout_seconds=None)
    return (1.0, "correct") if correct else (0.0, "incorrect")


_ANSWER_IS = re.compile(
    r"(?i)(?:final answer|the answer|answer)\s*(?:is|:|=)\s*:?\s*\$?([^\n$]{1,40}?)\$?\s*(?:\.\s|\.$|$|\n)"
)
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def flexible_math_reward(response: str, answer: str) -> tuple[float, str]:
    """Like :func:`math_reward`, with two more ways to state a final answer when there is no
    ``\\boxed{}`` / ``####``: "the (final) answer is X", else, for a numeric gold answer, the
    last number of the response (lm-eval-harness's "flexible extract" for GSM8K).

    For models too small to follow the boxed format (the SmolLM2-135M CPU default); the strict
    reward stays the default everywhere else.
    """
    if extract_answer(response) is not None:
        return math_reward(response, answer)
    stated = _ANSWER_IS.findall(response)
    if stated:
        return math_reward(f"\\boxed{{{stated[-1].strip().rstrip('.')}}}", answer)
    numbers = _NUMBER.findall(response)
    if numbers and _NUMBER.fullmatch(answer.strip().replace(",", "")):
        return math_reward(f"#### {numbers[-1]}", answer)
    return 0.0, "answerless"


def _worker_main(conn: Connection, path: str) -> None:
    """Announce readiness, then loop: receive (task id, hook path, response, answer), send
    (task id, score, label)."""
    from megatron_mel.hooks import RewardFn, load_hook

    logging.getLogger("math_verify").setLevel(logging.ERROR)
    cache: dict[str, Any] = {path: load_hook(path, RewardFn)}
    conn.send("ready")
    while True:
        try:
            task = conn.recv()
        except EOFError:
            return
        if task is None:
            return
        task_id, path, response, answer = task
        try:
            fn = cache.get(path) or cache.setdefault(path, load_hook(path, RewardFn))
            out = fn(response, answer)
            score, label = out if isinstance(out, tuple) else (out, "scored")
            conn.send((task_id, float(score), str(label)))
        except Exception as exc:  # the reward function failed: score 0, counted
            conn.send((task_id, 0.0, f"error:{type(exc).__name__}"))


@dataclass
class _Worker:
    process: Any
    conn: Connection
    task: int | None = None
    deadline: float = 0.0


@dataclass
class VerifierStats:
    """Counts since construction (``total``) and of the last ``score`` call (``last``)."""

    total: Counter = field(default_factory=Counter)
    last: Counter = field(default_factory=Counter)


class RewardPool:
    """Score (response, answer) pairs in worker processes with a per-check timeout."""

    def __init__(
        self, reward_fn: str = DEFAULT_REWARD, *, num_workers: int = 2, timeout_s: float = 5.0
    ) -> None:
        from megatron_mel.hooks import RewardFn, load_hook

        load_hook(reward_fn, RewardFn, key="reward.function")  # fail now, not in a worker
        self.reward_fn = reward_fn
        self.timeout_s = timeout_s
        self.stats = VerifierStats()
        self._ctx = mp.get_context("forkserver")
        module = reward_fn.partition(":")[0] if ":" in reward_fn else reward_fn.rpartition(".")[0]
        self._ctx.set_forkserver_preload(["megatron_mel.rewards.verifier", "math_verify", module])
        self._workers = [self._spawn() for _ in range(max(1, num_workers))]

    def _spawn(self) -> _Worker:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(target=_worker_main, args=(child, self.reward_fn), daemon=True)
        process.start()
        child.close()
        # The per-check deadline must not include a worker's start-up (imports on a loaded
        # machine can take seconds): wait for its "ready" before handing it work.
        try:
            ready = parent.poll(STARTUP_TIMEOUT_S) and parent.recv() == "ready"
        except (EOFError, OSError):  # died while importing the reward function
            ready = False
        if not ready:
            process.kill()
            raise RuntimeError(f"reward worker did not start within {STARTUP_TIMEOUT_S:.0f} s")
        return _Worker(process, parent)

    def _replace(self, worker: _Worker) -> None:
        worker.process.kill()
        worker.process.join(timeout=5)
        worker.conn.close()
        fresh = self._spawn()
        worker.process, worker.conn, worker.task = fresh.process, fresh.conn, None

    def score(self, items: list[tuple[str, str]]) -> list[float]:
        """Scores in input order; never raises for a bad response, never waits past timeouts."""
        scores = [0.0] * len(items)
        labels = Counter()
        pending = list(range(len(items)))[::-1]
        busy: dict[Connection, _Worker] = {}
        while pending or busy:
            for worker in self._workers:
                if worker.task is None and pending:
                    task = pending.pop()
                    response, answer = items[task]
                    try:
                        worker.conn.send((task, self.reward_fn, response, answer))
                    except (BrokenPipeError, OSError):
                        labels["crashes"] += 1
                        self._replace(worker)
                        continue
                    worker.task, worker.deadline = task, time.monotonic() + self.timeout_s
                    busy[worker.conn] = worker
            if not busy:
                continue
            now = time.monotonic()
            ready = wait(list(busy), timeout=max(0.0, min(w.deadline for w in busy.values()) - now))
            for conn in ready:
                worker = busy.pop(conn)
                try:
                    task, score, label = conn.recv()
                    scores[task] = score
                    labels[label] += 1
                    worker.task = None
                except (EOFError, OSError):  # the worker died mid-check
                    labels["crashes"] += 1
                    self._replace(worker)
            now = time.monotonic()
            for conn, worker in list(busy.items()):
                if worker.deadline <= now:
                    busy.pop(conn)
                    labels["timeouts"] += 1
                    self._replace(worker)
        labels["checks"] = len(items)
        self.stats.last = labels
        self.stats.total.update(labels)
        return scores

    def metrics(self) -> dict[str, float]:
        """``reward/<label>`` counts of the last ``score`` call."""
        return {f"reward/{k}": float(v) for k, v in sorted(self.stats.last.items())}

    def close(self) -> None:
        for worker in self._workers:
            with contextlib.suppress(BrokenPipeError, OSError):
                worker.conn.send(None)
            worker.process.join(timeout=2)
            if worker.process.is_alive():
                worker.process.kill()
        self._workers = []

    def __enter__(self) -> RewardPool:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()
