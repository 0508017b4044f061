"""The shape of a supported decoder-only model, read from its Hugging Face ``config.json``.

``ModelArch`` is the one description every other module works from: the Megatron builder, the
HF<->Megatron mapping, layout validation and weight sync. It is parsed from plain JSON (no
transformers import) so a bad model directory fails in milliseconds. The layout checks that need the model's shape
(heads divisible by TP, layers by PP x VPP, world size = TP x PP x DP) live here too.

Supported families: Llama (incl. tied embeddings, e.g. SmolLM2), Qwen2 (QKV bias), Qwen3 (per-head
RMSNorm on q and k). All may use grouped-query attention.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_mel.config import ConfigError, ParallelConfig

FAMILIES = {
    "LlamaForCausalLM": "llama",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
}


@dataclass(frozen=True, slots=True)
class RopeScaling:
    """Llama-3 style frequency scaling (``rope_type: llama3``) or linear position interpolation."""

    kind: str  # "llama3" | "linear"
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192


@dataclass(frozen=True, slots=True)
class ModelArch:
    family: str
    hf_architecture: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tie_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_theta: float
    rope_scaling: RopeScaling | None
    norm_eps: float
    max_position_embeddings: int

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads

    def validate_layout(self, parallel: ParallelConfig, world_size: int) -> int:
        """Check TP/PP/DP for this model on ``world_size`` ranks; return the DP size."""
        return validate_layout(
            parallel,
            num_layers=self.num_layers,
            num_heads=self.num_heads,
            num_kv_heads=self.num_kv_heads,
            world_size=world_size,
        )

    def padded_vocab_size(self, multiple: int) -> int:
        """Embedding rows after padding to ``multiple`` (see ModelConfig.vocab_padding_multiple)."""
        return int(math.ceil(self.vocab_size / multiple) * multiple)


def load_arch(hf_dir: str | Path) -> ModelArch:
    """Read ``hf_dir/config.json`` and describe the model; one-line ConfigError if unsupported."""
    return arch_from_hf_config(read_hf_config(hf_dir), source=str(Path(hf_dir) / "config.json"))


def arch_from_hf_config(cfg: dict[str, Any], *, source: str = "config.json") -> ModelArch:
    archs = cfg.get("architectures") or []
    name = archs[0] if archs else f"model_type={cfg.get('model_type')!r}"
    family = FAMILIES.get(name) if archs else None
    if family is None:
        raise ConfigError(
            f"{source}: unsupported architecture {name!r} "
            f"(supported: {', '.join(sorted(FAMILIES))})"
        )

    def get(key: str, default: Any = None) -> Any:
        value = cfg.get(key, default)
        if value is None:
            raise ConfigError(f"{source}: missing field {key!r} for {name}")
        return value

    hidden = int(get("hidden_size"))
    heads = int(get("num_attention_heads"))
    kv_heads = int(cfg.get("num_key_value_heads") or heads)
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    if heads % kv_heads:
        raise ConfigError(f"{source}: {heads} attention heads not divisible by {kv_heads} KV heads")
    if get("hidden_act", "silu") != "silu":
        raise ConfigError(f"{source}: hidden_act {cfg['hidden_act']!r} unsupported (only silu)")
    if family == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise ConfigError(f"{source}: Llama with attention_bias/mlp_bias is not supported")
    if family == "qwen2" and cfg.get("use_sliding_window"):
        raise ConfigError(f"{source}: Qwen2 sliding-window attention is not supported")

    theta, scaling = _rope(cfg, source)
    return ModelArch(
        family=family,
        hf_architecture=name,
        num_layers=int(get("num_hidden_layers")),
        hidden_size=hidden,
        ffn_hidden_size=int(get("intermediate_size")),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(get("vocab_size")),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),  # all three default to untied
        qkv_bias=family == "qwen2",
        qk_norm=family == "qwen3",
        rope_theta=theta,
        rope_scaling=scaling,
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        max_position_embeddings=int(cfg.get("max_position_embeddings", 4096)),
    )


def _rope(cfg: dict[str, Any], source: str) -> tuple[float, RopeScaling | None]:
    # transformers 5 writes ``rope_parameters``; 4.x writes ``rope_theta`` + ``rope_scaling``.
    params = dict(cfg.get("rope_parameters") or {})
    scaling = dict(cfg.get("rope_scaling") or {})
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    merged = {**scaling, **params}
    kind = merged.get("rope_type", merged.get("type", "default"))
    if kind in (None, "default"):
        return theta, None
    if kind == "llama3":
        return theta, RopeScaling(
            kind="llama3",
            factor=float(merged["factor"]),
            low_freq_factor=float(merged.get("low_freq_factor", 1.0)),
            high_freq_factor=float(merged.get("high_freq_factor", 4.0)),
            original_max_position=int(merged.get("original_max_position_embeddings", 8192)),
        )
    if kind == "linear":
        return theta, RopeScaling(kind="linear", factor=float(merged["factor"]))
    raise ConfigError(f"{source}: rope type {kind!r} unsupported (default, llama3, linear)")


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    """The HF ``config.json`` of ``hf_dir`` as a dict, with a clear error if it is missing."""
    path = Path(hf_dir)
    if not path.is_dir():
        raise ConfigError(f"model.hf_dir: HF model directory {str(path)!r} does not exist")
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise ConfigError(f"model.hf_dir: {str(cfg_path)!r} is missing (not an HF model dir?)")
    try:
        return json.loads(cfg_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{cfg_path}:{exc.lineno}: not valid JSON ({exc.msg})") from exc


def validate_layout(
    parallel: ParallelConfig,
    *,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    world_size: int,
) -> int:
    """Check TP/PP/DP against the model shape and world size; return the data-parallel size."""
    tp, pp = parallel.tp, parallel.pp
    if num_heads % tp:
        raise ConfigError(
            f"parallel.tp={tp} does not divide the {num_heads} attention heads "
            f"(valid tp: {_divisors(num_heads, num_kv_heads)})"
        )
    if num_kv_heads % tp:
        raise ConfigError(
            f"parallel.tp={tp} does not divide the {num_kv_heads} KV heads "
            f"(valid tp: {_divisors(num_heads, num_kv_heads)})"
        )
    vpp = parallel.vpp or 1
    if num_layers % (pp * vpp):
        raise ConfigError(
            f"parallel.pp={pp}{f' x vpp={vpp}' if vpp > 1 else ''} does not divide the "
            f"{num_layers} layers"
        )
    if world_size % (tp * pp):
        raise ConfigError(
            f"world size {world_size} is not a multiple of tp x pp = {tp} x {pp} = {tp * pp}"
        )
    dp = world_size // (tp * pp)
    if parallel.dp is not None and parallel.dp != dp:
        raise ConfigError(
            f"parallel.dp={parallel.dp} but world size {world_size} = tp {tp} x pp {pp} x dp {dp}"
        )
    return dp


def _divisors(*counts: int) -> str:
    return ", ".join(str(d) for d in range(1, min(counts) + 1) if all(c % d == 0 for c in counts))
