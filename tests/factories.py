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


def make_micro_policy(out_dir: Path, tokenizer_dir: Path, *, seed: int = 0) -> Path:
    """A 2-layer random Llama with a real tokenizer (SmolLM2's): a policy the whole MEL loop can
    run on in seconds. Its answers are noise; tests steer rewards with a contract verifier."""
    import shutil

    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(
        vocab_size=49152,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        rope_theta=100000.0,
        bos_token_id=1,
        eos_token_id=2,
        architectures=["LlamaForCausalLM"],
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out_dir)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                 "special_tokens_map.json", "generation_config.json"):  # fmt: skip
        if (tokenizer_dir / name).is_file():
            shutil.copy2(tokenizer_dir / name, out_dir / name)
    return out_dir
