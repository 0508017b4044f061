"""Checks of the Triton logit kernels against the torch ones, run under the Triton interpreter.

Run by tests/unit/test_triton_kernels.py in a subprocess with TRITON_INTERPRET=1, because the
interpreter is chosen when triton decorates the kernels, i.e. on first import:

    TRITON_INTERPRET=1 python tests/unit/triton_interp_checks.py {row_stats,logit_grad,edges,fused}

Each check raises on a mismatch and prints "ok <check>" on success. Shapes stay small: the
interpreter is ~100x slower than torch.
"""

from __future__ import annotations

import os
import sys

if os.environ.get("TRITON_INTERPRET") != "1":  # must hold before triton is imported below
    raise SystemExit("run with TRITON_INTERPRET=1")

import torch

from megatron_mel.algorithms.token_loss import TokenLossParams
from megatron_mel.ops.fused_loss import fused_combined_loss
from megatron_mel.ops.logit_kernels import TorchLogitKernels
from megatron_mel.ops.triton_kernels import TritonLogitKernels

RTOL = 1e-5
TORCH = TorchLogitKernels()


def close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    # Relative to the tensor's scale: entries near 0 (tiny p_j) have no meaningful own rtol.
    atol = RTOL * float(expected.detach().abs().max()) if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=RTOL, atol=atol, msg=lambda m: f"{what}: {m}")


def make_logits(rows: int, vocab: int, gen: torch.Generator, *, big: bool = False) -> torch.Tensor:
    z = torch.randn(rows, vocab, generator=gen) * 4.0
    if big and rows >= 4:
        # ±80 logits: exp(80) overflows fp32 without max-subtraction. Row 0 grows along the
        # vocab (the running max is rescaled on every tile), row 1 peaks in the last tile,
        # row 2 in the first, row 3 is a large-magnitude random row.
        z[0] = torch.linspace(-80.0, 80.0, vocab)
        z[1].clamp_(-5, 5)[-1] = 80.0
        z[2].clamp_(-5, 5)[0] = 80.0
        z[3] = (torch.rand(vocab, generator=gen) * 160.0 - 80.0).round()
    return z


def make_labels(rows: int, vocab: int, vocab_start: int, gen: torch.Generator) -> torch.Tensor:
    """Global labels: cycling owned / below the shard / above it, plus the shard's end points."""
    local = torch.randint(0, vocab, (rows,), generator=gen)
    labels = local + vocab_start
    for i in range(rows):
        kind = i % 5
        if kind == 1 and vocab_start > 0:
            labels[i] = int(torch.randint(0, vocab_start, (), generator=gen))  # below: not owned
        elif kind == 2:
            labels[i] = vocab_start + vocab + int(local[i])  # above: not owned
        elif kind == 3:
            labels[i] = vocab_start + vocab - 1  # last owned id (the masked tail's edge)
        elif kind == 4:
            labels[i] = vocab_start  # first owned id
    return labels


def grad_inputs(z: torch.Tensor, labels: torch.Tensor, vocab_start: int, gen: torch.Generator):
    m, s, zs, _ = TORCH.row_stats(z, labels, vocab_start)
    lse = m + torch.log(s)
    ent = lse - zs / s
    coef_logp = torch.randn(z.shape[0], generator=gen)
    coef_ent = torch.randn(z.shape[0], generator=gen)
    coef_ent[::3] = 0.0  # rows without an entropy term
    return lse, ent, coef_logp, coef_ent


CASES = [  # (rows, vocab, vocab_start, block_v override, big logits)
    (7, 1003, 0, None, False),
    (7, 1003, 500, None, True),
    (6, 4999, 1003, None, True),
    (5, 1003, 2006, 64, True),  # many tiles per row
    (5, 1003, 7, 2048, False),  # one tile wider than the row
    (1, 1003, 0, None, True),
    (3, 1, 10, None, False),  # a one-entry shard
]


def check_row_stats() -> None:
    gen = torch.Generator().manual_seed(0)
    for rows, vocab, start, block, big in CASES:
        z = make_logits(rows, vocab, gen, big=big)
        labels = make_labels(rows, vocab, start, gen)
        got = TritonLogitKernels(block_v=block).row_stats(z, labels, start)
        want = TORCH.row_stats(z, labels, start)
        where = f"rows={rows} V={vocab} start={start} block={block}"
        for name, a, b in zip(("m", "s", "label_logit"), got[:2] + got[3:], want[:2] + want[3:]):
            close(a, b, f"row_stats {name} {where}")
        # zs = sum exp(z - m) z cancels positive and negative terms, so its rounding error is
        # relative to sum exp(z - m) |z|, not to |zs|; summation order differs between the two.
        magnitude = (torch.exp(z - want[0][:, None]) * z.abs()).sum(1)
        torch.testing.assert_close(got[2], want[2], rtol=0, atol=RTOL * float(magnitude.max()),
                                   msg=lambda m, w=where: f"row_stats zs {w}: {m}")  # fmt: skip
        owned = (labels >= start) & (labels < start + vocab)
        assert torch.all(got[3][~owned] == 0), "unowned labels must give label_logit 0"


def check_logit_grad() -> None:
    gen = torch.Generator().manual_seed(1)
    for rows, vocab, start, block, big in CASES:
        z = make_logits(rows, vocab, gen, big=big)
        labels = make_labels(rows, vocab, start, gen)
        args = grad_inputs(z, labels, start, gen)
        got, want = z.clone(), z.clone()
        TritonLogitKernels(block_v=block).logit_grad_(got, labels, start, *args)
        TORCH.logit_grad_(want, labels, start, *args)
        close(got, want, f"logit_grad_ rows={rows} V={vocab} start={start} block={block}")


def check_edges() -> None:
    gen = torch.Generator().manual_seed(2)
    kernels = TritonLogitKernels()
    # Tc = 0: empty results, no launch.
    empty = torch.empty(0, 1003)
    no_labels = torch.empty(0, dtype=torch.int64)
    stats = kernels.row_stats(empty, no_labels, 0)
    assert all(t.shape == (0,) and t.dtype == torch.float32 for t in stats)
    kernels.logit_grad_(empty, no_labels, 0, *(torch.empty(0) for _ in range(4)))
    # A row stride wider than V (a column slice of a bigger buffer): padding stays untouched.
    rows, vocab, start = 4, 1003, 300
    buffer = make_logits(rows, vocab + 37, gen, big=True)
    z = buffer[:, :vocab]
    assert not z.is_contiguous()
    labels = make_labels(rows, vocab, start, gen)
    for a, b in zip(kernels.row_stats(z, labels, start), TORCH.row_stats(z, labels, start)):
        close(a, b, "row_stats strided")
    padding = buffer[:, vocab:].clone()
    args = grad_inputs(z, labels, start, gen)
    want = z.clone()
    TORCH.logit_grad_(want, labels, start, *args)
    kernels.logit_grad_(z, labels, start, *args)
    close(z, want, "logit_grad_ strided")
    assert torch.equal(buffer[:, vocab:], padding), "logit_grad_ wrote past the row"


def check_fused() -> None:
    gen = torch.Generator().manual_seed(3)
    num_tokens, hidden_size, vocab = 20, 16, 1003
    hidden0 = torch.randn(num_tokens, hidden_size, generator=gen)
    weight0 = torch.randn(vocab, hidden_size, generator=gen) * 0.5
    labels = torch.randint(0, vocab, (num_tokens,), generator=gen)
    loss_type = torch.tensor([0, 1, 2, 1, 1, 2, 0, 1, 2, 2, 1, 1, 0, 2, 1, 1, 2, 1, 0, 1])
    loss_type = loss_type.to(torch.int8)
    token_weight = torch.rand(num_tokens, generator=gen)
    advantages = torch.randn(num_tokens, generator=gen)
    old_logprobs = -torch.rand(num_tokens, generator=gen) * 8.0
    ref_logprobs = -torch.rand(num_tokens, generator=gen) * 8.0
    results = {}
    for name in ("torch", "triton"):
        hidden = hidden0.clone().requires_grad_(True)
        weight = weight0.clone().requires_grad_(True)
        out = fused_combined_loss(
            hidden, weight, labels, loss_type, token_weight, advantages, old_logprobs,
            TokenLossParams(kl_coef=0.1, entropy_coef=0.01), ref_logprobs=ref_logprobs,
            kernels=name,
            chunk_bytes=4 * vocab * 6,  # 6 rows a chunk: 15 active tokens -> 3 chunks
        )  # fmt: skip
        (out.loss * 1.5).backward()
        results[name] = (out.loss, out.logprobs, out.entropy, hidden.grad, weight.grad)
    names = ("loss", "logprobs", "entropy", "d_hidden", "d_weight")
    for what, a, b in zip(names, results["triton"], results["torch"]):
        close(a, b, f"fused {what}")


def check_reference_cases() -> None:
    """Every fused-loss equivalence case, with the Triton kernels, against the naive reference."""
    from tests.unit.loss_cases import CASES, check_case, tolerance

    for case in CASES:
        errors = check_case(case, kernels="triton")
        if max(errors.values()) > tolerance(case):
            raise AssertionError(f"{case.name}: {errors}")


CHECKS = {
    "reference_cases": check_reference_cases,
    "row_stats": check_row_stats,
    "logit_grad": check_logit_grad,
    "edges": check_edges,
    "fused": check_fused,
}

if __name__ == "__main__":
    for check in sys.argv[1:] or list(CHECKS):
        CHECKS[check]()
        print(f"ok {check}", flush=True)
