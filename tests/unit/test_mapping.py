"""The HF<->Megatron mapping: shard/merge are inverse for every layout and TP size, the QKV and
gated-MLP layouts match Megatron's conventions, and the rules cover every HF tensor."""

from __future__ import annotations

import pytest
import torch

from megatron_mel.convert.mapping import (
    RULES,
    FusedGateUp,
    FusedQKV,
    Layout,
    MappingError,
    Replicated,
    RowParallel,
    VocabParallel,
    canonical_name,
    expected_hf_names,
    hf_tensor_shape,
    hf_tensor_shapes,
    map_param,
)
from megatron_mel.models.arch import arch_from_hf_config

BASE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 16,
    "vocab_size": 1000,
}


def _arch(family: str = "qwen2", **extra):
    name = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    return arch_from_hf_config({**BASE, **extra, "architectures": [name[family]]})


LAYOUTS = {
    "replicated": Replicated(lambda a: (a.hidden_size,)),
    "row": RowParallel(lambda a: (a.hidden_size, a.num_heads * a.head_dim)),
    "vocab": VocabParallel(),
    "qkv": FusedQKV(),
    "qkv_bias": FusedQKV(bias=True),
    "gate_up": FusedGateUp(),
}


@pytest.mark.parametrize("tp", [1, 2, 4])
@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_merge_inverts_shard(kind, tp):
    arch = _arch()
    layout = LAYOUTS[kind]
    hf = [torch.randn(shape) for shape in layout.hf_shapes(arch)]
    shards = [layout.shard(hf, arch, r, tp, padded_vocab=1024) for r in range(tp)]
    back = layout.merge(shards, arch)
    assert len(back) == len(hf)
    for a, b in zip(hf, back):
        assert torch.equal(a, b)


def test_qkv_bias_is_one_dimensional():
    arch = _arch()
    layout = FusedQKV(bias=True)
    n, g, d = arch.num_heads, arch.num_kv_heads, arch.head_dim
    hf = [torch.randn(n * d), torch.randn(g * d), torch.randn(g * d)]
    assert [tuple(t.shape) for t in hf] == layout.hf_shapes(arch)
    shards = [layout.shard(hf, arch, r, 2, padded_vocab=1024) for r in range(2)]
    assert shards[0].shape == ((n // g + 2) * d * g // 2,)
    assert all(torch.equal(a, b) for a, b in zip(hf, layout.merge(shards, arch)))


def test_qkv_interleaves_per_kv_group():
    """Megatron's fused QKV holds, per KV group, that group's query heads, then its key, value."""
    arch = _arch()
    n, g, d, h = arch.num_heads, arch.num_kv_heads, arch.head_dim, arch.hidden_size
    q = torch.arange(n).repeat_interleave(d).float().unsqueeze(1).expand(n * d, h)
    k = (100 + torch.arange(g)).repeat_interleave(d).float().unsqueeze(1).expand(g * d, h)
    v = (200 + torch.arange(g)).repeat_interleave(d).float().unsqueeze(1).expand(g * d, h)
    fused = FusedQKV().shard([q, k, v], arch, 0, 1, padded_vocab=1024)
    rows = fused[::d, 0].tolist()  # one entry per head-sized block
    assert rows[:4] == [0, 1, 100, 200]  # group 0: q heads 0-1, k0, v0
    assert rows[4:8] == [2, 3, 101, 201]


def test_gate_up_puts_each_ranks_gate_then_up():
    arch = _arch()
    gate, up = torch.zeros(arch.ffn_hidden_size, 2), torch.ones(arch.ffn_hidden_size, 2)
    shard = FusedGateUp().shard([gate, up], arch, 1, 2, padded_vocab=1024)
    half = arch.ffn_hidden_size // 2
    assert shard.shape[0] == arch.ffn_hidden_size
    assert torch.all(shard[:half] == 0) and torch.all(shard[half:] == 1)


def test_vocab_padding_rows_are_zero_and_dropped():
    arch = _arch()
    emb = torch.randn(arch.vocab_size, arch.hidden_size)
    shards = [VocabParallel().shard([emb], arch, r, 2, padded_vocab=1024) for r in range(2)]
    assert shards[1].shape[0] == 512
    assert torch.all(shards[1][1000 - 512 :] == 0)
    assert torch.equal(VocabParallel().merge(shards, arch)[0], emb)


def test_uneven_split_is_an_error():
    arch = _arch()
    with pytest.raises(MappingError, match="not divisible by TP=3"):
        LAYOUTS["row"].shard([torch.randn(64, 128)], arch, 0, 3, padded_vocab=1024)


def test_te_and_local_names_map_to_the_same_rule():
    arch = _arch("qwen3")
    local = map_param("decoder.layers.1.input_layernorm.weight", arch, layer_offset=2)
    te = map_param("module.decoder.layers.1.self_attention.linear_qkv.layer_norm_weight", arch, 2)
    assert local.rule is te.rule and local.layer == te.layer == 3
    assert local.hf_names == ["model.layers.3.input_layernorm.weight"]
    assert canonical_name("module.module.mlp.linear_fc1.layer_norm_weight").endswith(
        "pre_mlp_layernorm.weight"
    )


def test_family_specific_rules():
    with pytest.raises(MappingError, match="no HF mapping"):
        map_param("decoder.layers.0.self_attention.linear_qkv.bias", _arch("llama"))
    assert map_param("decoder.layers.0.self_attention.q_layernorm.weight", _arch("qwen3"))
    tied = map_param("output_layer.weight", _arch("llama", tie_word_embeddings=True))
    assert tied.is_tied_copy and tied.hf_names == ["model.embed_tokens.weight"]
    untied = map_param("output_layer.weight", _arch("qwen2"))
    assert not untied.is_tied_copy and untied.hf_names == ["lm_head.weight"]


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3"])
def test_expected_names_cover_transformers_state_dict(family):
    """Every tensor transformers saves has a rule, and no rule invents a tensor."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    tie = family == "llama"
    cfg = cls(**{k: v for k, v in BASE.items()}, tie_word_embeddings=tie)
    model = AutoModelForCausalLM.from_config(cfg)
    saved = set(model.state_dict())
    if tie:
        saved.discard("lm_head.weight")  # transformers drops the tied copy on save
    arch = _arch(family, tie_word_embeddings=tie)
    assert sorted(expected_hf_names(arch)) == sorted(saved)


def test_every_rule_has_a_layout_and_the_shapes_match_transformers():
    """The shapes the weight sync allocates come from the layouts; they are transformers' own."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    assert all(isinstance(rule.layout, Layout) for rule in RULES)
    assert [r.megatron for r in RULES if not r.exported] == ["output_layer.weight"]
    arch = _arch("qwen3")
    model = AutoModelForCausalLM.from_config(Qwen3Config(**BASE, tie_word_embeddings=False))
    state = model.state_dict()
    shapes = hf_tensor_shapes(arch)
    assert list(shapes) == expected_hf_names(arch)
    assert {n: tuple(t.shape) for n, t in state.items()} == shapes
    assert hf_tensor_shape("model.layers.2.self_attn.q_norm.weight", arch) == (16,)
    with pytest.raises(MappingError, match="unknown HF tensor"):
        hf_tensor_shape("model.layers.0.mlp.nope.weight", arch)
