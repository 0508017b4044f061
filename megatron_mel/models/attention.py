"""Core attention for the local (non-Transformer-Engine) layer spec, with packed THD support.

Megatron's ``DotProductAttention`` refuses packed sequences, and TE's attention needs CUDA. This
module is the local spec's core attention on CPU (and usable on GPU): causal attention over either
``[s, b, heads, dim]`` batches or packed ``[t, heads, dim]`` tokens delimited by ``cu_seqlens``,
through ``torch.nn.functional.scaled_dot_product_attention`` with native GQA.

Shared prefixes (:class:`PackedSegments`). A pack may hold a segment that *continues* another
one: the G responses of one prompt are packed as the prompt once followed by one segment per
response, each attending to the whole prompt and causally to itself. Keys and values of the
prompt are then computed once instead of G times (and, in training, its activations and
gradients too); every response sees exactly the context it would see alone. ``positions``
gives each packed token its RoPE position (a continuation starts where its prefix ends);
:class:`PositionalRotaryEmbedding` makes Megatron's RoPE use them.

Shapes: s = sequence, b = batch, t = packed tokens, n = query heads (this TP rank),
g = KV heads (this TP rank), d = head dim.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


@dataclass
class PackedSegments(PackedSeqParams):
    """THD pack parameters with per-token RoPE positions and optional shared prefixes.

    ``positions`` [t]: RoPE position of every packed token. ``prefix_of[i]``: index of the
    segment that segment ``i`` continues (it attends to all of it first), or -1. A prefix comes
    before its continuations and continues nothing itself.
    """

    positions: Tensor | None = None
    prefix_of: tuple[int, ...] | None = None


class PositionalRotaryEmbedding(RotaryEmbedding):
    """Megatron's RoPE, at the per-token positions of a :class:`PackedSegments` pack.

    GPTModel asks for ``get_rotary_seq_len(..., packed_seq_params)`` and then for the table of
    that length; for a pack with positions this returns one row per packed token instead, which
    Megatron's THD RoPE applies token by token (its "packed freqs" case). Other inputs get the
    usual table (positions restarting at 0 in every segment).
    """

    _positions: Tensor | None = None

    def get_rotary_seq_len(self, inference_context, transformer, transformer_input,
                           transformer_config, packed_seq_params=None, **kwargs):  # type: ignore[no-untyped-def]  # fmt: skip
        self._positions = getattr(packed_seq_params, "positions", None)
        return super().get_rotary_seq_len(inference_context, transformer, transformer_input,
                                          transformer_config, packed_seq_params, **kwargs)  # fmt: skip

    def forward(self, max_seq_len: int, offset: int = 0, packed_seq: bool = False,
                cp_group=None) -> Tensor:  # type: ignore[no-untyped-def]  # fmt: skip
        positions, self._positions = self._positions, None
        if positions is None or not packed_seq:
            return super().forward(max_seq_len, offset, packed_seq, cp_group)
        table = self.get_emb(int(positions.max()) + 1)  # [S, 1, 1, d]
        return table[positions.to(table.device)]  # [t, 1, 1, d]


class VarlenDotProductAttention(MegatronModule):
    """Causal softmax attention; packed (THD) or padded-free batched (SBHD) inputs."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: float | None = None,
        softmax_scale: float | None = None,
        cp_comm_type: str | None = None,
        pg_collection: object | None = None,
    ) -> None:
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("VarlenDotProductAttention does not support context parallelism")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"VarlenDotProductAttention is causal-only, got {attn_mask_type}")
        self.softmax_scale = softmax_scale or 1.0 / math.sqrt(config.kv_channels)
        self.dropout_p = (
            config.attention_dropout if attention_dropout is None else attention_dropout
        )

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Tensor | None,
        attn_mask_type: AttnMaskType | None = None,
        attention_bias: Tensor | None = None,
        packed_seq_params: PackedSeqParams | None = None,
    ) -> Tensor:
        if attention_bias is not None:
            raise ValueError("attention_bias is not supported by VarlenDotProductAttention")
        dropout = self.dropout_p if self.training else 0.0
        if packed_seq_params is not None and packed_seq_params.qkv_format == "thd":
            return self._packed(query, key, value, packed_seq_params, dropout)
        if attention_mask is not None:
            raise ValueError(
                "VarlenDotProductAttention takes causal batches without a mask; pack "
                "variable-length sequences with PackedSeqParams instead of padding them"
            )
        # [s, b, n, d] -> [b, n, s, d]
        q, k, v = (x.permute(1, 2, 0, 3) for x in (query, key, value))
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=dropout, scale=self.softmax_scale, enable_gqa=True
        )
        s, b = query.shape[0], query.shape[1]
        return out.permute(2, 0, 1, 3).reshape(s, b, -1)

    def _packed(
        self, query: Tensor, key: Tensor, value: Tensor, params: PackedSeqParams, dropout: float
    ) -> Tensor:
        # query [t, n, d], key/value [t, g, d]; each segment of cu_seqlens attends causally to
        # itself only. Padded cu_seqlens (when given) locate segments in the packed buffer;
        # the unpadded ones say how many of those tokens are real.
        cu_q = params.cu_seqlens_q_padded
        if cu_q is None:
            cu_q = params.cu_seqlens_q
        bounds = cu_q.tolist()
        prefix_of = getattr(params, "prefix_of", None) or (-1,) * (len(bounds) - 1)
        out = torch.zeros(
            query.shape[0], query.shape[1] * value.shape[2], dtype=query.dtype, device=query.device
        )
        for (start, end), prefix in zip(itertools.pairwise(bounds), prefix_of):
            if end <= start:
                continue
            q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, n, s, d]
            k = key[start:end]
            v = value[start:end]
            mask = None
            if prefix >= 0:  # attend to the whole prefix, then causally to this segment
                p0, p1 = bounds[prefix], bounds[prefix + 1]
                k = torch.cat((key[p0:p1], k))
                v = torch.cat((value[p0:p1], v))
                rows = torch.arange(end - start, device=query.device)[:, None]
                cols = torch.arange(k.shape[0], device=query.device)[None, :]
                mask = cols <= rows + (p1 - p0)  # [s, p + s]
            seg = F.scaled_dot_product_attention(
                q,
                k.transpose(0, 1).unsqueeze(0),
                v.transpose(0, 1).unsqueeze(0),
                attn_mask=mask,
                is_causal=mask is None,
                dropout_p=dropout,
                scale=self.softmax_scale,
                enable_gqa=True,
            )
            out[start:end] = seg.squeeze(0).transpose(0, 1).reshape(end - start, -1)
        return out
