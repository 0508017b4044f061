"""The weight-sync planner: bucket cutting is deterministic and complete, and the HF shapes it
preallocates match what transformers holds for every family."""

from __future__ import annotations

import pytest
import torch

from megatron_mel.convert.mapping import MappingError, expected_hf_names, hf_tensor_shape
from megatron_mel.models.arch import arch_from_hf_config
from megatron_mel.rollout.weight_sync import SyncPlan

BASE = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 1000,
}
CLASSES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


def _arch(family: str, **extra):
    return arch_from_hf_config({**BASE, **extra, "architectures": [CLASSES[family]]})


@pytest.mark.parametrize("family", sorted(CLASSES))
def test_shapes_match_transformers(family):
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[family]
    model = AutoModelForCausalLM.from_config(cls(**BASE, tie_word_embeddings=family == "llama"))
    arch = _arch(family, tie_word_embeddings=family == "llama")
    state = model.state_dict()
    for name in expected_hf_names(arch):
        assert hf_tensor_shape(name, arch) == tuple(state[name].shape), name
    with pytest.raises(MappingError):
        hf_tensor_shape("model.layers.0.mlp.experts.0.weight", arch)


def test_buckets_respect_size_and_keep_order():
    arch = _arch("qwen3")
    names = expected_hf_names(arch)
    bucket_bytes = 40_000
    buckets = SyncPlan.cut(names, arch, torch.float32, bucket_bytes)
    flat_names = [e.name for b in buckets for e in b.entries]
    assert flat_names == names
    for bucket in buckets:
        assert bucket.nbytes <= bucket_bytes or len(bucket.entries) == 1
        offsets = [e.offset for e in bucket.entries]
        assert offsets[0] == 0 and offsets == sorted(offsets)
        assert bucket.numel == sum(e.numel for e in bucket.entries)


def test_tensor_larger_than_a_bucket_gets_its_own():
    arch = _arch("qwen2")
    buckets = SyncPlan.cut(["model.embed_tokens.weight", "model.norm.weight"], arch,
                           torch.bfloat16, bucket_bytes=1024)  # fmt: skip
    assert [len(b.entries) for b in buckets] == [1, 1]
    assert buckets[0].nbytes == 1000 * 64 * 2


def test_one_bucket_when_everything_fits():
    arch = _arch("llama", tie_word_embeddings=True)
    names = expected_hf_names(arch)
    buckets = SyncPlan.cut(names, arch, torch.float32, bucket_bytes=512 * 2**20)
    assert len(buckets) == 1 and "lm_head.weight" not in [e.name for e in buckets[0].entries]
