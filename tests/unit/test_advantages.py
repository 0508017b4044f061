"""Advantage estimators on hand-checkable groups."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_mel.algorithms.advantages import compute_advantages, grpo_advantages


def test_grpo_standardises_within_group_and_zeroes_uniform_groups():
    adv = grpo_advantages(torch.tensor([[1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]))
    std = math.sqrt(1 / 3)  # unbiased std of (1, 0, 0, 1)
    a = 0.5 / (std + 1e-6)
    assert adv[0].tolist() == pytest.approx([a, -a, -a, a])
    assert torch.all(adv[1] == 0)


def test_grpo_without_std_is_mean_centred():
    adv = grpo_advantages(torch.tensor([[3.0, 1.0]]), std_normalize=False)
    assert adv.tolist() == [[1.0, -1.0]]


def test_rloo_leave_one_out():
    adv = compute_advantages("rloo", torch.tensor([[1.0, 0.0, 0.0]]))
    assert adv.tolist()[0] == pytest.approx([1.0, -0.5, -0.5])


def test_reinforce_pp_whitens_over_tokens():
    rewards = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    tokens = torch.tensor([[3, 1], [2, 2]])
    adv = compute_advantages("reinforce_pp", rewards, num_tokens=tokens)
    weights = tokens.flatten().float()
    assert float((adv.flatten() * weights).sum() / weights.sum()) == pytest.approx(0.0, abs=1e-6)
    var = float((adv.flatten().square() * weights).sum() / weights.sum())
    assert var == pytest.approx(1.0, rel=1e-4)
    with pytest.raises(ValueError, match="token counts"):
        compute_advantages("reinforce_pp", rewards)


def test_bad_rewards():
    with pytest.raises(ValueError, match=r"rewards must be \[B, G\]"):
        grpo_advantages(torch.ones(4))
    with pytest.raises(ValueError, match="non-finite"):
        grpo_advantages(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        compute_advantages("ppo", torch.ones(1, 2))
