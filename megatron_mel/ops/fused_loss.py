"""The combined policy-gradient + meta-experience NLL loss, fused with the output layer.

    loss, logprobs = fused_combined_loss(hidden, weight, labels, loss_type, token_weight,
                                         advantages, old_logprobs, TokenLossParams(...),
                                         vocab_size=None, tp_group=None)

``loss = sum_t token_weight_t * l_t`` with l_t from algorithms/token_loss.py. The logits
``hidden @ weight.T`` are computed a chunk of tokens at a time and never exist for the whole
pack. Each chunk's GEMM runs in the model dtype (bf16 on GPU: the logits Megatron's output layer
and the rollout engines compute too) and its result is upcast to fp32; the softmax statistics,
log-probs, loss and gradient accumulation are fp32 from there on; with ``tp_group`` the weight is this rank's vocabulary shard and per-shard max /
sum-exp statistics are combined across the group (one MAX and one SUM all-reduce per chunk), the
label's logit coming from the rank that owns it.

Padded vocabulary. Megatron's output weight has ``model.vocab_padding_multiple``-padded rows
that no tokenizer emits and no rollout engine has; ``vocab_size`` (the true vocabulary) keeps
them out of the softmax entirely: each shard computes logits only for its rows below
``vocab_size`` (a leading slice of the weight, so no copy and a smaller GEMM), the padded rows
get exactly zero gradient, and the log-probs equal ``log_softmax`` over the real vocabulary as
transformers and the engines compute it. A shard made only of padding contributes nothing.

Gradients are computed in the forward pass, chunk by chunk, while the chunk's logits are at hand
(the loss is a scalar, so d loss / d logits is known up to the incoming gradient's scale):
three GEMMs per chunk (logits, d_hidden, d_weight) and no recomputation. d_hidden and d_weight
accumulate in fp32; d_hidden is all-reduced over ``tp_group`` so callers receive the full
gradient. Backward only scales them. Rows with ``loss_type == 0`` are dropped before any of this,
so long masked prompts (reflection contexts) cost nothing here. Under ``torch.no_grad`` (the
log-prob recompute) neither gradient buffer is allocated and only the logits GEMM runs, even
though the weight is a Parameter that requires grad.

Device-to-host reads: one for the input checks (batched), one for the active rows (the
chunking needs their count); the metrics of the output stay tensors until asked for.

Shapes: T tokens, H hidden, V vocabulary of this shard, Tc tokens of a chunk.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_mel import platform
from megatron_mel.algorithms.token_loss import IGNORE, NLL, PG, TokenLossParams, weighted_token_loss
from megatron_mel.ops.logit_kernels import LogitKernels, TorchLogitKernels

# fp32 logits of one chunk stay under this many bytes (several chunk-sized temporaries live at
# once, so the peak is a small multiple of it).
DEFAULT_CHUNK_BYTES = 128 * 2**20


class CombinedLossOutput(tuple):
    """``(loss, logprobs)``, unpackable as a pair, with metrics as attributes.

    * ``token_loss`` [T]: ``token_weight * l_t`` per token (0 on ignored tokens), detached;
    * ``entropy`` [T]: per-token entropy of pi (0 on ignored tokens), detached;
    * ``clipped`` [T] bool: PG tokens where the clipped branch is active;
    * ``clip_fraction``: clipped / PG tokens on this rank (0.0 without PG tokens);
    * ``num_pg_tokens``, ``num_nll_tokens``: counts on this rank.

    The last three read the device when asked (the training loss does not ask).
    """

    token_loss: Tensor
    entropy: Tensor
    clipped: Tensor
    loss_type: Tensor

    def __new__(
        cls, loss: Tensor, logprobs: Tensor, *, token_loss: Tensor, entropy: Tensor,
        clipped: Tensor, loss_type: Tensor,
    ) -> CombinedLossOutput:  # fmt: skip
        out = super().__new__(cls, (loss, logprobs))
        out.token_loss, out.entropy, out.clipped, out.loss_type = (
            token_loss, entropy, clipped, loss_type
        )  # fmt: skip
        return out

    @property
    def num_pg_tokens(self) -> int:
        return int((self.loss_type == PG).sum())

    @property
    def num_nll_tokens(self) -> int:
        return int((self.loss_type == NLL).sum())

    @property
    def clip_fraction(self) -> float:
        num_pg = self.num_pg_tokens
        return float(self.clipped.sum()) / num_pg if num_pg else 0.0

    @property
    def loss(self) -> Tensor:
        return self[0]

    @property
    def logprobs(self) -> Tensor:
        return self[1]


def fused_combined_loss(
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
    vocab_size: int | None = None,
    tp_group: dist.ProcessGroup | None = None,
    kernels: LogitKernels | str = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> CombinedLossOutput:
    """Sum over tokens of ``token_weight * l_t``; see the module docstring.

    Args:
        hidden: [T, H] float, last-stage hidden states of a packed micro-batch.
        weight: [V, H] output-layer weight (this TP rank's vocab shard), same dtype as hidden.
        labels: [T] int64 next-token ids in the global vocabulary.
        loss_type: [T] integer: 0 ignore, 1 policy gradient, 2 NLL.
        token_weight: [T] float, the per-token aggregation weight (global denominators included).
        advantages, old_logprobs: [T] float, used on PG tokens. ``old_logprobs`` None is
            on-policy: pi_old = the current policy, rho = 1 (algorithms/token_loss.py).
        params: clip range, dual clip, KL and entropy coefficients (algorithm.*).
        ref_logprobs: [T] float reference-policy log-probs; needed when ``params.kl_coef > 0``
            and there are PG tokens.
        vocab_size: the true vocabulary size; rows of the (global, unsharded) weight at or
            beyond it are padding and are left out of the softmax. None: every row is real.
        tp_group: vocabulary-parallel group over which ``weight`` is sharded (None: unsharded).
        kernels: "auto" (Triton on CUDA, torch otherwise), "torch", "triton", or an instance.

    Returns:
        CombinedLossOutput: ``(loss, logprobs)`` plus entropy / clip metrics (see its doc).
        ``logprobs`` is detached fp32, 0 on ignored tokens.
    """
    tp_size = dist.get_world_size(tp_group) if tp_group is not None else 1
    tp_rank = dist.get_rank(tp_group) if tp_group is not None else 0
    padded_vocab = weight.shape[0] * tp_size
    if vocab_size is None:
        vocab_size = padded_vocab
    if not 0 < vocab_size <= padded_vocab:
        raise ValueError(
            f"vocab_size must be in [1, {padded_vocab}] (the weight's rows x TP), got {vocab_size}"
        )
    _validate(hidden, weight, labels, loss_type, token_weight, advantages, old_logprobs,
              ref_logprobs, vocab_size=vocab_size)  # fmt: skip
    impl = resolve_kernels(kernels, hidden.device)
    # autograd.Function.apply takes tensors positionally: an empty one stands for "none".
    none = hidden.new_empty(0, dtype=torch.float32)
    old = old_logprobs if old_logprobs is not None else none
    ref = ref_logprobs if ref_logprobs is not None else none
    # Decided here: inside Function.forward grad mode is always off, and needs_input_grad says
    # True for a Parameter even under torch.no_grad.
    grad_enabled = torch.is_grad_enabled()
    loss, logprobs, entropy, clipped, token_loss = _FusedCombinedLoss.apply(
        hidden, weight, labels, loss_type, token_weight, advantages, old, ref,
        _Options(params, tp_group, tp_rank, impl, chunk_bytes, vocab_size, grad_enabled,
                 on_policy=old_logprobs is None, with_ref=ref_logprobs is not None),
    )  # fmt: skip
    return CombinedLossOutput(loss, logprobs, token_loss=token_loss, entropy=entropy,
                              clipped=clipped, loss_type=loss_type)  # fmt: skip


def resolve_kernels(kernels: LogitKernels | str, device: torch.device) -> LogitKernels:
    if not isinstance(kernels, str):
        return kernels
    if kernels == "torch" or (kernels == "auto" and device.type != "cuda"):
        return TorchLogitKernels()
    if kernels == "triton":
        from megatron_mel.ops.triton_kernels import TritonLogitKernels

        return TritonLogitKernels()
    if kernels == "auto":
        return _triton_or_torch()
    raise ValueError(f"kernels must be 'auto', 'torch' or 'triton', got {kernels!r}")


def _triton_or_torch() -> LogitKernels:
    """Triton kernels on CUDA when Triton imports; the torch kernels (same contract) otherwise,
    said once, so an old or broken Triton slows the loss down instead of stopping training."""
    global _TRITON_FALLBACK_WARNED
    try:
        from megatron_mel.ops.triton_kernels import TritonLogitKernels

        return TritonLogitKernels()
    except (ImportError, AttributeError, RuntimeError) as exc:
        if not _TRITON_FALLBACK_WARNED:
            warnings.warn(
                f"kernels='auto': Triton kernels unavailable ({type(exc).__name__}: {exc}); "
                "using the torch kernels",
                stacklevel=3,
            )
            _TRITON_FALLBACK_WARNED = True
        return TorchLogitKernels()


_TRITON_FALLBACK_WARNED = False


@dataclass(frozen=True, slots=True)
class _Options:
    params: TokenLossParams
    tp_group: dist.ProcessGroup | None
    tp_rank: int
    kernels: LogitKernels
    chunk_bytes: int
    vocab_size: int
    """True vocabulary size; global rows at or beyond it are padding."""
    grad_enabled: bool
    """Whether gradients were enabled where the loss was called (no buffers otherwise)."""
    on_policy: bool
    """No old_logprobs: pi_old is the current policy (the tensor passed is empty)."""
    with_ref: bool
    """ref_logprobs given (else the tensor passed is empty)."""


class _FusedCombinedLoss(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        hidden: Tensor,
        weight: Tensor,
        labels: Tensor,
        loss_type: Tensor,
        token_weight: Tensor,
        advantages: Tensor,
        old_logprobs: Tensor,
        ref_logprobs: Tensor,
        opts: _Options,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        num_tokens, hidden_size = hidden.shape
        vocab_shard = weight.shape[0]
        vocab_start = opts.tp_rank * vocab_shard
        # This shard's real rows: a leading slice (padding sits at the end of the vocabulary).
        num_real = min(vocab_shard, max(0, opts.vocab_size - vocab_start))
        real_weight = weight[:num_real]
        device = hidden.device
        need_dh = opts.grad_enabled and ctx.needs_input_grad[0]
        need_dw = opts.grad_enabled and ctx.needs_input_grad[1]

        logprobs = torch.zeros(num_tokens, dtype=torch.float32, device=device)
        entropy = torch.zeros_like(logprobs)
        clipped = torch.zeros(num_tokens, dtype=torch.bool, device=device)
        per_token = torch.zeros_like(logprobs)
        loss = torch.zeros((), dtype=torch.float32, device=device)
        d_hidden = (
            torch.zeros(num_tokens, hidden_size, dtype=torch.float32, device=device)
            if need_dh
            else None
        )
        d_weight = (
            torch.zeros(vocab_shard, hidden_size, dtype=torch.float32, device=device)
            if need_dw
            else None
        )

        active = (loss_type != IGNORE).nonzero(as_tuple=True)[0]
        # Every rank of the TP group must run the same number of chunks (collectives inside),
        # so the chunk size comes from the shard size, which all ranks share, not num_real.
        rows = max(1, opts.chunk_bytes // (4 * vocab_shard))
        num_chunks = math.ceil(active.numel() / rows)
        for chunk in range(num_chunks):
            idx = active[chunk * rows : (chunk + 1) * rows]
            h = hidden.index_select(0, idx)
            # [Tc, V] logits of the real rows: the model-dtype GEMM, upcast (module docstring).
            z = torch.matmul(h, real_weight.t()).float()
            lab = labels.index_select(0, idx)
            if num_real:
                m, s, zs, label_logit = opts.kernels.row_stats(z, lab, vocab_start)
            else:  # an all-padding shard: the neutral element of the shard merge
                m = torch.full((idx.numel(),), -math.inf, device=device)
                s, zs, label_logit = torch.zeros(3, idx.numel(), device=device)
            m, s, zs, label_logit = _combine_shards(m, s, zs, label_logit, opts.tp_group)
            lse = m + torch.log(s)
            logp = label_logit - lse
            ent = lse - zs / s
            with torch.enable_grad():
                logp_leaf = logp.detach().requires_grad_(True)
                ent_leaf = ent.detach().requires_grad_(True)
                token_loss, token_clipped = weighted_token_loss(
                    logp_leaf,
                    ent_leaf,
                    loss_type.index_select(0, idx),
                    token_weight.index_select(0, idx).float(),
                    advantages.index_select(0, idx).float(),
                    None if opts.on_policy else old_logprobs.index_select(0, idx).float(),
                    opts.params,
                    ref_logprobs.index_select(0, idx).float() if opts.with_ref else None,
                )
                chunk_loss = token_loss.sum()
                if need_dh or need_dw:
                    # Without an entropy term (or on chunks of only NLL tokens) a leaf may be
                    # unused: its coefficient is zero.
                    coef_logp, coef_ent = (
                        torch.zeros_like(leaf) if grad is None else grad
                        for leaf, grad in zip(
                            (logp_leaf, ent_leaf),
                            torch.autograd.grad(
                                chunk_loss, (logp_leaf, ent_leaf), allow_unused=True
                            ),
                        )
                    )
            loss += chunk_loss.detach()
            logprobs.index_copy_(0, idx, logp)
            entropy.index_copy_(0, idx, ent)
            clipped.index_copy_(0, idx, token_clipped)
            per_token.index_copy_(0, idx, token_loss.detach())
            if (need_dh or need_dw) and num_real:
                opts.kernels.logit_grad_(z, lab, vocab_start, lse, ent, coef_logp, coef_ent)
                dz = z.to(weight.dtype)
                if need_dh:
                    d_hidden.index_copy_(0, idx, torch.matmul(dz, real_weight).float())
                if need_dw:
                    # Padded rows keep their zero gradient.
                    if weight.dtype == torch.float32:
                        d_weight[:num_real].addmm_(dz.t(), h)
                    else:
                        d_weight[:num_real] += torch.matmul(dz.t(), h).float()
            del z
        if need_dh and opts.tp_group is not None:
            # Each shard saw only its slice of the vocabulary; the hidden state fed all of them.
            dist.all_reduce(
                platform.on_collective_device(d_hidden, opts.tp_group), group=opts.tp_group
            )
        ctx.save_for_backward(*(t for t in (d_hidden, d_weight) if t is not None))
        ctx.layout = (need_dh, need_dw, hidden.dtype, weight.dtype)
        ctx.mark_non_differentiable(logprobs, entropy, clipped, per_token)
        return loss, logprobs, entropy, clipped, per_token

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_: Tensor):  # type: ignore[override]
        need_dh, need_dw, hidden_dtype, weight_dtype = ctx.layout
        saved = list(ctx.saved_tensors)
        d_hidden = (saved.pop(0) * grad_loss).to(hidden_dtype) if need_dh else None
        d_weight = (saved.pop(0) * grad_loss).to(weight_dtype) if need_dw else None
        return d_hidden, d_weight, None, None, None, None, None, None, None


def _combine_shards(
    m: Tensor, s: Tensor, zs: Tensor, label_logit: Tensor, group: dist.ProcessGroup | None
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Merge per-shard softmax statistics into full-vocabulary ones (online log-sum-exp)."""
    if group is None:
        return m, s, zs, label_logit
    m_all = platform.on_collective_device(m.clone(), group)
    dist.all_reduce(m_all, op=dist.ReduceOp.MAX, group=group)
    scale = torch.exp(m - m_all)
    stacked = platform.on_collective_device(
        torch.stack([s * scale, zs * scale, label_logit]), group
    )
    dist.all_reduce(stacked, group=group)
    return m_all, stacked[0], stacked[1], stacked[2]


def _validate(
    hidden: Tensor,
    weight: Tensor,
    labels: Tensor,
    loss_type: Tensor,
    token_weight: Tensor,
    advantages: Tensor,
    old_logprobs: Tensor | None,
    ref_logprobs: Tensor | None,
    *,
    vocab_size: int,
) -> None:
    """Reject inputs that would otherwise produce silent NaNs or wrong gathers (the value
    checks are one device-to-host read; the details are computed only for an error)."""
    if hidden.dim() != 2 or weight.dim() != 2:
        raise ValueError(
            f"hidden must be [T, H] and weight [V, H]; got {tuple(hidden.shape)} and "
            f"{tuple(weight.shape)}"
        )
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"hidden size mismatch: hidden is {tuple(hidden.shape)}, weight {tuple(weight.shape)}"
        )
    if not hidden.is_floating_point() or hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden and weight must share one float dtype; got {hidden.dtype} and {weight.dtype}"
        )
    num_tokens = hidden.shape[0]
    per_token = {
        "labels": labels,
        "loss_type": loss_type,
        "token_weight": token_weight,
        "advantages": advantages,
    }
    if old_logprobs is not None:
        per_token["old_logprobs"] = old_logprobs
    if ref_logprobs is not None:
        per_token["ref_logprobs"] = ref_logprobs
    for name, tensor in per_token.items():
        if tensor.shape != (num_tokens,):
            raise ValueError(f"{name} must be [T] = [{num_tokens}], got {tuple(tensor.shape)}")
        if tensor.device != hidden.device:
            raise ValueError(f"{name} is on {tensor.device}, hidden on {hidden.device}")
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype}")
    if loss_type.is_floating_point() or loss_type.dtype == torch.bool:
        raise ValueError(f"loss_type must be an integer tensor (int8), got {loss_type.dtype}")
    for name in ("token_weight", "advantages", "old_logprobs", "ref_logprobs"):
        if name in per_token and not per_token[name].is_floating_point():
            raise ValueError(f"{name} must be floating point, got {per_token[name].dtype}")
    if num_tokens == 0:
        return
    active = loss_type != IGNORE
    checks = {
        "loss_type": (loss_type != IGNORE) & (loss_type != PG) & (loss_type != NLL),
        "labels": active & ((labels < 0) | (labels >= vocab_size)),
        **{
            name: active & ~torch.isfinite(per_token[name])
            for name in ("token_weight", "advantages", "old_logprobs")
            if name in per_token
        },
    }
    failed = dict(zip(checks, torch.stack([c.any() for c in checks.values()]).tolist()))
    if failed["loss_type"]:
        first = int(checks["loss_type"].nonzero()[0])
        raise ValueError(
            f"loss_type must be 0 (ignore), 1 (PG) or 2 (NLL); token {first} has "
            f"{int(loss_type[first])}"
        )
    if failed["labels"]:
        first = int(checks["labels"].nonzero()[0])
        raise ValueError(
            f"label {int(labels[first])} of token {first} is outside the vocabulary "
            f"[0, {vocab_size})"
        )
    for name in ("token_weight", "advantages", "old_logprobs"):
        if failed.get(name):
            raise ValueError(f"{name} has non-finite values on loss tokens")
