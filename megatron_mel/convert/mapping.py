"""The one HF <-> Megatron parameter mapping, used by checkpoint conversion and weight sync.

Each Megatron parameter of a GPT model matches one :class:`Rule` of :data:`RULES`. A rule names
the Hugging Face tensors it corresponds to and a :class:`Layout`: the type that knows how those
tensors sit in the Megatron parameter, so one object answers all three questions:

* :meth:`Layout.shard` builds one TP rank's Megatron tensor from the HF tensors;
* :meth:`Layout.merge` rebuilds the HF tensors from the list of all TP ranks' shards;
* :meth:`Layout.hf_shapes` gives the HF tensors' shapes (what a weight-sync receiver allocates).

Layouts (hidden H, query heads n, KV heads g, head dim d, FFN F, vocab V):

    Replicated      norms: identical on every TP rank ([H], or [d] for q/k norms).
    RowParallel     split on dim 1: o_proj [H, n*d], down_proj [H, F].
    FusedQKV        q [n*d, H], k [g*d, H], v [g*d, H] -> per KV group [q_0..q_{n/g-1}, k, v]
                    rows, then split on dim 0 (each rank owns whole groups). Biases the same, 1-D.
    FusedGateUp     gate [F, H], up [F, H] -> rank r holds [gate_r; up_r], F split by TP first.
    VocabParallel   embeddings / lm_head [V, H]: zero rows pad V to the padded vocab, split on
                    dim 0; merging drops the padding.

Tied embeddings: the last pipeline stage keeps a copy of the embedding as its output layer. Its
rule is the one with ``exported=False``: loaded from ``model.embed_tokens.weight``, never written
back (the first stage exports the table). Nothing else in the code base special-cases it.

Parameter names are canonicalised first: Transformer Engine fuses the pre-attention / pre-MLP
norms into the following linear (``linear_qkv.layer_norm_weight``), the local spec keeps them as
``input_layernorm.weight``; both map to the same rule. Layer indices are global (PP offsets
applied by the caller from ``TransformerLayer.layer_number``).
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from megatron_mel.models.arch import ModelArch

Shape = tuple[int, ...]


class MappingError(KeyError):
    """A Megatron parameter with no mapping rule, or HF tensors of unexpected shape."""


class Layout(ABC):
    """How a rule's HF tensors are arranged in one Megatron parameter and split over TP."""

    sharded = True
    """False when every TP rank holds the whole tensor (no gather needed to export it)."""

    @abstractmethod
    def hf_shapes(self, arch: ModelArch) -> list[Shape]:
        """Shapes of the rule's HF tensors, in rule order."""

    @abstractmethod
    def shard(
        self, hf: list[Tensor], arch: ModelArch, tp_rank: int, tp_size: int, padded_vocab: int
    ) -> Tensor:
        """This TP rank's Megatron tensor from the rule's HF tensors (in rule order)."""

    @abstractmethod
    def merge(self, shards: list[Tensor], arch: ModelArch) -> list[Tensor]:
        """The rule's HF tensors (in rule order) from every TP rank's shard, rank-ordered."""


@dataclass(frozen=True)
class Replicated(Layout):
    shape: Callable[[ModelArch], Shape]
    sharded = False

    def hf_shapes(self, arch: ModelArch) -> list[Shape]:
        return [self.shape(arch)]

    def shard(self, hf, arch, tp_rank, tp_size, padded_vocab):  # type: ignore[no-untyped-def]
        return hf[0]

    def merge(self, shards: list[Tensor], arch: ModelArch) -> list[Tensor]:
        return [shards[0]]


@dataclass(frozen=True)
class RowParallel(Layout):
    shape: Callable[[ModelArch], Shape]

    def hf_shapes(self, arch: ModelArch) -> list[Shape]:
        return [self.shape(arch)]

    def shard(self, hf, arch, tp_rank, tp_size, padded_vocab):  # type: ignore[no-untyped-def]
        return _split(hf[0], 1, tp_rank, tp_size)

    def merge(self, shards: list[Tensor], arch: ModelArch) -> list[Tensor]:
        return [shards[0] if len(shards) == 1 else torch.cat(shards, dim=1)]


@dataclass(frozen=True)
class VocabParallel(Layout):
    def hf_shapes(self, arch: ModelArch) -> list[Shape]:
        return [(arch.vocab_size, arch.hidden_size)]

    def shard(self, hf, arch, tp_rank, tp_size, padded_vocab):  # type: ignore[no-untyped-def]
        weight = hf[0]
        if weight.shape[0] > padded_vocab:
            raise MappingError(f"vocab {weight.shape[0]} larger than padded {padded_vocab}")
        pad = weight.new_zeros(padded_vocab - weight.shape[0], *weight.shape[1:])
        return _split(torch.cat([weight, pad]), 0, tp_rank, tp_size)

    def merge(self, shards: list[Tensor], arch: ModelArch) -> list[Tensor]:
        full = shards[0] if len(shards) == 1 else torch.cat(shards, dim=0)
        return [full[: arch.vocab_size]]


@dataclass(frozen=True)
class FusedQKV(Layout):
    bias: bool = False

    def hf_shapes(self, arch: ModelArch) -> list[Shape]:
        q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
        rest = () if self.bias else (arch.hidden_size,)
        return [(q, *rest), (kv, *rest), (kv, *rest)]

    def shard(self, hf, arch, tp_rank, tp_size, padded_vocab):  # type: ignore[no-untyped-def]
        q, k, v = hf
        g, d = arch.num_kv_heads, arch.head_dim
        rest = q.shape[1:]
        grouped = torch.cat(
            [
                q.reshape(g, arch.q_per_kv * d, *rest),
                k.reshape(g, d, *rest),
                v.reshape(g, d, *rest),
            ],
            dim=1,
        )  # [g, (n/g + 2) * d, ...]
        return _split(grouped, 0, tp_rank, tp_size).reshape(-1, *rest)

    def merge(self, shards: list[Tensor], arch: ModelArch) -> list[Tensor]:
        g, d, qd = arch.num_kv_heads, arch.head_dim, arch.q_per_kv * arch.head_dim
        full = torch.cat(shards, dim=0)
        rest = full.shape[1:]
        grouped = full.reshape(g, qd + 2 * d, *rest)
        return [
            grouped[:, :qd].reshape(g * qd, *rest),
            grouped[:, qd : qd + d].reshape(g * d, *rest),
            grouped[:, qd + d :].reshape(g * d, *rest),
        ]


@dataclass(frozen=True)
class FusedGateUp(Layout):
    def hf_shapes(self, arch: ModelArch) -> list[Shape]:
        return [(arch.ffn_hidden_size, arch.hidden_size)] * 2

    def shard(self, hf, arch, tp_rank, tp_size, padded_vocab):  # type: ignore[no-untyped-def]
        gate, up = hf
        return torch.cat([_split(gate, 0, tp_rank, tp_size), _split(up, 0, tp_rank, tp_size)])

    def merge(self, shards: list[Tensor], arch: ModelArch) -> list[Tensor]:
        halves = [s.chunk(2, dim=0) for s in shards]
        if len(halves) == 1:  # views; callers copy them where they need them
            return [halves[0][0], halves[0][1]]
        return [torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])]


def _split(t: Tensor, dim: int, rank: int, size: int) -> Tensor:
    if t.shape[dim] % size:
        raise MappingError(f"dim {dim} of shape {tuple(t.shape)} not divisible by TP={size}")
    return t.chunk(size, dim=dim)[rank].contiguous()


@dataclass(frozen=True, slots=True)
class Rule:
    megatron: str
    """Canonical Megatron name; ``{i}`` stands for the global layer index."""
    hf: tuple[str, ...]
    """HF tensor names; ``{i}`` as above."""
    layout: Layout
    applies: Callable[[ModelArch], bool] = lambda arch: True
    exported: bool = True
    """False for the tied output layer: a copy of the embedding, loaded but never exported."""

    def hf_names(self, layer: int | None) -> list[str]:
        return [name.format(i=layer) for name in self.hf]


def _hidden(arch: ModelArch) -> Shape:
    return (arch.hidden_size,)


def _head(arch: ModelArch) -> Shape:
    return (arch.head_dim,)


_L = "model.layers.{i}."
RULES: tuple[Rule, ...] = (
    Rule("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), VocabParallel()),
    Rule("decoder.final_layernorm.weight", ("model.norm.weight",), Replicated(_hidden)),
    Rule("output_layer.weight", ("lm_head.weight",), VocabParallel(),
         applies=lambda arch: not arch.tie_embeddings),
    Rule("output_layer.weight", ("model.embed_tokens.weight",), VocabParallel(),
         applies=lambda arch: arch.tie_embeddings, exported=False),
    Rule("decoder.layers.{i}.input_layernorm.weight", (_L + "input_layernorm.weight",),
         Replicated(_hidden)),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.weight",
         tuple(_L + f"self_attn.{p}_proj.weight" for p in "qkv"), FusedQKV()),
    Rule("decoder.layers.{i}.self_attention.linear_qkv.bias",
         tuple(_L + f"self_attn.{p}_proj.bias" for p in "qkv"), FusedQKV(bias=True),
         applies=lambda arch: arch.qkv_bias),
    Rule("decoder.layers.{i}.self_attention.q_layernorm.weight", (_L + "self_attn.q_norm.weight",),
         Replicated(_head), applies=lambda arch: arch.qk_norm),
    Rule("decoder.layers.{i}.self_attention.k_layernorm.weight", (_L + "self_attn.k_norm.weight",),
         Replicated(_head), applies=lambda arch: arch.qk_norm),
    Rule("decoder.layers.{i}.self_attention.linear_proj.weight", (_L + "self_attn.o_proj.weight",),
         RowParallel(lambda a: (a.hidden_size, a.num_heads * a.head_dim))),
    Rule("decoder.layers.{i}.pre_mlp_layernorm.weight", (_L + "post_attention_layernorm.weight",),
         Replicated(_hidden)),
    Rule("decoder.layers.{i}.mlp.linear_fc1.weight",
         (_L + "mlp.gate_proj.weight", _L + "mlp.up_proj.weight"), FusedGateUp()),
    Rule("decoder.layers.{i}.mlp.linear_fc2.weight", (_L + "mlp.down_proj.weight",),
         RowParallel(lambda a: (a.hidden_size, a.ffn_hidden_size))),
)  # fmt: skip

# Transformer Engine fuses the norms into the next linear; these are the same parameters.
_TE_ALIASES = (
    ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
)
_LAYER_RE = re.compile(r"^decoder\.layers\.(\d+)\.")


@dataclass(frozen=True, slots=True)
class ParamMapping:
    """One parameter of a model chunk: its module name, rule and global layer index."""

    name: str
    rule: Rule
    layer: int | None

    @property
    def hf_names(self) -> list[str]:
        return self.rule.hf_names(self.layer)

    @property
    def is_tied_copy(self) -> bool:
        """The last stage's copy of tied embeddings: loaded from, but never exported to, HF."""
        return not self.rule.exported


def canonical_name(name: str) -> str:
    """Strip DDP/Float16 wrappers and map TE's fused-norm names to the local spec's."""
    while name.startswith("module."):
        name = name[len("module.") :]
    for te, local in _TE_ALIASES:
        if name.endswith(te):
            return name[: -len(te)] + local
    return name


def map_param(name: str, arch: ModelArch, layer_offset: int = 0) -> ParamMapping:
    """The rule for Megatron parameter ``name`` of a chunk whose first layer is ``layer_offset``.

    Raises MappingError when no rule applies (an unsupported architecture feature).
    """
    canon = canonical_name(name)
    layer = None
    match = _LAYER_RE.match(canon)
    if match:
        layer = int(match.group(1)) + layer_offset
        canon = _LAYER_RE.sub("decoder.layers.{i}.", canon, count=1)
    for rule in RULES:
        if rule.megatron == canon and rule.applies(arch):
            return ParamMapping(name=name, rule=rule, layer=layer)
    raise MappingError(f"no HF mapping for Megatron parameter {name!r} ({arch.family})")


def hf_tensor_shapes(arch: ModelArch) -> dict[str, Shape]:
    """Every exported HF tensor of ``arch`` with its shape, in rule and layer order."""
    shapes: dict[str, Shape] = {}
    for rule in RULES:
        if not rule.applies(arch) or not rule.exported:
            continue
        layers = range(arch.num_layers) if "{i}" in rule.megatron else [None]
        for layer in layers:
            shapes.update(zip(rule.hf_names(layer), rule.layout.hf_shapes(arch)))
    return shapes


def expected_hf_names(arch: ModelArch) -> list[str]:
    """Every HF tensor name a checkpoint of ``arch`` holds (the coverage contract)."""
    return list(hf_tensor_shapes(arch))


def hf_tensor_shape(name: str, arch: ModelArch) -> Shape:
    """Shape of HF tensor ``name`` for ``arch`` (what a weight-sync receiver preallocates)."""
    try:
        return hf_tensor_shapes(arch)[name]
    except KeyError:
        raise MappingError(f"unknown HF tensor {name!r}") from None
