"""Build megatron-core GPT model chunks for a ``ModelArch`` on this rank's pipeline stage(s).

The layer spec is Transformer Engine's on GPU and the local one (with
:class:`VarlenDotProductAttention`) on CPU; both name their checkpoint tensors identically, so a
dist-checkpoint moves between them. Weights come from ``convert/`` afterwards, so random
initialisation is skipped (``perform_initialization=False``).
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch
import torch.nn.functional as F
from megatron.core import parallel_state as ps
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.models.gpt.gpt_model import GPTModel
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_mel.config import ConfigError, ModelConfig, ParallelConfig
from megatron_mel.models.arch import ModelArch
from megatron_mel.models.attention import PositionalRotaryEmbedding, VarlenDotProductAttention

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def attention_backend(model: ModelConfig) -> str:
    """Resolve ``model.attention_backend`` ("auto" -> te with CUDA + TE, else local)."""
    has_te = importlib.util.find_spec("transformer_engine") is not None
    if model.attention_backend == "te":
        if not (torch.cuda.is_available() and has_te):
            raise ConfigError(
                "model.attention_backend: te needs CUDA and transformer-engine "
                "(pip install -e .[gpu]); use local on this machine"
            )
        return "te"
    if model.attention_backend == "auto":
        return "te" if torch.cuda.is_available() and has_te else "local"
    return "local"


def transformer_config(
    arch: ModelArch, model: ModelConfig, parallel: ParallelConfig
) -> TransformerConfig:
    """The TransformerConfig that makes Megatron compute what transformers computes for ``arch``."""
    dtype = DTYPES[model.dtype]
    on_gpu = torch.cuda.is_available()
    config = TransformerConfig(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.ffn_hidden_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=arch.qkv_bias,
        qk_layernorm=arch.qk_norm,
        attention_dropout=0.0,
        hidden_dropout=0.0,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        sequence_parallel=parallel.sequence_parallel,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype is torch.bfloat16,
        fp16=dtype is torch.float16,
        # The fused kernels below are CUDA (TE/Apex) only; on GPU megatron picks them itself.
        bias_activation_fusion=on_gpu,
        masked_softmax_fusion=False,
        persist_layer_norm=False,
        bias_dropout_fusion=on_gpu,
        apply_rope_fusion=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=not on_gpu,
        perform_initialization=False,
        recompute_granularity="full" if model.recompute_activations else None,
        recompute_method="uniform" if model.recompute_activations else None,
        recompute_num_layers=1 if model.recompute_activations else None,
        # Logits are computed by our loss from hidden states (ops/), so keep them in fp32 there.
        attention_softmax_in_fp32=True,
    )
    # Packed micro-batches differ in length, so pipeline stages exchange shapes before tensors.
    # Set after construction: __post_init__ rejects it for the (unused) MoE allgather dispatcher.
    config.variable_seq_lengths = True
    return config


def layer_spec(arch: ModelArch, backend: str) -> ModuleSpec:
    if backend == "te":
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=arch.qk_norm)
    spec = get_gpt_layer_local_spec(qk_layernorm=arch.qk_norm, normalization="RMSNorm")
    attention = spec.submodules.self_attention.submodules
    return dataclasses.replace(
        spec,
        submodules=dataclasses.replace(
            spec.submodules,
            self_attention=dataclasses.replace(
                spec.submodules.self_attention,
                submodules=dataclasses.replace(attention, core_attention=VarlenDotProductAttention),
            ),
        ),
    )


def build_model_chunks(
    arch: ModelArch, model: ModelConfig, parallel: ParallelConfig
) -> list[GPTModel]:
    """This rank's model chunks (one, or ``vpp`` with the interleaved schedule).

    Every rank calls this after ``platform.init_distributed``. Ranks that share tied embeddings
    across pipeline stages all-reduce the embedding copy inside GPTModel's constructor.
    """
    config = transformer_config(arch, model, parallel)
    spec = layer_spec(arch, attention_backend(model))
    device = torch.cuda.current_device() if torch.cuda.is_available() else "cpu"
    chunks = []
    for vp_stage in range(parallel.vpp or 1):
        vp = vp_stage if parallel.vpp else None
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=arch.padded_vocab_size(model.vocab_padding_multiple),
            max_sequence_length=model.max_seq_len,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            parallel_output=True,
            share_embeddings_and_output_weights=arch.tie_embeddings,
            position_embedding_type="rope",
            rotary_base=int(arch.rope_theta),
            rope_scaling=arch.rope_scaling is not None and arch.rope_scaling.kind == "llama3",
            rope_scaling_factor=arch.rope_scaling.factor if arch.rope_scaling else 8.0,
            seq_len_interpolation_factor=(
                arch.rope_scaling.factor
                if arch.rope_scaling and arch.rope_scaling.kind == "linear"
                else None
            ),
            vp_stage=vp,
        )
        _apply_rope_details(gpt, arch)
        chunks.append(gpt.to(device))
    return chunks


def _apply_rope_details(gpt: GPTModel, arch: ModelArch) -> None:
    """Match HF's RoPE exactly where GPTModel's constructor cannot express it.

    GPTModel takes an int base (HF allows floats) and fixes Llama-3's low/high frequency factors
    and original context at 1/4/8192; recompute the inverse frequencies from the real values.
    The module becomes a PositionalRotaryEmbedding (RoPE at explicit per-token positions).
    """
    rope = getattr(gpt, "rotary_pos_emb", None)
    if rope is None:
        return
    # Same module and state, plus per-token positions for packs that carry them (attention.py).
    if type(rope) is RotaryEmbedding:
        rope.__class__ = PositionalRotaryEmbedding
    dim = arch.head_dim
    inv_freq = 1.0 / (
        arch.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device="cpu") / dim)
    )
    scaling = arch.rope_scaling
    if scaling is not None and scaling.kind == "llama3":
        inv_freq = rope._apply_scaling(
            inv_freq,
            factor=scaling.factor,
            low_freq_factor=scaling.low_freq_factor,
            high_freq_factor=scaling.high_freq_factor,
            original_max_position_embeddings=scaling.original_max_position,
        )
    rope.inv_freq = inv_freq.to(rope.inv_freq.device)
