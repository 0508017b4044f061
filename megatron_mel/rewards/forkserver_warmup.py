"""Imported by the reward pool's forkserver (verifier.RewardPool), nowhere else.

math-verify builds its LaTeX parser and sympy's caches on first use: the first symbolic check in
a process takes ~0.3 s on an idle core and longer on a loaded one. A worker forked
before that paid it inside its first check's deadline, and a correct answer could score 0 as a
timeout. Importing this module runs that first use once, in the server, so every worker forks
with it done.
"""

from __future__ import annotations

import logging

from megatron_mel.rewards.verifier import math_reward

try:  # a forkserver preload that raises stops the server: a warm-up must never do that
    math_reward("\\boxed{\\frac{x+1}{2}}", "(1+x)/2")
except Exception as exc:  # warming is an optimisation, never a failure
    logging.getLogger(__name__).warning("reward warm-up failed: %s: %s", type(exc).__name__, exc)
