"""ModelArch from HF config.json: families, RoPE variants, clear errors for what is unsupported."""

from __future__ import annotations

import json

import pytest

from megatron_mel.config import ConfigError
from megatron_mel.models.arch import arch_from_hf_config, load_arch

LLAMA = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
}


def test_llama_fields():
    arch = arch_from_hf_config(LLAMA)
    assert (arch.family, arch.head_dim, arch.q_per_kv) == ("llama", 64, 3)
    assert arch.tie_embeddings and not arch.qkv_bias and not arch.qk_norm
    assert arch.rope_theta == 100000.0 and arch.rope_scaling is None
    assert arch.padded_vocab_size(1024) == 49152
    assert arch.padded_vocab_size(128) == 49152


def test_qwen_families_and_padding():
    qwen2 = arch_from_hf_config(
        {**LLAMA, "architectures": ["Qwen2ForCausalLM"], "vocab_size": 151936}
    )
    assert qwen2.qkv_bias and not qwen2.qk_norm
    assert qwen2.padded_vocab_size(1024) == 152576
    qwen3 = arch_from_hf_config({**LLAMA, "architectures": ["Qwen3ForCausalLM"], "head_dim": 128})
    assert qwen3.qk_norm and qwen3.head_dim == 128


def test_rope_parameters_of_transformers_5():
    cfg = {
        **LLAMA,
        "rope_parameters": {
            "rope_theta": 500000.0,
            "rope_type": "llama3",
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        },
    }
    cfg.pop("rope_theta")
    arch = arch_from_hf_config(cfg)
    assert arch.rope_theta == 500000.0
    assert arch.rope_scaling is not None and arch.rope_scaling.factor == 32.0


@pytest.mark.parametrize(
    ("patch", "message"),
    [
        (
            {"architectures": ["MixtralForCausalLM"]},
            r"unsupported architecture 'MixtralForCausalLM'",
        ),
        ({"architectures": []}, r"unsupported architecture"),
        ({"hidden_act": "gelu"}, r"hidden_act 'gelu' unsupported"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, r"rope type 'yarn' unsupported"),
        ({"num_key_value_heads": 4}, r"9 attention heads not divisible by 4 KV heads"),
        ({"hidden_size": None}, r"missing field 'hidden_size'"),
    ],
)
def test_unsupported_is_one_line_error(patch, message):
    with pytest.raises(ConfigError, match=message) as err:
        arch_from_hf_config({**LLAMA, **patch})
    assert "\n" not in str(err.value)


def test_load_arch_directory_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"HF model directory .*nope.* does not exist"):
        load_arch(tmp_path / "nope")
    with pytest.raises(ConfigError, match=r"config.json.* is missing"):
        load_arch(tmp_path)
    (tmp_path / "config.json").write_text("{bad")
    with pytest.raises(ConfigError, match=r"config.json:1: not valid JSON"):
        load_arch(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(LLAMA))
    assert load_arch(tmp_path).num_layers == 30
