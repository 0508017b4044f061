"""Equivalence cases for the fused loss, shared by the torch and Triton (interpreter) tests.

Each case builds inputs deterministically; ``check_case`` runs one implementation and the naive
full-logits reference and returns the worst relative error of loss, logprobs, entropy,
d_hidden and d_weight. Cases with ``padding`` append that many rows to the output weight (random,
not zero, so a leak into the softmax would show) and pass the true ``vocab_size``: the fused
loss must equal the reference over the real rows only and leave the padded rows' gradient 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from megatron_mel.algorithms.token_loss import TokenLossParams
from megatron_mel.ops import fused_combined_loss
from megatron_mel.ops.reference import reference_combined_loss


@dataclass(frozen=True)
class Case:
    name: str
    tokens: int = 24
    hidden: int = 32
    vocab: int = 1003
    dtype: torch.dtype = torch.float32
    kinds: tuple[int, ...] = (0, 1, 2)
    tied: bool = False
    wide_ratios: bool = False
    padding: int = 0
    """Padded vocabulary rows appended to the output weight (model.vocab_padding_multiple)."""
    kwargs: tuple = ()
    """TokenLossParams fields of the case, as (name, value) pairs."""

    def params(self) -> TokenLossParams:
        return TokenLossParams(**dict(self.kwargs))


CASES = (
    Case("vocab-49157", tokens=12, hidden=16, vocab=49157),
    Case("mixed"),
    Case("only-pg", kinds=(1,)),
    Case("only-nll", kinds=(2,)),
    Case("empty", tokens=0),
    Case("all-ignored", kinds=(0,)),
    Case("clip-both-sides", kinds=(1,), wide_ratios=True, kwargs=(("clip_low", 0.2), ("clip_high", 0.28))),
    Case("dual-clip-kl-entropy", wide_ratios=True,
         kwargs=(("dual_clip", 3.0), ("kl_coef", 0.05), ("entropy_coef", 0.01))),
    Case("tied-embeddings", tied=True),
    Case("bf16", dtype=torch.bfloat16),
    Case("padded-vocab", vocab=1000, padding=24, kinds=(1, 2),
         kwargs=(("entropy_coef", 0.01),)),
    Case("padded-vocab-tied", vocab=1000, padding=24, tied=True),
)  # fmt: skip


def build(case: Case, seed: int = 0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    t, h, v = case.tokens, case.hidden, case.vocab
    weight = (torch.randn(v, h, generator=gen) * 0.5).to(case.dtype)
    ids = torch.randint(0, v, (t,), generator=gen)
    proj = torch.randn(h, h, generator=gen).to(case.dtype) * 0.3
    kinds = torch.tensor(case.kinds, dtype=torch.int8)
    loss_type = kinds[torch.randint(0, len(case.kinds), (t,), generator=gen)]
    with torch.no_grad():
        logits = (torch.randn(t, h, generator=gen).to(case.dtype) @ weight.t()).float()
        logp = torch.log_softmax(logits, -1)
    labels = torch.randint(0, v, (t,), generator=gen)
    spread = 1.0 if case.wide_ratios else 0.05
    old = logp.gather(1, labels[:, None])[:, 0] + torch.randn(t, generator=gen) * spread
    if case.padding:  # drawn last, so the real part of every case is the same as without
        pad_rows = torch.randn(case.padding, h, generator=gen) * 0.5
        weight = torch.cat([weight, pad_rows.to(case.dtype)])
    return {
        "weight": weight,
        "ids": ids,
        "proj": proj,
        "labels": labels,
        "loss_type": loss_type,
        "token_weight": torch.rand(t, generator=gen) + 0.1,
        "advantages": torch.randn(t, generator=gen),
        "old_logprobs": old,
        "ref_logprobs": old + torch.randn(t, generator=gen) * 0.1,
        "hidden_seed": torch.randn(t, h, generator=gen).to(case.dtype),
    }


def _run(fn, case: Case, data: dict, **extra) -> tuple:
    """Run one implementation; tied: the output weight also embeds the inputs (two grad paths)."""
    weight = data["weight"].clone().requires_grad_(True)
    base = data["hidden_seed"].clone().requires_grad_(True)
    hidden = base + weight[data["ids"]] @ data["proj"] if case.tied else base
    params = case.params()
    ref = data["ref_logprobs"] if params.kl_coef else None
    out = fn(hidden, weight, data["labels"], data["loss_type"], data["token_weight"],
             data["advantages"], data["old_logprobs"], params, ref_logprobs=ref, **extra)  # fmt: skip
    loss, logprobs = out[0], out[1]
    entropy = out.entropy if hasattr(out, "entropy") else out[2]
    d_base, d_weight = torch.autograd.grad(loss, (base, weight), allow_unused=True)
    return loss, logprobs, entropy, d_base, d_weight


def rel_err(a: torch.Tensor | None, b: torch.Tensor | None) -> float:
    if a is None or b is None:
        return 0.0 if a is None and b is None else float("inf")
    a, b = a.float(), b.float()
    if b.numel() == 0:
        return 0.0 if a.numel() == 0 else float("inf")
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def check_case(case: Case, **extra) -> dict[str, float]:
    data = build(case)
    if case.padding:
        extra["vocab_size"] = case.vocab
    got = _run(fused_combined_loss, case, data, chunk_bytes=4 * case.vocab * 5, **extra)
    # The reference sees the real rows only: what transformers and the engines compute.
    ref = _run(reference_combined_loss, case, {**data, "weight": data["weight"][: case.vocab]})
    names = ("loss", "logprobs", "entropy", "d_hidden", "d_weight")
    errors = {name: rel_err(g, r) for name, g, r in zip(names, got[:4], ref[:4])}
    d_weight = got[4]
    errors["d_weight"] = rel_err(None if d_weight is None else d_weight[: case.vocab], ref[4])
    if case.padding:  # an absolute check: padded rows must receive exactly no gradient
        errors["padding_grad"] = float(d_weight[case.vocab :].abs().max())
    return errors


def tolerance(case: Case) -> float:
    return 2e-2 if case.dtype == torch.bfloat16 else 1e-5
