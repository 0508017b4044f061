"""The loss-function interface the actor calls on the last pipeline stage, and its implementation.

Contract of :class:`LossFunction` (normalisation ``"global-token-weights"``): the returned loss
is a plain sum over the micro-batch's tokens of ``token_weight * l_t``, where the token weights
already hold every denominator of the global batch (algorithms/aggregation.py). The actor
therefore sums losses and gradients over micro-batches and data-parallel ranks and never
averages; a loss that normalised by its own micro-batch would break micro-batch and DP
invariance, which is why the normalisation is declared, not assumed.

Metrics stay on the device: one tensor of sums (:data:`METRICS` order) per micro-batch, which
the actor reads once, together with the loss and the log-probs, after the schedule.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_mel.algorithms.token_loss import NLL, PG, TokenLossParams
from megatron_mel.config import AlgorithmConfig
from megatron_mel.data.packing import TrainMicroBatch
from megatron_mel.ops import fused_combined_loss

METRICS = ("pg_loss_sum", "nll_loss_sum", "pg_tokens", "nll_tokens", "entropy_sum",
           "clipped_tokens")  # fmt: skip
"""The sums and counts of :class:`LossOutput.metrics`, in order (they add up over
micro-batches and ranks)."""


class LossOutput(NamedTuple):
    loss: Tensor
    """Scalar to backpropagate."""
    metrics: Tensor
    """[len(METRICS)] float, detached, on the device."""
    token_logprobs: Tensor
    """[t] detached log-probs of the labels (0 on ignored tokens)."""


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
    ) -> LossOutput:
        """``hidden`` [t, H]; ``weight`` [V_shard, H]; see LossOutput."""


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
    ) -> LossOutput:
        out = fused_combined_loss(
            hidden, weight, batch.labels, batch.loss_type, batch.token_weight, batch.advantages,
            batch.old_logprobs, self.params, ref_logprobs=batch.ref_logprobs,
            vocab_size=self.vocab_size, tp_group=tp_group, kernels=self.kernels,
        )  # fmt: skip
        pg = batch.loss_type == PG
        nll = batch.loss_type == NLL
        with torch.no_grad():
            metrics = torch.stack([
                (out.token_loss * pg).sum(), (out.token_loss * nll).sum(), pg.sum(), nll.sum(),
                (out.entropy * pg).sum(), out.clipped.sum(),
            ]).double()  # fmt: skip
        return LossOutput(out.loss, metrics, out.logprobs)


def make_loss(algorithm: AlgorithmConfig, vocab_size: int, kernels: str = "auto") -> LossFunction:
    """The loss for ``algorithm`` (every algorithm shares the combined loss; they differ in
    advantages and in which tokens are PG or NLL)."""
    return CombinedPolicyLoss(TokenLossParams.from_config(algorithm), vocab_size, kernels)
