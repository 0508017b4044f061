"""Triton kernels for the two per-chunk logit primitives of the fused loss (GPU path).

Same contract as :class:`megatron_mel.ops.logit_kernels.TorchLogitKernels`; the fused loss
(fused_loss.py) calls them on each chunk of logits ``z = float(hidden_chunk @ weight_shard.T)``
(the GEMM in the model dtype, upcast to fp32).

* ``row_stats``: one program per row streams the row once in BLOCK_V tiles and keeps an
  *online* softmax state: a scalar running max ``m`` and per-lane partial sums
  ``s = Σ exp(z - m)`` and ``zs = Σ exp(z - m) · z``. When a tile raises the max from ``m`` to
  ``m'`` the partial sums are rescaled by ``exp(m - m')`` first, so every exponent stays <= 0
  (no overflow at any logit magnitude) and the row is read from memory exactly once, where the
  naive form (max pass, then exp pass) reads it twice. The label's logit is one extra scalar
  load, masked off when this vocabulary shard does not own the label.
* ``logit_grad_``: overwrites ``z`` with d loss / d z. With p_j = exp(z_j - lse) and per-row
  c = d loss / d logp, e = d loss / d entropy::

      dz_j = c · (1[j == label] - p_j) - e · p_j · (z_j - lse + entropy)

  (d logp / dz_j = 1[j == label] - p_j; d entropy / dz_j = -p_j (log p_j + entropy)). Every
  element is independent, so the grid is 2-D (row, tile): short chunks still fill the GPU.

Shapes: Tc rows of the chunk, V vocabulary of this shard (any size: tails are masked).
``z`` fp32 [Tc, V] with unit column stride (the row stride is passed), ``labels`` int64 [Tc]
in the global vocabulary, shard-local id = label - vocab_start; per-row vectors fp32 [Tc].

Triton needs a CUDA device; with TRITON_INTERPRET=1 set before triton is imported the same
kernels run on CPU tensors in the interpreter (the unit tests do this).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError as exc:  # the torch kernels remain usable without triton
    raise ImportError(
        "megatron_mel.ops.triton_kernels needs the `triton` package; install it or use "
        "kernels='torch'"
    ) from exc


def interpreter_mode(module: object = triton, environ: dict[str, str] | None = None) -> bool:
    """Whether ``triton.jit`` runs kernels in the CPU interpreter.

    ``triton.knobs`` exists from Triton 3.4; older releases read ``TRITON_INTERPRET`` from the
    environment directly, and reading ``triton.knobs`` there raises AttributeError.
    """
    knobs = getattr(module, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    value = (os.environ if environ is None else environ).get("TRITON_INTERPRET", "0")
    return value.strip().lower() in ("1", "true", "on", "yes")


# jit decides interpreter vs compiler when the kernels below are decorated, so this is the
# mode they will actually run in, whatever the environment says later.
_INTERPRETED = interpreter_mode()

DEVICE_ERROR = "Triton kernels need a CUDA device, or TRITON_INTERPRET=1 for the interpreter"


@triton.jit
def _row_stats_kernel(
    z_ptr,
    labels_ptr,
    m_ptr,
    s_ptr,
    zs_ptr,
    label_logit_ptr,
    stride_row,
    V,
    vocab_start,
    BLOCK_V: tl.constexpr,
):
    # int64 row offset: Tc * V overflows int32 for large chunks of large vocabularies.
    row = tl.program_id(0).to(tl.int64)
    z_row = z_ptr + row * stride_row
    cols = tl.arange(0, BLOCK_V)
    m = tl.full([], float("-inf"), tl.float32)
    # Lane-wise partial sums: one tree reduction at the end instead of two per tile.
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    zs = tl.zeros([BLOCK_V], dtype=tl.float32)
    for start in tl.range(0, V, BLOCK_V):
        offs = start + cols
        mask = offs < V
        x = tl.load(z_row + offs, mask=mask, other=float("-inf"))
        # Every tile holds >= 1 real logit, so m_new is finite and no inf - inf occurs.
        m_new = tl.maximum(m, tl.max(x, axis=0))
        alpha = tl.exp(m - m_new)  # 0 on the first tile (m = -inf), 1 when the max holds
        p = tl.exp(x - m_new)  # 0 on masked lanes
        s = s * alpha + p
        # Masked lanes hold -inf; 0 * -inf would be NaN, so zero them in the product.
        zs = zs * alpha + p * tl.where(mask, x, 0.0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, tl.sum(s, axis=0))
    tl.store(zs_ptr + row, tl.sum(zs, axis=0))
    local = tl.load(labels_ptr + row) - vocab_start
    owned = (local >= 0) & (local < V)
    label_logit = tl.load(z_row + local, mask=owned, other=0.0)
    tl.store(label_logit_ptr + row, label_logit)


@triton.jit
def _logit_grad_kernel(
    z_ptr,
    labels_ptr,
    lse_ptr,
    entropy_ptr,
    coef_logp_ptr,
    coef_ent_ptr,
    stride_row,
    V,
    vocab_start,
    BLOCK_V: tl.constexpr,
):
    # Rows on axis 0 (limit 2**31 - 1), vocab tiles on axis 1 (limit 65535: V < 2**28).
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    mask = offs < V
    z_row = z_ptr + row * stride_row
    lse = tl.load(lse_ptr + row)
    entropy = tl.load(entropy_ptr + row)
    c = tl.load(coef_logp_ptr + row)
    e = tl.load(coef_ent_ptr + row)
    shifted = tl.load(z_row + offs, mask=mask, other=0.0) - lse  # log p
    p = tl.exp(shifted)
    dz = -p * (c + e * (shifted + entropy))
    # An unowned label's local id lies outside [0, V), so it never equals an unmasked offset:
    # the comparison alone is the ownership test.
    local = tl.load(labels_ptr + row) - vocab_start
    dz += tl.where(offs == local, c, 0.0)
    tl.store(z_row + offs, dz, mask=mask)


def default_block_v(vocab: int, interpreted: bool = _INTERPRETED) -> int:
    """Tile width: a power of two; 4096 fp32 (16 KiB) per tile on GPU, small when interpreted.

    The interpreter runs tiles as numpy arrays, where a wide tile over a short tail mostly
    wastes time; on GPU a wide tile keeps enough loads in flight to saturate HBM.
    """
    cap = 256 if interpreted else 4096
    return max(16, min(cap, triton.next_power_of_2(max(vocab, 1))))


def default_num_warps(block_v: int) -> int:
    # ~16 fp32 per thread at BLOCK_V 4096 (four 128-bit loads), fewer warps for narrow tiles.
    return 8 if block_v >= 4096 else 4


class TritonLogitKernels:
    """Triton implementation of :class:`~megatron_mel.ops.logit_kernels.LogitKernels`.

    Args:
        block_v: vocabulary tile width (power of two); None picks :func:`default_block_v`.
        num_warps: warps per program; None picks :func:`default_num_warps`.
    """

    name = "triton"

    def __init__(self, block_v: int | None = None, num_warps: int | None = None) -> None:
        if block_v is not None and (block_v < 16 or block_v & (block_v - 1)):
            raise ValueError(f"block_v must be a power of two >= 16, got {block_v}")
        self.block_v = block_v
        self.num_warps = num_warps

    def row_stats(
        self, z: Tensor, labels: Tensor, vocab_start: int
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        self._check(z, labels)
        rows, vocab = z.shape
        m, s, zs, label_logit = torch.empty(4, rows, dtype=torch.float32, device=z.device)
        if rows == 0:
            return m, s, zs, label_logit
        block, warps = self._launch_config(vocab)
        with _device_guard(z):
            _row_stats_kernel[(rows,)](
                z, labels.contiguous(), m, s, zs, label_logit, z.stride(0), vocab,
                int(vocab_start), BLOCK_V=block, num_warps=warps,
            )  # fmt: skip
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
        self._check(z, labels)
        rows, vocab = z.shape
        vectors = [_row_vector(t, rows, z.device) for t in (lse, entropy, coef_logp, coef_ent)]
        if rows == 0:
            return
        block, warps = self._launch_config(vocab)
        with _device_guard(z):
            _logit_grad_kernel[(rows, triton.cdiv(vocab, block))](
                z, labels.contiguous(), *vectors, z.stride(0), vocab, int(vocab_start),
                BLOCK_V=block, num_warps=warps,
            )  # fmt: skip

    def _launch_config(self, vocab: int) -> tuple[int, int]:
        block = self.block_v or default_block_v(vocab)
        return block, self.num_warps or default_num_warps(block)

    @staticmethod
    def _check(z: Tensor, labels: Tensor) -> None:
        if z.device.type != "cuda" and not _INTERPRETED:
            raise RuntimeError(f"{DEVICE_ERROR} (got tensors on {z.device})")
        if z.dim() != 2 or z.dtype != torch.float32:
            raise ValueError(f"z must be fp32 [Tc, V], got {z.dtype} {tuple(z.shape)}")
        if z.shape[1] == 0:
            raise ValueError("z has an empty vocabulary dimension")
        if z.shape[0] > 0 and z.stride(1) != 1:
            raise ValueError(f"z must have unit column stride, got strides {z.stride()}")
        if labels.shape != (z.shape[0],) or labels.dtype != torch.int64:
            raise ValueError(
                f"labels must be int64 [{z.shape[0]}], got {labels.dtype} {tuple(labels.shape)}"
            )
        if labels.device != z.device:
            raise ValueError(f"labels are on {labels.device}, z on {z.device}")


def _row_vector(t: Tensor, rows: int, device: torch.device) -> Tensor:
    if t.shape != (rows,) or t.device != device:
        raise ValueError(f"per-row vectors must be [{rows}] on {device}, got {tuple(t.shape)}")
    return t.to(torch.float32).contiguous()


def _device_guard(z: Tensor) -> contextlib.AbstractContextManager:
    # Triton launches on the current CUDA device; make it z's (ranks may hold several GPUs).
    return torch.cuda.device(z.device) if z.device.type == "cuda" else contextlib.nullcontext()
