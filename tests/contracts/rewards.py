"""Reference implementations of the RewardFn hook (megatron_mel/hooks.py), loaded by path."""

from __future__ import annotations

import os


def exact_match(response: str, answer: str) -> float:
    return float(response.strip() == answer.strip())


def crash_on_boom(response: str, answer: str) -> float:
    """Kills its worker process on "boom" (a segfaulting native extension, say)."""
    if response == "boom":
        os._exit(13)
    return 1.0


def wrong_arity(response: str) -> float:
    return 0.0


def even_length(response: str, answer: str) -> tuple[float, str]:
    """Marks a response correct when its text has even length: a verifier the tests steer,
    so a random micro model still produces mixed groups, pairs and kept meta-experiences."""
    return (1.0, "correct") if len(response) % 2 == 0 else (0.0, "incorrect")


def slow_even_length(response: str, answer: str) -> tuple[float, str]:
    """:func:`even_length` taking 1 s per check: a step that lasts seconds whatever the load,
    so a test can signal a run in the middle of one."""
    import time

    time.sleep(1.0)
    return even_length(response, answer)


def always_raises(response: str, answer: str) -> float:
    """A broken reward function (a typo in a field name, say): fails on every call."""
    raise KeyError(f"no field 'final' in {response[:10]!r}")


def returns_nan(response: str, answer: str) -> float:
    return float("nan")


def raises_on_odd_length(response: str, answer: str) -> float:
    """Fails on some inputs only: one-off failures that must not stop training."""
    if len(response) % 2:
        raise ValueError("odd")
    return 1.0


def latex_parser_warm(response: str, answer: str) -> float:
    """1.0 when math-verify's LaTeX parser (antlr) already holds prediction states before this
    check parses anything: the worker was forked from a reward server that ran a check first."""
    import sys

    parsers = [m.PSParser for name, m in list(sys.modules.items()) if name.endswith(".PSParser")]
    return float(any(sum(len(dfa._states) for dfa in p.decisionsToDFA) for p in parsers))
