"""Eq. 10 (clipped GRPO, seq-mean-token-mean) and Eq. 7 (meta-experience NLL) on a 2-prompt x
2-sample example worked out by hand, through advantages -> aggregation weights -> token losses."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_mel.algorithms.advantages import grpo_advantages
from megatron_mel.algorithms.aggregation import AggregationSpec, assign_token_weights
from megatron_mel.algorithms.token_loss import TokenLossParams, weighted_token_loss
from megatron_mel.data.packing import TrainSample

# Prompt A: rewards (1, 0); prompt B: rewards (1, 1).
# GRPO: A_A = (+-0.5) / (std_unbiased(1, 0) + 1e-6) = +-0.5 / (0.70710678 + 1e-6); A_B = 0.
A = 0.5 / (math.sqrt(0.5) + 1e-6)
# Per-token ratios rho = pi / pi_old of each response (lengths 2, 3, 1, 2).
RATIOS = ([1.5, 0.9], [0.5, 1.0, 1.3], [1.1], [0.7, 1.25])
CLIP = 0.2


def _tokens(n: int) -> list[int]:
    return [7] * (1 + n)  # one context token, then n targets


def _eq10_by_hand() -> float:
    # y_A1 (A > 0): min(1.5A, 1.2A) = 1.2A ; min(0.9A, 0.9A) = 0.9A -> mean 1.05A
    # y_A2 (A < 0): min(0.5(-A), 0.8(-A)) = -0.8A ; -1.0A ; min(1.3(-A), 1.2(-A)) = -1.3A
    #               -> mean -(0.8 + 1.0 + 1.3) A / 3
    # y_B1, y_B2: A = 0 -> 0.  Eq. 10 averages 1/G over samples and over the B = 2 prompts:
    objective = ((1.05 * A) + (-(0.8 + 1.0 + 1.3) * A / 3) + 0.0 + 0.0) / 4
    return -objective  # the loss is the negated objective


def _pg_samples() -> list[TrainSample]:
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    advantages = grpo_advantages(rewards).flatten().tolist()
    assert advantages == pytest.approx([A, -A, 0.0, 0.0], rel=1e-12)
    return [
        TrainSample(tokens=_tokens(len(r)), num_context=1, term="pg", advantage=adv,
                    old_logprobs=[-math.log(x) - 2.0 for x in r])
        for adv, r in zip(advantages, RATIOS)
    ]  # fmt: skip


def _loss(samples, logp_per_sample, spec) -> float:
    assign_token_weights(samples, spec)
    f64 = torch.float64  # the hand values are exact; keep rounding out of the comparison
    logp = torch.tensor([lp for lps in logp_per_sample for lp in lps], dtype=f64)
    kind = torch.tensor([s.loss_type for s in samples for _ in range(s.num_targets)])
    weight = torch.tensor(
        [s.token_weight for s in samples for _ in range(s.num_targets)], dtype=f64
    )
    adv = torch.tensor([s.advantage for s in samples for _ in range(s.num_targets)], dtype=f64)
    old = torch.tensor(
        [o for s in samples for o in (s.old_logprobs or [0.0] * s.num_targets)], dtype=f64
    )
    params = TokenLossParams(clip_low=CLIP, clip_high=CLIP)
    token_loss, _ = weighted_token_loss(logp, torch.zeros_like(logp), kind.to(torch.int8),
                                        weight, adv, old, params)  # fmt: skip
    return float(token_loss.sum())


def test_eq10_seq_mean_token_mean():
    samples = _pg_samples()
    # log pi = log pi_old + log rho  (pi_old = exp(-2) / rho, so log pi = -2)
    logp = [[-2.0] * len(r) for r in RATIOS]
    got = _loss(samples, logp, AggregationSpec(pg_mode="seq-mean-token-mean", num_prompts=2))
    assert got == pytest.approx(_eq10_by_hand(), rel=1e-6)


def test_token_mean_and_sum_norm_variants():
    samples = _pg_samples()
    logp = [[-2.0] * len(r) for r in RATIOS]
    # token-mean: every response token weighs 1/8 (8 response tokens in the batch).
    by_hand = -((1.2 + 0.9) * A + (-0.8 - 1.0 - 1.3) * A) / 8
    got = _loss(samples, logp, AggregationSpec(pg_mode="token-mean", num_prompts=2))
    assert got == pytest.approx(by_hand, rel=1e-6)
    # seq-mean-token-sum-norm with L = 4: token sums / 4, then mean over the 4 responses.
    by_hand = -((1.2 + 0.9) * A / 4 + (-0.8 - 1.0 - 1.3) * A / 4) / 4
    spec = AggregationSpec(pg_mode="seq-mean-token-sum-norm", sum_norm_length=4, num_prompts=2)
    assert _loss(samples, logp, spec) == pytest.approx(by_hand, rel=1e-6)


def _me_samples() -> list[TrainSample]:
    # Two kept meta-experiences of prompt A (lengths 2 and 3), none of prompt B.
    return [
        TrainSample(tokens=_tokens(2), num_context=1, term="me", group_size=2, prompt_id="A"),
        TrainSample(tokens=_tokens(3), num_context=1, term="me", group_size=2, prompt_id="A"),
    ]


ME_LOGP = [[-1.0, -3.0], [-0.5, -2.0, -0.5]]


def test_eq7_nll_per_meta_experience():
    # per_me: token mean within each M, then mean over the kept M: ((1+3)/2 + (0.5+2+0.5)/3) / 2
    by_hand = ((1.0 + 3.0) / 2 + (0.5 + 2.0 + 0.5) / 3) / 2
    spec = AggregationSpec(nll_mode="per_me", num_prompts=2)
    assert _loss(_me_samples(), ME_LOGP, spec) == pytest.approx(by_hand, rel=1e-6)


def test_eq7_nll_per_prompt_and_coefficient():
    # per_prompt: prompt A averages its 2 M, prompt B (no M) contributes 0; mean over B = 2.
    by_hand = 0.5 * ((((1.0 + 3.0) / 2 + (0.5 + 2.0 + 0.5) / 3) / 2) + 0.0) / 2
    spec = AggregationSpec(nll_mode="per_prompt", nll_coef=0.5, num_prompts=2)
    assert _loss(_me_samples(), ME_LOGP, spec) == pytest.approx(by_hand, rel=1e-6)


def test_combined_objective_is_the_sum_of_both_terms():
    samples = _pg_samples() + _me_samples()
    logp = [[-2.0] * len(r) for r in RATIOS] + ME_LOGP
    spec = AggregationSpec(num_prompts=2)
    by_hand = _eq10_by_hand() + ((1.0 + 3.0) / 2 + (0.5 + 2.0 + 0.5) / 3) / 2
    assert _loss(samples, logp, spec) == pytest.approx(by_hand, rel=1e-6)
