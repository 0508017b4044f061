"""The two per-chunk logit primitives of the fused loss, in torch (CPU production path).

The fused loss (fused_loss.py) computes a chunk of logits ``z = hidden_chunk @ weight_shard.T``
and hands it to a :class:`LogitKernels` implementation:

* ``row_stats(z, labels, vocab_start)`` -> per row (m, s, zs, label_logit): the row max, the sum
  of exp(z - m), the sum of exp(z - m) * z, and the label's logit if this vocabulary shard owns
  the label (else 0). These combine across vocabulary shards (see fused_loss._combine_shards)
  into the log-sum-exp, the label log-prob and the entropy.
* ``logit_grad_(z, labels, vocab_start, lse, entropy, coef_logp, coef_ent)`` overwrites ``z``
  with d loss / d z given per-row coefficients c = d loss / d logp and e = d loss / d entropy:

      p = exp(z - lse)
      dz_j = c * (1[j == label] - p_j) - e * p_j * (z_j - lse + entropy)

The Triton kernels in triton_kernels.py implement the same two functions for GPUs (and run
under TRITON_INTERPRET=1 in the CPU tests). Shapes: Tc rows of the chunk, V vocab of the shard.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import Tensor


class LogitKernels(Protocol):
    """Per-chunk primitives of the fused loss; ``z`` is fp32 [Tc, V], contiguous."""

    name: str

    def row_stats(
        self, z: Tensor, labels: Tensor, vocab_start: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...

    def logit_grad_(
        self,
        z: Tensor,
        labels: Tensor,
        vocab_start: int,
        lse: Tensor,
        entropy: Tensor,
        coef_logp: Tensor,
        coef_ent: Tensor,
    ) -> None: ...


def local_label_index(labels: Tensor, vocab_start: int, vocab_size: int) -> tuple[Tensor, Tensor]:
    """(index into this shard, mask of rows whose label this shard owns)."""
    local = labels - vocab_start
    owned = (local >= 0) & (local < vocab_size)
    return torch.where(owned, local, torch.zeros_like(local)), owned


class TorchLogitKernels:
    """Reference-grade torch implementation; the CPU production path."""

    name = "torch"

    def row_stats(
        self, z: Tensor, labels: Tensor, vocab_start: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        m = z.amax(dim=1)
        e = torch.exp(z - m[:, None])
        s = e.sum(dim=1)
        zs = (e * z).sum(dim=1)
        index, owned = local_label_index(labels, vocab_start, z.shape[1])
        label_logit = torch.where(owned, z.gather(1, index[:, None])[:, 0], torch.zeros_like(m))
        return m, s, zs, label_logit

    def logit_grad_(
        self,
        z: Tensor,
        labels: Tensor,
        vocab_start: int,
        lse: Tensor,
        entropy: Tensor,
        coef_logp: Tensor,
        coef_ent: Tensor,
    ) -> None:
        index, owned = local_label_index(labels, vocab_start, z.shape[1])
        shifted = z.sub_(lse[:, None])  # z - lse, in place
        p = torch.exp(shifted)
        # dz = -c p - e p (z - lse + H) = -p * (c + e (z - lse + H))
        shifted.add_(entropy[:, None]).mul_(coef_ent[:, None]).add_(coef_logp[:, None]).mul_(p)
        shifted.neg_()
        shifted.scatter_add_(1, index[:, None], torch.where(owned, coef_logp, 0.0)[:, None])
