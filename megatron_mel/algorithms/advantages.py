"""Outcome advantages for groups of G responses to the same prompt.

Rewards arrive as [B, G] (B prompts, G samples each); every function returns one scalar
advantage per response, broadcast to its tokens by the packer.

* ``grpo`` (MEL.md step 3): A_i = (r_i - mean_G r) / (std_G r + eps). ``std_normalize=False`` drops
  the division (Dr.GRPO). std is the unbiased sample std, as in verl; a group with zero std (all
  correct or all wrong) gets A = 0 and contributes nothing to the PG term.
* ``rloo``: A_i = r_i - mean_{j != i} r_j (leave-one-out baseline).
* ``reinforce_pp`` (REINFORCE++ with a group baseline): A_i = r_i - mean_G r, then whitened over
  the whole batch, each response weighted by its token count (verl's token-level whitening).
"""

from __future__ import annotations

import torch
from torch import Tensor

EPS = 1e-6


def grpo_advantages(rewards: Tensor, *, std_normalize: bool = True, eps: float = EPS) -> Tensor:
    _check(rewards)
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    if not std_normalize:
        return centered
    if rewards.shape[1] < 2:
        return torch.zeros_like(rewards)
    std = rewards.std(dim=1, keepdim=True, unbiased=True)
    return centered / (std + eps)


def rloo_advantages(rewards: Tensor) -> Tensor:
    _check(rewards)
    group = rewards.shape[1]
    if group < 2:
        return torch.zeros_like(rewards)
    others_mean = (rewards.sum(dim=1, keepdim=True) - rewards) / (group - 1)
    return rewards - others_mean


def reinforce_pp_advantages(rewards: Tensor, num_tokens: Tensor, *, eps: float = EPS) -> Tensor:
    """Group-mean baseline, then whitening over all response tokens of the batch.

    ``num_tokens`` [B, G]: response lengths, the weight of each response in the whitening.
    """
    _check(rewards)
    if num_tokens.shape != rewards.shape:
        raise ValueError(f"num_tokens {tuple(num_tokens.shape)} != rewards {tuple(rewards.shape)}")
    centered = rewards - rewards.mean(dim=1, keepdim=True)
    weights = num_tokens.to(centered.dtype)
    total = weights.sum()
    if total <= 0:
        return torch.zeros_like(rewards)
    mean = (centered * weights).sum() / total
    var = ((centered - mean).square() * weights).sum() / total
    return (centered - mean) / (var.sqrt() + eps)


def compute_advantages(
    name: str, rewards: Tensor, *, num_tokens: Tensor | None = None, std_normalize: bool = True
) -> Tensor:
    """Dispatch on the estimator's config name (``algorithm.advantage``)."""
    if name == "grpo":
        return grpo_advantages(rewards, std_normalize=std_normalize)
    if name == "rloo":
        return rloo_advantages(rewards)
    if name == "reinforce_pp":
        if num_tokens is None:
            raise ValueError("reinforce_pp advantages need the response token counts")
        return reinforce_pp_advantages(rewards, num_tokens)
    raise ValueError(f"unknown advantage estimator {name!r} (grpo, rloo, reinforce_pp)")


def _check(rewards: Tensor) -> None:
    if rewards.dim() != 2 or rewards.shape[1] < 1:
        raise ValueError(f"rewards must be [B, G] with G >= 1, got {tuple(rewards.shape)}")
    if not torch.isfinite(rewards).all():
        raise ValueError("rewards contain non-finite values")
