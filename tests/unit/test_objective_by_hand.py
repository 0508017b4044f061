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


# -- optional terms: KL k1/k2/k3, dual clip, entropy bonus, by hand ------------------------------
#
# Every expected value below is written out from the definitions (Schulman's estimators, the
# dual-clip rule of Ye et al. 2020), never computed with algorithms/token_loss.py. Log-ratios are
# ln 2 or ln 5 so the numbers are short: with x = log pi - log pi_ref = ln 2,
#   k1 = x = 0.693147..., k2 = x^2 / 2 = 0.240227..., k3 = e^{-x} + x - 1 = 0.5 + ln 2 - 1,
# and their derivatives in log pi: 1, x, 1 - e^{-x} = 0.5.
LN2, LN5 = math.log(2.0), math.log(5.0)


def _pg_token_loss(logp, old, adv, params, *, ref=None, entropy=None):
    f64 = torch.float64
    logp = torch.tensor(logp, dtype=f64, requires_grad=True)
    ent = torch.tensor(entropy if entropy is not None else [0.0] * len(old), dtype=f64,
                       requires_grad=True)  # fmt: skip
    n = len(old)
    loss, clipped = weighted_token_loss(
        logp, ent, torch.ones(n, dtype=torch.int8), torch.ones(n, dtype=f64),
        torch.tensor(adv, dtype=f64), torch.tensor(old, dtype=f64), params,
        None if ref is None else torch.tensor(ref, dtype=f64),
    )  # fmt: skip
    d_logp, d_ent = torch.autograd.grad(loss.sum(), (logp, ent), allow_unused=True)
    return loss.tolist(), clipped.tolist(), d_logp.tolist(), d_ent


@pytest.mark.parametrize(
    ("kind", "kl", "d_kl"),
    [("k1", LN2, 1.0), ("k2", 0.5 * LN2 * LN2, LN2), ("k3", 0.5 + LN2 - 1.0, 0.5)],
)
def test_kl_estimators_by_hand(kind, kl, d_kl):
    # One token with rho = 1 (log pi = log pi_old = -1) and A = 1: the surrogate is -1 and its
    # derivative in log pi is -A * rho = -1. The reference is ln 2 below log pi.
    params = TokenLossParams(kl_coef=0.1, kl_type=kind)
    loss, _, d_logp, _ = _pg_token_loss([-1.0], [-1.0], [1.0], params, ref=[-1.0 - LN2])
    assert loss[0] == pytest.approx(-1.0 + 0.1 * kl, rel=1e-12)
    assert d_logp[0] == pytest.approx(-1.0 + 0.1 * d_kl, rel=1e-12)


def test_dual_clip_by_hand():
    # clip 0.2, dual clip c = 3. Token 0: A = -1, rho = 5: the PPO loss is max(5, 1.2) = 5, and
    # dual clip caps it at -c A = 3 (zero gradient). Token 1: A = -1, rho = 2: max(2, 1.2) = 2 is
    # below 3, unchanged, gradient -A rho = 2. Token 2: A = +1, rho = 5: max(-5, -1.2) = -1.2
    # (upper clip, zero gradient); dual clip never touches positive advantages.
    params = TokenLossParams(clip_low=0.2, clip_high=0.2, dual_clip=3.0)
    old = [-3.0, -3.0, -3.0]
    logp = [-3.0 + LN5, -3.0 + LN2, -3.0 + LN5]
    loss, clipped, d_logp, _ = _pg_token_loss(logp, old, [-1.0, -1.0, 1.0], params)
    assert loss == pytest.approx([3.0, 2.0, -1.2], rel=1e-12)
    assert clipped == [True, False, True]
    assert d_logp == pytest.approx([0.0, 2.0, 0.0], abs=1e-12)
    # Without the dual clip token 0 keeps its unbounded PPO loss of 5.
    loss, *_ = _pg_token_loss(logp, old, [-1.0, -1.0, 1.0], TokenLossParams())
    assert loss == pytest.approx([5.0, 2.0, -1.2], rel=1e-12)


def test_entropy_bonus_by_hand_through_the_fused_loss():
    """Two-word vocabulary with logits (ln 3, 0): p = (3/4, 1/4), so log pi(word 0) = ln 3/4 and
    H = -(3/4 ln 3/4 + 1/4 ln 1/4) = 0.562335...; one PG token with A = 1 and rho = 1, entropy
    bonus 0.1 and a k3 KL (coef 0.1) to a reference ln 2 below: l = -1 + 0.1 k3 - 0.1 H.
    The fused loss computes logits in fp32, hence the 1e-6 tolerance."""
    from megatron_mel.ops import fused_combined_loss

    entropy = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    logp = math.log(0.75)
    hidden = torch.ones(1, 1, dtype=torch.float64, requires_grad=True)
    weight = torch.tensor([[math.log(3.0)], [0.0]], dtype=torch.float64, requires_grad=True)
    out = fused_combined_loss(
        hidden, weight, torch.tensor([0]), torch.tensor([1], dtype=torch.int8),
        torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64),
        torch.tensor([logp], dtype=torch.float64),
        TokenLossParams(entropy_coef=0.1, kl_coef=0.1, kl_type="k3"),
        ref_logprobs=torch.tensor([logp - LN2], dtype=torch.float64),
    )  # fmt: skip
    assert float(out.logprobs[0]) == pytest.approx(logp, rel=1e-6)
    assert float(out.entropy[0]) == pytest.approx(entropy, rel=1e-6)
    assert float(out.loss) == pytest.approx(-1.0 + 0.1 * (0.5 + LN2 - 1.0) - 0.1 * entropy,
                                            rel=1e-6)  # fmt: skip
    # d l / d z0 by hand: c (1 - p0) - e p0 (log p0 + H) with c = d l/d log pi = -1 + 0.1 * 0.5
    # and e = d l/dH = -0.1; hidden = 1, so d l/d W[0] = d l/d z0.
    c, e = -1.0 + 0.05, -0.1
    dz0 = c * 0.25 - e * 0.75 * (logp + entropy)
    (d_weight,) = torch.autograd.grad(out.loss, weight)
    assert float(d_weight[0, 0]) == pytest.approx(dz0, rel=1e-6)
