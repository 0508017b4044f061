"""The loss-function interface the actor calls on the last pipeline stage, and its implementation.

Contract of :class:`LossFunction` (normalisation ``"global-token-weights"``): the returned loss
is a plain sum over the micro-batch's tokens of ``token_weight * l_t``, where the token weights
already hold every denominator of the global batch (algorithms/aggregation.py). The actor
therefore sums losses and gradients over micro-batches and data-parallel ranks and never
averages; a loss that normalised by its own micro-batch would break micro-batch and DP
invariance, which is why the normalisation is declared, not assumed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_mel.algorithms.token_loss import NLL, PG, TokenLossParams
from megatron_mel.config import AlgorithmConfig
from megatron_mel.data.packing import TrainMicroBatch
from megatron_mel.ops import fused_combined_loss


class LossFunction(ABC):
    """Loss of one packed micro-batch from last-stage hidden states and the output weight."""

    normalization: ClassVar[str] = "global-token-weights"

    @abstractmethod
    def __call__(
        self,
        hidden: Tensor,
        weight: Tensor,
        batch: TrainMicroBatch,
        tp_group: dist.ProcessGroup | None,
    ) -> tuple[Tensor, dict[str, Any]]:
        """(loss, metrics). ``hidden`` [t, H]; ``weight`` [V_shard, H]; metrics are sums
        (``*_sum``) or counts over this micro-batch, so they add up across micro-batches, plus
        ``token_logprobs``: the detached [t] log-probs of the labels (0 on ignored tokens)."""


class CombinedPolicyLoss(LossFunction):
    """Clipped PG (+KL, +entropy) on PG tokens and NLL on NLL tokens, fused with the logits.

    ``vocab_size`` is the true vocabulary: the output weight's padding rows (to
    ``model.vocab_padding_multiple``) stay out of the softmax, as they are absent from the
    engines that sampled the tokens.
    """

    def __init__(self, params: TokenLossParams, vocab_size: int, kernels: str = "auto") -> None:
        self.params = params
        self.vocab_size = vocab_size
        self.kernels = kernels

    def __call__(
        self,
        hidden: Tensor,
        weight: Tensor,
        batch: TrainMicroBatch,
        tp_group: dist.ProcessGroup | None,
    ) -> tuple[Tensor, dict[str, Any]]:
        kl_coef = self.params.kl_coef
        if kl_coef and batch.ref_logprobs is None:
            if bool((batch.loss_type == PG).any()):
                raise ValueError("kl_coef > 0 but the micro-batch carries no reference log-probs")
            kl_coef = 0.0  # the KL term only applies to PG tokens, and this pack has none
        out = fused_combined_loss(
            hidden,
            weight,
            batch.labels,
            batch.loss_type,
            batch.token_weight,
            batch.advantages,
            batch.old_logprobs,
            clip_low=self.params.clip_low,
            clip_high=self.params.clip_high,
            dual_clip=self.params.dual_clip,
            kl_coef=kl_coef,
            kl_type=self.params.kl_type,
            ref_logprobs=batch.ref_logprobs,
            entropy_coef=self.params.entropy_coef,
            vocab_size=self.vocab_size,
            tp_group=tp_group,
            kernels=self.kernels,
        )
        pg = batch.loss_type == PG
        nll = batch.loss_type == NLL
        with torch.no_grad():
            metrics = {
                "pg_loss_sum": float((out.token_loss * pg).sum()),
                "nll_loss_sum": float((out.token_loss * nll).sum()),
                "pg_tokens": int(pg.sum()),
                "nll_tokens": int(nll.sum()),
                "entropy_sum": float((out.entropy * pg).sum()),
                "clipped_tokens": int(out.clipped.sum()),
                "token_logprobs": out.logprobs,
            }
        return out.loss, metrics


def make_loss(algorithm: AlgorithmConfig, vocab_size: int, kernels: str = "auto") -> LossFunction:
    """The loss for ``algorithm`` (every algorithm shares the combined loss; they differ in
    advantages and in which tokens are PG or NLL)."""
    params = TokenLossParams(
        clip_low=algorithm.clip_low,
        clip_high=algorithm.clip_high,
        dual_clip=algorithm.dual_clip,
        kl_coef=algorithm.kl_coef,
        kl_type=algorithm.kl_type,
        entropy_coef=algorithm.entropy_coef,
    )
    return CombinedPolicyLoss(params, vocab_size, kernels)
