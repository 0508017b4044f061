"""Per-token losses of the combined objective, as differentiable functions of log pi(token).

One implementation serves everything: the naive full-logits reference differentiates through it
with autograd, and the fused kernel (ops/) evaluates it on the per-token log-probs and takes its
derivative with respect to them (a [T]-sized autograd call), then applies that coefficient to the
logits in one pass. So the two paths cannot disagree on the formula.

Token kinds (``loss_type``): 0 ignored, 1 policy gradient (PG), 2 negative log-likelihood (NLL).

PG (MEL.md step 7, the clipped surrogate of Eq. 10 per token), with rho = exp(logp - old):

    l_t = -min(rho A, clip(rho, 1 - clip_low, 1 + clip_high) A)
    dual clip (c > 1, A < 0 only):  l_t = min(l_t, -c A)
    + kl_coef * KL_t(logp, ref)  (k1 = logp - ref, k2 = (logp - ref)^2 / 2,
                                   k3 = exp(ref - logp) - (ref - logp) - 1, the "low-var" KL)
    - entropy_coef * H_t

NLL (Eq. 7 per token):  l_t = -logp.

On-policy PG (``old_logprobs=None``): pi_old is the current policy itself, i.e. old = logp
detached, so rho = 1 in value while its gradient is that of logp. This is the single update of
a batch (MEL.md step 7, "rho = 1 at the update"): the behaviour log-probs then need no separate
forward, they are the training forward's own values.

The returned value is ``token_weight * l_t``: aggregation (token-mean, seq-mean-token-mean, ...)
and the global denominators live entirely in ``token_weight`` (see aggregation.py), so the batch
loss is a plain sum and does not depend on how tokens are split into micro-batches or ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_mel.config import AlgorithmConfig

IGNORE, PG, NLL = 0, 1, 2


@dataclass(frozen=True, slots=True)
class TokenLossParams:
    """The per-token loss settings of the algorithm section, passed as one object from the
    config to the kernels (fused and reference)."""

    clip_low: float = 0.2
    clip_high: float = 0.2
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_type: str = "k3"
    entropy_coef: float = 0.0

    @classmethod
    def from_config(cls, algorithm: AlgorithmConfig) -> TokenLossParams:
        return cls(clip_low=algorithm.clip_low, clip_high=algorithm.clip_high,
                   dual_clip=algorithm.dual_clip, kl_coef=algorithm.kl_coef,
                   kl_type=algorithm.kl_type, entropy_coef=algorithm.entropy_coef)  # fmt: skip


def kl_estimate(logp: Tensor, ref_logp: Tensor, kind: str) -> Tensor:
    """Per-token estimate of KL(pi || pi_ref) from log-probs of the sampled token."""
    log_ratio = logp - ref_logp
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.square()
    if kind == "k3":
        # exp(-x) - 1 + x with x = logp - ref: non-negative, unbiased, low variance (Schulman).
        neg = -log_ratio
        return torch.exp(neg) - neg - 1.0
    raise ValueError(f"kl_type must be k1, k2 or k3, got {kind!r}")


def weighted_token_loss(
    logp: Tensor,
    entropy: Tensor,
    loss_type: Tensor,
    token_weight: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None,
    params: TokenLossParams,
    ref_logprobs: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``token_weight * l_t`` per token (zero for ignored tokens) and the PG clip mask.

    All inputs are [T]; ``old_logprobs`` None means on-policy (module docstring). ``clipped``
    marks PG tokens where the clipped branch is the active one (its gradient is zero), for the
    clip-fraction metric.
    """
    pg = loss_type == PG
    nll = loss_type == NLL
    if old_logprobs is None:
        old_logprobs = logp.detach()
    # Ignored tokens may carry garbage log-probs; keep them out of exp() so no inf/nan leaks.
    safe_logp = torch.where(pg, logp, old_logprobs)
    ratio = torch.exp(safe_logp - old_logprobs)
    unclipped = -advantages * ratio
    clipped_ratio = torch.clamp(ratio, 1.0 - params.clip_low, 1.0 + params.clip_high)
    clipped_loss = -advantages * clipped_ratio
    pg_loss = torch.maximum(unclipped, clipped_loss)
    clipped = pg & (clipped_loss > unclipped)
    if params.dual_clip is not None:
        floor = -params.dual_clip * advantages
        dual = advantages < 0
        clipped = clipped | (pg & dual & (pg_loss > floor))
        pg_loss = torch.where(dual, torch.minimum(pg_loss, floor), pg_loss)
    if params.kl_coef:
        # The one check that a KL term has its reference: the KL applies to PG tokens only, so
        # tokens without any (a pack of NLL samples) need none. Reads the device only then.
        if ref_logprobs is not None:
            kl = kl_estimate(safe_logp, ref_logprobs, params.kl_type)
            pg_loss = pg_loss + params.kl_coef * kl
        elif bool(pg.any()):
            raise ValueError("kl_coef > 0 needs ref_logprobs (reference log-probs of PG tokens)")
    if params.entropy_coef:
        pg_loss = pg_loss - params.entropy_coef * entropy
    loss = torch.where(pg, pg_loss, torch.where(nll, -logp, torch.zeros_like(logp)))
    return token_weight * loss, clipped
