"""Forward-only passes through the pipeline schedule: full-vocabulary logits for checks and eval.

Training computes its loss from last-stage hidden states without materialising logits (ops/).
This module is for the places that want the logits themselves: parity checks against
transformers, conversion verification, and log-prob recomputation in tests.

Shapes: b = batch, s = sequence, t = packed tokens, V = vocabulary (unpadded).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region


@dataclass(slots=True)
class MicroBatch:
    """Model inputs for one micro-batch: a padded-free batch ``[b, s]`` or a THD pack ``[1, t]``."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    packed_seq_params: PackedSeqParams | None = None

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.input_ids.shape[0]), int(self.input_ids.shape[1])

    def to(self, device: torch.device) -> MicroBatch:
        params = self.packed_seq_params
        if params is not None:
            moved = {
                "cu_seqlens_q": params.cu_seqlens_q.to(device),
                "cu_seqlens_kv": params.cu_seqlens_kv.to(device),
            }
            if getattr(params, "positions", None) is not None:  # models/attention.PackedSegments
                moved["positions"] = params.positions.to(device)
            params = dataclasses.replace(params, **moved)
        return MicroBatch(self.input_ids.to(device), self.position_ids.to(device), params)


def packed_micro_batch(sequences: Sequence[Sequence[int]], device: Any = "cpu") -> MicroBatch:
    """Pack token sequences into one THD micro-batch (positions restart at each sequence)."""
    lengths = [len(s) for s in sequences]
    if not lengths or min(lengths) == 0:
        raise ValueError("packed_micro_batch needs at least one sequence, none of them empty")
    ids = torch.tensor([tok for seq in sequences for tok in seq], dtype=torch.long, device=device)
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32, device=device)
    cu[1:] = torch.cumsum(torch.tensor(lengths, device=device), 0)
    params = PackedSeqParams(
        qkv_format="thd",
        cu_seqlens_q=cu,
        cu_seqlens_kv=cu,
        max_seqlen_q=max(lengths),
        max_seqlen_kv=max(lengths),
    )
    return MicroBatch(ids.unsqueeze(0), pos.unsqueeze(0), params)


def batched_micro_batch(input_ids: torch.Tensor) -> MicroBatch:
    """A causal ``[b, s]`` batch of equal-length sequences."""
    b, s = input_ids.shape
    pos = torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)
    return MicroBatch(input_ids, pos, None)


@torch.no_grad()
def forward_logits(
    chunks: list[torch.nn.Module], micro_batches: list[MicroBatch], vocab_size: int
) -> list[torch.Tensor] | None:
    """Full-vocabulary fp32 logits ``[b, s, V]`` per micro-batch on the last pipeline stage.

    Collective over the model-parallel group; every rank passes the same micro-batches. Returns
    None on ranks that are not on the last stage.
    """
    for chunk in chunks:
        chunk.eval()
    device = next(chunks[0].parameters()).device
    outputs: list[torch.Tensor] = []

    def forward_step(data_iterator: Any, model: torch.nn.Module) -> tuple[torch.Tensor, Any]:
        mb: MicroBatch = next(data_iterator).to(device)
        out = model(
            input_ids=mb.input_ids,
            position_ids=mb.position_ids,
            attention_mask=None,
            packed_seq_params=mb.packed_seq_params,
        )

        def collect(logits: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
            full = gather_from_tensor_model_parallel_region(logits)
            outputs.append(full[..., :vocab_size].float())
            return logits.new_zeros(()), {}

        return out, collect

    b, s = micro_batches[0].shape
    iterators: Any = [iter(micro_batches) for _ in chunks]
    get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=s,
        micro_batch_size=b,
        forward_only=True,
    )
    return outputs if ps.is_pipeline_last_stage() else None


def share_from_last_stage(obj: Any) -> Any:
    """Broadcast a picklable object from the last pipeline stage to every stage.

    Collective over the pipeline group; each TP rank's pipeline group has its own last-stage
    member, which holds the same (TP-gathered) value.
    """
    group = ps.get_pipeline_model_parallel_group()
    src = dist.get_process_group_ranks(group)[-1]
    holder = [obj if dist.get_rank() == src else None]
    dist.broadcast_object_list(holder, src=src, group=group)
    return holder[0]
