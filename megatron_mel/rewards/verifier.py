"""Rule-based rewards checked in worker processes, each check under a hard timeout.

math-verify's own timeouts use ``signal.alarm``, which only works in a process's main thread
and can be defeated by C code (sympy on a 10^100000-digit number). So checks run in a small pool
of worker processes with the library's timeouts off; the parent enforces a per-check deadline,
kills a worker that overruns it and starts a fresh one. A hang or a crash scores 0 and is
counted (``reward/timeouts``, ``reward/crashes``); it never stalls a step. A task that cannot
even be handed to a worker (its pipe broke) is re-sent to a fresh one, not scored.

A reward function that raises, or returns a non-finite number, scores 0 for that response and is
counted (``reward/error:<Type>``, ``reward/error:non_finite``). That is right for a function
that trips on one odd response, and silent ruin for one that fails on every call: every group
would score 0, no group would be mixed and MEL would do nothing. So failures (exceptions,
non-finite returns and worker crashes) are counted across calls, a success resets the count, and
``max_consecutive_failures`` of them in a row raise :class:`RewardFunctionError`, naming the
function and the first exception of the streak. Timeouts do not count either way: they depend
on the input (sympy on a tower of powers), not on the function being broken.

Workers come from a forkserver that has already imported the reward modules and run one
symbolic check (rewards/forkserver_warmup.py), so replacing a killed worker costs milliseconds,
not a sympy import, and no worker pays math-verify's first-use set-up inside a check's deadline.

The built-in reward (:func:`math_reward`) extracts the final answer itself: the last
``\\boxed{}`` or a GSM8K ``#### N``; a response without one scores 0 and is labelled
"answerless" (MEL.md step 2).
"""

from __future__ import annotations

import contextlib
import logging
import math
import multiprocessing as mp
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import TYPE_CHECKING, Any

from megatron_mel.rewards.extract import extract_gsm8k_answer, extract_last_boxed

if TYPE_CHECKING:  # the workers preload this module: keep it import-light
    from megatron_mel.config import RewardConfig

log = logging.getLogger(__name__)
# math-verify warns on every call that its own timeouts are off; ours are on (module docstring).
logging.getLogger("math_verify").setLevel(logging.ERROR)

DEFAULT_REWARD = "megatron_mel.rewards.verifier:math_reward"
# Final answers of math problems are short; a longer "answer" is not one, and parsing it can
# take sympy seconds (deeply nested braces).
MAX_ANSWER_CHARS = 512
STARTUP_TIMEOUT_S = 120.0
# A task whose pipe breaks this many times in a row (each time to a fresh worker) is an error.
MAX_SEND_ATTEMPTS = 3


class RewardFunctionError(RuntimeError):
    """The reward function failed too many times in a row (see the module docstring)."""


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
    (task id, score, label, failure): failure is None, or what went wrong in words."""
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
            score = float(score)
        except Exception as exc:  # the reward function failed: score 0, counted
            conn.send((task_id, 0.0, f"error:{type(exc).__name__}",
                       f"{type(exc).__name__}: {exc}"))  # fmt: skip
            continue
        if math.isfinite(score):
            conn.send((task_id, score, str(label), None))
        else:
            conn.send((task_id, 0.0, "error:non_finite",
                       f"returned {score!r}; a reward must be a finite number"))  # fmt: skip


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
        self,
        reward_fn: str = DEFAULT_REWARD,
        *,
        num_workers: int = 2,
        timeout_s: float = 5.0,
        max_consecutive_failures: int = 50,
    ) -> None:
        from megatron_mel.hooks import RewardFn, load_hook

        load_hook(reward_fn, RewardFn, key="reward.function")  # fail now, not in a worker
        self.reward_fn = reward_fn
        self.timeout_s = timeout_s
        self.max_consecutive_failures = max_consecutive_failures
        self.stats = VerifierStats()
        self._failures_in_a_row = 0
        self._first_failure: str | None = None
        self._ctx = mp.get_context("forkserver")
        module = reward_fn.partition(":")[0] if ":" in reward_fn else reward_fn.rpartition(".")[0]
        preload = ["megatron_mel.rewards.verifier", "math_verify", module]
        self._ctx.set_forkserver_preload([*preload, "megatron_mel.rewards.forkserver_warmup"])
        self._workers = [self._spawn() for _ in range(max(1, num_workers))]

    @classmethod
    def from_config(cls, cfg: RewardConfig) -> RewardPool:
        return cls(cfg.function, num_workers=cfg.num_workers, timeout_s=cfg.timeout_s,
                   max_consecutive_failures=cfg.max_consecutive_failures)  # fmt: skip

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
        """Scores in input order; never waits past timeouts. Raises RewardFunctionError once
        the function has failed ``max_consecutive_failures`` times in a row (across calls),
        and RuntimeError if a task cannot be handed to any worker."""
        scores = [0.0] * len(items)
        labels = Counter()
        pending = list(range(len(items)))[::-1]
        send_attempts = Counter()
        busy: dict[Connection, _Worker] = {}
        while pending or busy:
            for worker in self._workers:
                if worker.task is None and pending:
                    task = pending.pop()
                    response, answer = items[task]
                    try:
                        worker.conn.send((task, self.reward_fn, response, answer))
                    except (BrokenPipeError, OSError) as exc:
                        # The task never reached the function: hand it to a fresh worker.
                        send_attempts[task] += 1
                        labels["send_retries"] += 1
                        if send_attempts[task] >= MAX_SEND_ATTEMPTS:
                            raise RuntimeError(
                                f"reward check {task} could not be sent to a worker "
                                f"{MAX_SEND_ATTEMPTS} times ({type(exc).__name__}: {exc})"
                            ) from exc
                        pending.append(task)
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
                    task, score, label, failure = conn.recv()
                    scores[task] = score
                    labels[label] += 1
                    worker.task = None
                except (EOFError, OSError):  # the worker died mid-check
                    labels["crashes"] += 1
                    label, failure = "crashes", "the worker process died during the call"
                    self._replace(worker)
                self._note_outcome(failure)
            now = time.monotonic()
            for conn, worker in list(busy.items()):
                if worker.deadline <= now:
                    busy.pop(conn)
                    labels["timeouts"] += 1
                    self._replace(worker)
        labels["checks"] = len(items)
        self.stats.last = labels
        self.stats.total.update(labels)
        self._raise_if_broken()
        return scores

    def _note_outcome(self, failure: str | None) -> None:
        if failure is None:
            self._failures_in_a_row, self._first_failure = 0, None
            return
        self._failures_in_a_row += 1
        if self._first_failure is None:
            self._first_failure = failure

    def _raise_if_broken(self) -> None:
        limit = self.max_consecutive_failures
        if limit and self._failures_in_a_row >= limit:
            raise RewardFunctionError(
                f"reward function {self.reward_fn} failed on {self._failures_in_a_row} "
                f"consecutive calls (reward.max_consecutive_failures={limit}); first failure: "
                f"{self._first_failure}"
            )

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
