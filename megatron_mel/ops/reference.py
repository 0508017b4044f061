"""Naive full-logits implementation of the combined loss, for tests and benchmarks only.

It materialises fp32 logits [T, V] for the whole pack and lets autograd differentiate
log_softmax; it is the definition the fused paths are checked against, not a production path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_mel.algorithms.token_loss import IGNORE, TokenLossParams, weighted_token_loss


def reference_combined_loss(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    loss_type: Tensor,
    token_weight: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None,
    params: TokenLossParams = TokenLossParams(),  # noqa: B008 (frozen: shared safely)
    *,
    ref_logprobs: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(loss, logprobs, entropy, clipped) with ``weight`` the full [V, H] output weight."""
    logits = torch.matmul(hidden, weight.t()).float()  # [T, V]
    log_probs = torch.log_softmax(logits, dim=-1)
    active = loss_type != IGNORE
    safe_labels = torch.where(active, labels, torch.zeros_like(labels))
    logp = log_probs.gather(1, safe_labels[:, None])[:, 0]
    entropy = -(log_probs.exp() * log_probs).sum(dim=-1)
    token_loss, clipped = weighted_token_loss(
        logp, entropy, loss_type, token_weight.float(), advantages.float(),
        None if old_logprobs is None else old_logprobs.float(), params, None if ref_logprobs is None else ref_logprobs.float(),
    )  # fmt: skip
    zero = torch.zeros_like(logp)
    return (
        token_loss.sum(),
        torch.where(active, logp, zero).detach(),
        torch.where(active, entropy, zero).detach(),
        clipped,
    )
