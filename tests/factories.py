"""Tiny Hugging Face models of every supported family, for parity and conversion tests.

Weights are random with a large init range, and norm weights and biases are drawn away from
their defaults (ones / zeros), so a mapping mistake in any tensor moves the logits visibly.
The vocabulary (1000) is deliberately not a multiple of 128, to exercise vocab padding.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("llama", "qwen2", "qwen3")
TINY_VOCAB = 1000


def make_tiny_hf(family: str, out_dir: Path, *, seed: int = 0) -> Path:
    """Save a random 4-layer GQA model of ``family`` to ``out_dir`` and return it."""
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.1,
        max_position_embeddings=256,
        rms_norm_eps=1e-6,
    )
    if family == "llama":  # SmolLM2-like: tied embeddings
        cfg = LlamaConfig(**common, tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    elif family == "qwen2":  # QKV bias
        cfg = Qwen2Config(**common, tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"])
    elif family == "qwen3":  # per-head q/k RMSNorm, head_dim != hidden / heads
        cfg = Qwen3Config(
            **common, head_dim=32, tie_word_embeddings=False, architectures=["Qwen3ForCausalLM"]
        )
    else:
        raise ValueError(family)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.normal_(1.0, 0.3)
            elif name.endswith("bias"):
                param.normal_(0.0, 0.3)
    model.save_pretrained(out_dir)
    return out_dir
