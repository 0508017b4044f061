"""Core attention for the local (non-Transformer-Engine) layer spec, with packed THD support.

Megatron's ``DotProductAttention`` refuses packed sequences, and TE's attention needs CUDA. This
module is the local spec's core attention on CPU (and usable on GPU): causal attention over either
``[s, b, heads, dim]`` batches or packed ``[t, heads, dim]`` tokens delimited by ``cu_seqlens``,
through ``torch.nn.functional.scaled_dot_product_attention`` with native GQA.

Shapes: s = sequence, b = batch, t = packed tokens, n = query heads (this TP rank),
g = KV heads (this TP rank), d = head dim.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor


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
        out = torch.zeros(
            query.shape[0], query.shape[1] * value.shape[2], dtype=query.dtype, device=query.device
        )
        for start, end in itertools.pairwise(bounds):
            if end <= start:
                continue
            q = query[start:end].transpose(0, 1).unsqueeze(0)  # [1, n, s, d]
            k = key[start:end].transpose(0, 1).unsqueeze(0)
            v = value[start:end].transpose(0, 1).unsqueeze(0)
            seg = F.scaled_dot_product_attention(
                q,
                k,
                v,
                is_causal=True,
                dropout_p=dropout,
                scale=self.softmax_scale,
                enable_gqa=True,
            )
            out[start:end] = seg.squeeze(0).transpose(0, 1).reshape(end - start, -1)
        return out
