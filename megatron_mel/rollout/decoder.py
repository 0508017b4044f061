"""A minimal decoder-only transformer in plain torch, for the embedded rollout engine.

It runs the three supported families (:class:`~megatron_mel.models.arch.ModelArch`: Llama incl.
tied embeddings, Qwen2 with QKV bias, Qwen3 with per-head q/k RMSNorm) for inference only, with
numerics that follow transformers op for op so its logits match ``AutoModelForCausalLM`` to float
rounding:

* RMSNorm as ``LlamaRMSNorm``: variance in fp32, ``x * rsqrt(var + eps)``, cast back to the
  input dtype, *then* multiplied by the weight.
* RoPE as ``LlamaRotaryEmbedding``: fp32 inverse frequencies (default, ``llama3`` low/high
  frequency smoothing, ``linear`` division by the factor), ``cos``/``sin`` of
  ``position * inv_freq`` cast to the model dtype, ``q * cos + rotate_half(q) * sin``.
* Logits are the model-dtype ``lm_head`` matmul cast to fp32 (what transformers returns and what
  the trainer recomputes); every softmax over the vocabulary happens in fp32 downstream.

Where it departs from transformers, for speed:

* Parameters are addressed by their HF names, but stored fused: one ``[q; k; v]`` matrix (and
  bias) and one ``[gate; up]`` matrix per layer, so a layer costs three matmuls plus the output
  projection. :meth:`Decoder.param` returns the row-slice view of an HF tensor, so loading and
  reading by HF name touches exactly those elements, bit for bit.
* The KV cache is static (:class:`KVCache`, preallocated ``[layers, 2, batch, kv_heads, len, d]``)
  and decode writes one column per step; no tensor grows by concatenation.
* Prefill packs several prompts end to end without padding (matmuls over the pack, causal
  attention per prompt) and writes each prompt's keys/values into every cache row that samples
  from it (so ``n`` samples share one prefill); only each prompt's last position goes through
  the ``lm_head``. :meth:`Decoder.score` is the exception that returns all positions.
* Decode attention can split the rows into groups (:func:`attention_groups`) so rows with short
  prompts do not read the left padding that a batch-mate's long prompt forces on the cache.
* Decode attention folds the ``q_per_kv`` query heads of a KV head into the query-length axis of
  SDPA (``[B, kv_heads, q_per_kv, d]`` against ``[B, kv_heads, T, d]``), so grouped-query
  attention needs no ``repeat_kv`` copy of the cache.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_mel.convert.mapping import expected_hf_names
from megatron_mel.models.arch import ModelArch


def rope_inv_freq(arch: ModelArch) -> Tensor:
    """fp32 inverse frequencies, computed like transformers' ROPE_INIT_FUNCTIONS."""
    dim = arch.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float) / dim
    inv_freq = 1.0 / (arch.rope_theta**exponents)
    scaling = arch.rope_scaling
    if scaling is None:
        return inv_freq
    if scaling.kind == "linear":
        return inv_freq / scaling.factor
    if scaling.kind != "llama3":
        raise ValueError(f"unsupported rope scaling {scaling.kind!r}")
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context = scaling.original_max_position
    low_freq_wavelen = old_context / low
    high_freq_wavelen = old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``LlamaRMSNorm.forward``, same cast order (the weight multiplies in the input dtype)."""
    dtype = x.dtype
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Prompt(NamedTuple):
    """A prompt to prefill: tokens ``ids`` ``[S]`` go to cache rows ``rows`` from ``start``.

    With ``past``, the tokens continue a prefix already in the cache: they sit at positions
    ``past.length ..`` and attend to that prefix first (:class:`Past`).
    """

    ids: Tensor
    rows: slice
    start: int
    past: Past | None = None


class Past(NamedTuple):
    """A cached prefix: ``length`` tokens of cache row ``row`` from column ``start``."""

    row: int
    start: int
    length: int


@dataclass(slots=True)
class _Layer:
    input_norm: Tensor  # [H]
    qkv_w: Tensor  # [(n + 2g) * d, H], rows q | k | v
    qkv_b: Tensor | None  # [(n + 2g) * d]
    q_norm: Tensor | None  # [d]
    k_norm: Tensor | None  # [d]
    o_w: Tensor  # [H, n * d]
    post_norm: Tensor  # [H]
    gate_up_w: Tensor  # [2F, H], rows gate | up
    down_w: Tensor  # [H, F]


def vars_of(layer: _Layer) -> list[Tensor | None]:
    return [getattr(layer, name) for name in layer.__slots__]


class KVCache:
    """Static keys/values ``[layers, 2, rows, kv_heads, length, head_dim]`` for one batch.

    Built over a reusable flat buffer (see :meth:`over`) so consecutive batches do not reallocate.
    ``rows`` shrinks when :meth:`keep_rows` compacts finished rows away.
    """

    def __init__(self, kv: Tensor) -> None:
        self.kv = kv
        self.rows = kv.shape[2]

    @classmethod
    def over(
        cls, buffer: Tensor, arch: ModelArch, rows: int, length: int
    ) -> tuple[KVCache, Tensor]:
        """A cache viewing ``buffer`` (grown, zero-filled, when too small); returns it and the
        buffer to keep for the next batch."""
        shape = (arch.num_layers, 2, rows, arch.num_kv_heads, length, arch.head_dim)
        numel = math.prod(shape)
        if buffer.numel() < numel:
            # Zeros, not empty: masked cache entries still meet a 0 attention weight, and
            # 0 * NaN from uninitialised memory would poison the output.
            buffer = torch.zeros(numel, dtype=buffer.dtype, device=buffer.device)
        return cls(buffer[:numel].view(shape)), buffer

    def layer(self, i: int) -> tuple[Tensor, Tensor]:
        """Layer ``i``'s keys and values, each ``[rows, kv_heads, length, d]`` (contiguous)."""
        kv = self.kv[i, :, : self.rows]
        return kv[0], kv[1]

    def keep_rows(self, keep: Tensor, used: int) -> None:
        """Move rows ``keep`` (ascending indices) to the front; only the first ``used`` columns
        hold data, so only those are copied."""
        n = int(keep.numel())
        self.kv[:, :, :n, :, :used] = self.kv[:, :, keep, :, :used]
        self.rows = n


class Decoder:
    """Inference-only transformer of ``arch`` with HF-named, fused parameters (module docstring)."""

    def __init__(self, arch: ModelArch, dtype: torch.dtype, device: torch.device | str) -> None:
        self.arch = arch
        self.dtype = dtype
        self.device = torch.device(device)
        a = arch
        n, g, d, H, FF = a.num_heads, a.num_kv_heads, a.head_dim, a.hidden_size, a.ffn_hidden_size
        self.q_size, self.kv_size = n * d, g * d

        def new(*shape: int) -> Tensor:
            return torch.zeros(*shape, dtype=dtype, device=self.device)

        self.embed = new(a.vocab_size, H)
        self.final_norm = new(H)
        self.lm_head = self.embed if a.tie_embeddings else new(a.vocab_size, H)
        views: dict[str, Tensor] = {
            "model.embed_tokens.weight": self.embed,
            "model.norm.weight": self.final_norm,
        }
        if not a.tie_embeddings:
            views["lm_head.weight"] = self.lm_head
        self.layers: list[_Layer] = []
        qkv_rows = self.q_size + 2 * self.kv_size
        for i in range(a.num_layers):
            layer = _Layer(
                input_norm=new(H),
                qkv_w=new(qkv_rows, H),
                qkv_b=new(qkv_rows) if a.qkv_bias else None,
                q_norm=new(d) if a.qk_norm else None,
                k_norm=new(d) if a.qk_norm else None,
                o_w=new(H, n * d),
                post_norm=new(H),
                gate_up_w=new(2 * FF, H),
                down_w=new(H, FF),
            )
            self.layers.append(layer)
            p = f"model.layers.{i}."
            q_end, k_end = self.q_size, self.q_size + self.kv_size
            views[p + "input_layernorm.weight"] = layer.input_norm
            views[p + "self_attn.q_proj.weight"] = layer.qkv_w[:q_end]
            views[p + "self_attn.k_proj.weight"] = layer.qkv_w[q_end:k_end]
            views[p + "self_attn.v_proj.weight"] = layer.qkv_w[k_end:]
            if layer.qkv_b is not None:
                views[p + "self_attn.q_proj.bias"] = layer.qkv_b[:q_end]
                views[p + "self_attn.k_proj.bias"] = layer.qkv_b[q_end:k_end]
                views[p + "self_attn.v_proj.bias"] = layer.qkv_b[k_end:]
            if layer.q_norm is not None and layer.k_norm is not None:
                views[p + "self_attn.q_norm.weight"] = layer.q_norm
                views[p + "self_attn.k_norm.weight"] = layer.k_norm
            views[p + "self_attn.o_proj.weight"] = layer.o_w
            views[p + "post_attention_layernorm.weight"] = layer.post_norm
            views[p + "mlp.gate_proj.weight"] = layer.gate_up_w[:FF]
            views[p + "mlp.up_proj.weight"] = layer.gate_up_w[FF:]
            views[p + "mlp.down_proj.weight"] = layer.down_w
        if set(views) != set(expected_hf_names(a)):  # the decoder and the mapping must agree
            raise AssertionError("decoder parameters differ from expected_hf_names(arch)")
        self._views = views
        self._inv_freq = rope_inv_freq(a).to(self.device)
        self._cos = self._sin = new(0, d)

    # -- parameters by HF name ---------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return list(self._views)

    def param(self, name: str) -> Tensor:
        """The storage of HF tensor ``name`` (a view into the fused matrices); KeyError if unknown."""
        return self._views[name]

    @torch.no_grad()
    def load(self, name: str, tensor: Tensor) -> None:
        """Copy ``tensor`` into HF parameter ``name`` (shape must match; dtype is converted)."""
        target = self._views[name]
        if tuple(tensor.shape) != tuple(target.shape):
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} != {tuple(target.shape)}")
        target.copy_(tensor)

    def base_tensors(self) -> list[Tensor]:
        """Every tensor that owns parameter memory (the fused matrices, not their views)."""
        out = [self.embed, self.final_norm]
        if self.lm_head is not self.embed:
            out.append(self.lm_head)
        for layer in self.layers:
            out += [t for t in vars_of(layer) if t is not None]
        return out

    def release_weights(self) -> int:
        """Free the parameter memory and return its size in bytes. The tensors and their HF-named
        views stay valid objects over empty storage until :meth:`resume_weights`."""
        freed = 0
        for tensor in self.base_tensors():
            storage = tensor.untyped_storage()
            freed += storage.nbytes()
            storage.resize_(0)
        return freed

    def resume_weights(self) -> None:
        """Reallocate the parameter memory (uninitialised: the next weight load fills it)."""
        for tensor in self.base_tensors():
            tensor.untyped_storage().resize_(tensor.numel() * tensor.element_size())

    # -- RoPE --------------------------------------------------------------------------------

    def _rope(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """cos/sin ``[*positions.shape, d]`` in the model dtype, from a table grown on demand."""
        need = int(positions.max()) + 1
        if need > self._cos.shape[0]:
            length = max(need, 2 * self._cos.shape[0], 4096)  # doubling: few regrowths
            pos = torch.arange(length, device=self.device, dtype=torch.int64).float()
            freqs = pos[:, None] * self._inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = emb.cos().to(self.dtype), emb.sin().to(self.dtype)
        return self._cos[positions], self._sin[positions]

    # -- forward pieces ----------------------------------------------------------------------

    def _qkv(self, layer: _Layer, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, ...]:
        """Rotated q ``[T, n, d]``, rotated k and v ``[T, g, d]`` for hidden states ``[T, H]``."""
        a = self.arch
        h = rms_norm(x, layer.input_norm, a.norm_eps)
        qkv = F.linear(h, layer.qkv_w, layer.qkv_b)
        q, k, v = qkv.split((self.q_size, self.kv_size, self.kv_size), dim=-1)
        q = q.view(-1, a.num_heads, a.head_dim)
        k = k.view(-1, a.num_kv_heads, a.head_dim)
        v = v.view(-1, a.num_kv_heads, a.head_dim)
        if layer.q_norm is not None and layer.k_norm is not None:
            q = rms_norm(q, layer.q_norm, a.norm_eps)
            k = rms_norm(k, layer.k_norm, a.norm_eps)
        cos, sin = cos[:, None, :], sin[:, None, :]  # broadcast over heads
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def _finish_layer(self, layer: _Layer, x: Tensor, attn: Tensor) -> Tensor:
        """Output projection, residual, MLP, residual; ``attn`` is ``[T, n * d]``."""
        x = x + F.linear(attn, layer.o_w)
        h = rms_norm(x, layer.post_norm, self.arch.norm_eps)
        gate, up = F.linear(h, layer.gate_up_w).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, layer.down_w)

    def logits(self, x: Tensor) -> Tensor:
        """fp32 logits of the final hidden states ``[..., H]``."""
        h = rms_norm(x, self.final_norm, self.arch.norm_eps)
        return F.linear(h, self.lm_head).float()

    def _packed(self, prompts: Sequence[Prompt], cache: KVCache | None) -> Tensor:
        """Causal forward of unpadded sequences packed end to end; final hidden ``[sum S, H]``.

        The matmuls run on the whole pack (bigger GEMMs than one short prompt gives); attention
        runs per sequence, causal, positions restarting at 0 (or continuing a cached ``past``
        prefix, which the sequence attends to first). With ``cache``, each sequence's
        keys/values go to its rows, columns ``start : start + S``.
        """
        a = self.arch
        lengths = [int(p.ids.shape[0]) for p in prompts]
        ids = torch.cat([p.ids for p in prompts]).to(self.device)
        positions = torch.cat(
            [torch.arange(n) + (p.past.length if p.past else 0) for p, n in zip(prompts, lengths)]
        ).to(self.device)
        cos, sin = self._rope(positions)
        x = self.embed[ids]
        bounds = [0]
        for n in lengths:
            bounds.append(bounds[-1] + n)
        masks = [_continuation_mask(n, p.past.length, self.device) if p.past else None
                 for p, n in zip(prompts, lengths)]  # fmt: skip
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            q, k, v = q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1)  # [heads, S, d]
            ck, cv = cache.layer(i) if cache is not None else (None, None)
            attn = torch.empty(x.shape[0], a.num_heads, a.head_dim, dtype=x.dtype, device=x.device)
            for p, s0, s1, mask in zip(prompts, bounds, bounds[1:], masks):
                if ck is not None and cv is not None:
                    ck[p.rows, :, p.start : p.start + s1 - s0] = k[:, s0:s1]
                    cv[p.rows, :, p.start : p.start + s1 - s0] = v[:, s0:s1]
                keys, values = k[:, s0:s1], v[:, s0:s1]
                if p.past is not None and ck is not None and cv is not None:
                    c0, c1 = p.past.start, p.past.start + p.past.length
                    keys = torch.cat((ck[p.past.row, :, c0:c1], keys), dim=1)
                    values = torch.cat((cv[p.past.row, :, c0:c1], values), dim=1)
                attn[s0:s1] = F.scaled_dot_product_attention(
                    q[None, :, s0:s1],
                    keys[None],
                    values[None],
                    attn_mask=mask,
                    is_causal=mask is None,
                    enable_gqa=a.q_per_kv > 1,
                )[0].transpose(0, 1)
            x = self._finish_layer(layer, x, attn.view(x.shape[0], self.q_size))
        return x

    # -- public passes -----------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, ids: Tensor) -> Tensor:
        """fp32 logits ``[S, V]`` at every position of token sequence ``ids`` ``[S]``."""
        return self.logits(self._packed([Prompt(ids, slice(0), 0)], None))

    @torch.inference_mode()
    def prefill(self, prompts: Sequence[Prompt], cache: KVCache) -> Tensor:
        """Run ``prompts`` (one pack) into the cache; return the fp32 logits ``[len(prompts),
        V]`` of each prompt's last position only."""
        x = self._packed(prompts, cache)
        last = torch.tensor([int(p.ids.shape[0]) for p in prompts], device=x.device).cumsum(0)
        return self.logits(x[last - 1])

    @torch.inference_mode()
    def decode(
        self,
        tokens: Tensor,
        positions: Tensor,
        cache: KVCache,
        column: int,
        valid: Tensor,
        groups: Sequence[AttentionGroup] | None = None,
    ) -> Tensor:
        """One step for every cache row; returns fp32 logits ``[rows, V]``.

        Row ``b`` feeds ``tokens[b]`` at RoPE position ``positions[b]`` and writes its key/value
        to cache column ``column``; ``valid[b, c]`` (bool, ``[rows, >= column + 1]``) says whether
        it may attend to column ``c``. ``groups`` split the rows for attention so each group reads
        only its own columns (default: one group over all rows and columns).
        """
        a = self.arch
        B, g, rep, d = tokens.shape[0], a.num_kv_heads, a.q_per_kv, a.head_dim
        if groups is None:
            groups = [AttentionGroup(0, B, 0, True)]
        end = column + 1
        # [rows, 1, 1, T]: the same keys for every head and query; None lets SDPA skip masking.
        masks = [
            valid[gr.begin : gr.end, None, None, gr.first_column : end] if gr.masked else None
            for gr in groups
        ]
        cos, sin = self._rope(positions)
        x = self.embed[tokens]
        for i, layer in enumerate(self.layers):
            q, k, v = self._qkv(layer, x, cos, sin)
            ck, cv = cache.layer(i)
            ck[:, :, column] = k
            cv[:, :, column] = v
            q = q.view(B, g, rep, d)  # the rep query heads of a KV group as its query rows
            if len(groups) == 1:
                c0 = groups[0].first_column
                attn = F.scaled_dot_product_attention(
                    q, ck[:, :, c0:end], cv[:, :, c0:end], attn_mask=masks[0]
                )
            else:
                attn = torch.empty_like(q)
                for gr, mask in zip(groups, masks):
                    rows, c0 = slice(gr.begin, gr.end), gr.first_column
                    attn[rows] = F.scaled_dot_product_attention(
                        q[rows], ck[rows, :, c0:end], cv[rows, :, c0:end], attn_mask=mask
                    )
            x = self._finish_layer(layer, x, attn.reshape(B, self.q_size))
        return self.logits(x)


def _continuation_mask(length: int, past: int, device: torch.device) -> Tensor:
    """``[length, past + length]`` bool: every past column, then causal over the new tokens."""
    rows = torch.arange(length, device=device)[:, None]
    cols = torch.arange(past + length, device=device)[None, :]
    return cols <= rows + past


class AttentionGroup(NamedTuple):
    """Cache rows ``begin:end`` attend over columns ``first_column:`` (with a mask if
    ``masked``); see :func:`attention_groups`."""

    begin: int
    end: int
    first_column: int
    masked: bool


def attention_groups(starts: Sequence[int], overhead: int = 256) -> list[AttentionGroup]:
    """Split cache rows into contiguous groups for decode attention.

    Row ``b``'s keys start at column ``starts[b]`` (left padding), so attending over all columns
    reads padding the mask then discards: with prompts of 41..431 tokens most of the cache read
    would be padding. A group reads columns from its smallest start; the split minimises the
    columns read, counting ``overhead`` row-columns per extra SDPA call (dynamic programming over
    contiguous splits; rows sorted by prompt length, as the engine keeps them, split best).
    """
    n, top = len(starts), max(starts)
    best = [0.0] + [math.inf] * n  # best[j]: cost of rows [0, j) (columns read past ``top``)
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        lo = starts[j - 1]
        for i in range(j - 1, -1, -1):
            lo = min(lo, starts[i])
            cost = best[i] + (j - i) * (top - lo) + overhead
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups: list[AttentionGroup] = []
    j = n
    while j > 0:
        i = cut[j]
        lo = min(starts[i:j])
        groups.append(AttentionGroup(i, j, lo, any(s != lo for s in starts[i:j])))
        j = i
    return groups[::-1]
