"""Logit parity between Megatron model chunks and the transformers implementation of a model.

Used by ``convert_checkpoint --verify`` and ``megatron-mel parity``. Two checks on fixed inputs:

* batch: a ``[2, 16]`` batch of random token ids, Megatron vs ``AutoModelForCausalLM``;
* packed: three sequences of different lengths packed as THD in one micro-batch, vs the same
  sequences run separately through transformers (so the packing is checked too).

Importing this module is cheap (no megatron-core); the collective parts import it lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_mel.models.arch import ModelArch

BATCH_SHAPE = (2, 16)
PACKED_LENGTHS = (5, 13, 8)


@dataclass(frozen=True, slots=True)
class ParityReport:
    batch_max_abs_diff: float
    packed_max_abs_diff: float
    logit_scale: float
    """max |logit| of the references, so a diff is read against the logit magnitude."""

    def ok(self, tolerance: float, packed_rtol: float = 1e-5) -> bool:
        """Batch within ``tolerance``; the pack within ``tolerance + packed_rtol * max|logit|``.

        A pack runs every matmul over more rows than the separate reference forwards, and fp32
        rounding depends on the row count; on models with large activations (SmolLM2's residual
        stream reaches ~3e4) that alone moves logits by ~1e-4, i.e. ~5e-6 of their scale.
        """
        packed_tolerance = tolerance + packed_rtol * self.logit_scale
        return self.batch_max_abs_diff <= tolerance and self.packed_max_abs_diff <= packed_tolerance


def reference_inputs(vocab_size: int) -> tuple[torch.Tensor, list[list[int]]]:
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab_size, BATCH_SHAPE, generator=gen)
    packed = [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in PACKED_LENGTHS]
    return batch, packed


def transformers_logits(
    hf_dir: str | Path, batch: torch.Tensor, packed: list[list[int]], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference logits: ``[b, s, V]`` for the batch and ``[t, V]`` for the packed sequences."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
    model.eval()
    with torch.no_grad():
        ref_batch = model(batch).logits.float()
        ref_packed = torch.cat([model(torch.tensor([seq])).logits[0].float() for seq in packed])
    return ref_batch, ref_packed


def check_parity(
    chunks: list[torch.nn.Module], arch: ModelArch, hf_dir: str | Path, dtype: torch.dtype
) -> ParityReport | None:
    """Run both checks; collective over all ranks, report on global rank 0 (None elsewhere)."""
    from megatron_mel.models.forward import (
        batched_micro_batch,
        forward_logits,
        packed_micro_batch,
        share_from_last_stage,
    )

    batch, packed = reference_inputs(arch.vocab_size)
    micro_batches = [batched_micro_batch(batch), packed_micro_batch(packed)]
    logits = share_from_last_stage(forward_logits(chunks, micro_batches, arch.vocab_size))
    if dist.get_rank() != 0:
        return None
    ref_batch, ref_packed = transformers_logits(hf_dir, batch, packed, dtype)
    return ParityReport(
        batch_max_abs_diff=(logits[0] - ref_batch).abs().max().item(),
        packed_max_abs_diff=(logits[1][0] - ref_packed).abs().max().item(),
        logit_scale=max(ref_batch.abs().max().item(), ref_packed.abs().max().item()),
    )


def stop_unless_parity(report: ParityReport | None, tolerance: float, header: str) -> None:
    """Print the report on rank 0 after ``header``; exit 1 on every rank if it failed.

    Collective: every rank calls it (``report`` is None except on global rank 0).
    """
    failed = report is not None and not report.ok(tolerance)
    if report is not None:
        print(
            f"{header} max abs logit diff vs transformers {report.batch_max_abs_diff:.3e} "
            f"(batch {BATCH_SHAPE[0]}x{BATCH_SHAPE[1]}), {report.packed_max_abs_diff:.3e} "
            f"(THD pack of {len(PACKED_LENGTHS)}); max |logit| {report.logit_scale:.2f}; "
            f"tolerance {tolerance:g} (pack: + 1e-5 x max |logit|) {'FAIL' if failed else 'OK'}",
            flush=True,
        )
    flag = [failed]
    dist.broadcast_object_list(flag, src=0)
    if flag[0]:
        raise SystemExit(1)


def run_parity(hf_dir: str, tp: int, pp: int, dtype_name: str, tolerance: float) -> None:
    """Worker body of ``megatron-mel parity``: load HF weights at (tp, pp) and compare logits.

    Every rank calls it; raises SystemExit(1) on all ranks when the check fails.
    """
    from megatron_mel import platform
    from megatron_mel.config import ModelConfig, ParallelConfig
    from megatron_mel.convert.checkpoint import load_hf_weights
    from megatron_mel.models.arch import load_arch
    from megatron_mel.models.gpt import DTYPES, attention_backend, build_model_chunks

    parallel = ParallelConfig(tp=tp, pp=pp)
    ctx = platform.init_distributed(parallel)
    try:
        arch = load_arch(hf_dir)
        model_cfg = ModelConfig(hf_dir=hf_dir, dtype=dtype_name)  # type: ignore[arg-type]
        chunks = build_model_chunks(arch, model_cfg, parallel)
        load_hf_weights(
            chunks, hf_dir, arch, arch.padded_vocab_size(model_cfg.vocab_padding_multiple)
        )
        report = check_parity(chunks, arch, hf_dir, DTYPES[dtype_name])
        header = (
            f"parity {arch.family} ({arch.num_layers} layers, {arch.num_heads}/"
            f"{arch.num_kv_heads} heads) tp={tp} pp={pp} dp={ctx.dp_size} {dtype_name} "
            f"attention={attention_backend(model_cfg)}:"
        )
        stop_unless_parity(report, tolerance, header)
    finally:
        platform.destroy_distributed()
