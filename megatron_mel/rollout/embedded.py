"""The embedded rollout engine: batched sampling with :class:`~.decoder.Decoder`, in-process.

It is the default engine on CPU and works on one GPU too; it needs no server, so tests and small
runs generate inside the trainer's process and receive weights as plain tensor copies.

Batching. Samples (each request's ``n`` of them kept together) are packed into batches of at most
``max_batch_size`` rows and ``max_batch_tokens`` KV-cache slots (rows x (longest prompt + longest
``max_new_tokens``)); requests are taken longest prompt first so a batch holds similar lengths.
A sample too large for ``max_batch_tokens`` runs alone.

Cache layout. Prompts are left-aligned to the batch's longest prompt ``P`` ("left padding"): row
``b``'s prompt occupies cache columns ``P - len_b .. P - 1`` and step ``t`` writes every row's
new key/value at column ``P + t``; a boolean mask hides each row's padding columns and RoPE uses
each row's true position, so a row computes the same function whatever shares its batch (up to
float rounding in differently shaped kernels). Each distinct prompt is prefilled once per batch
(once overall unless its samples outnumber ``max_batch_size``), unpadded and packed with other
prompts up to ``prefill_tokens`` tokens per forward, and its keys/values are written into the
rows of all of its samples. Decode attention splits the rows into groups that each read only
the columns their longest prompt needs (:func:`~.decoder.attention_groups`). The longest prefix
that all of a batch's distinct prompts share (a reflection template's instructions, a chat
system turn; at least ``MIN_SHARED_PREFIX`` tokens) is prefilled once, its keys/values copied to
every row, and each prompt prefills only the rest, attending to that prefix first. When a quarter of
the rows have finished, the live rows are compacted to the front of the cache so finished rows
stop costing compute; they never add tokens to their output after finishing.

Sampling. ``temperature == 0`` is greedy (argmax, first index on ties, like transformers). Else
the fp32 logits are divided by the temperature, softmaxed, filtered by top-k then top-p (the
smallest set of most likely tokens whose mass reaches ``top_p``), and one token is drawn by
inverse-CDF with a uniform from the sample's own ``torch.Generator``, seeded from
``(request seed, sample index)``, where the request seed is derived from the call's seed and the
request id (:func:`~.engine.request_seed`), so requests sharing a seed draw independent streams.
All of a sample's uniforms are drawn up front, so its tokens depend on its seed, request id,
index, prompt and weights only, never on batch composition. Requests without a seed get one
from the engine's own generator.

Log-probs. Each completion's ``logprobs[i]`` is ``log_softmax(logits)[token_i]`` of the raw fp32
logits, i.e. at temperature 1 and before top-k/top-p, whatever the sampling parameters: the
quantity the trainer recomputes (see :mod:`megatron_mel.rollout.engine`).

Memory. ``release_memory(["weights", "kv_cache"])`` frees the parameter storage and the KV-cache
buffer for real (the parameter tensors and their HF-named views stay, over empty storage), so a
colocated CPU run frees what a GPU engine would; ``resume_memory`` reallocates the parameters
uninitialised, and only a complete weight load followed by ``commit_weights`` makes the engine
generate again. The cache is reallocated by the next batch.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from megatron_mel import platform
from megatron_mel.convert.mapping import expected_hf_names
from megatron_mel.models.arch import ModelArch, load_arch
from megatron_mel.rollout.decoder import Decoder, KVCache, Past, Prompt, attention_groups
from megatron_mel.rollout.engine import (
    Completion,
    EngineError,
    FinishReason,
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    SamplingParams,
    WeightBucket,
    request_seed,
)

# Shorter common prefixes are prefilled with each prompt: one more forward is not worth it.
MIN_SHARED_PREFIX = 16


def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` of a request seeded ``seed`` (a hash, so nearby
    seeds and indices give unrelated streams)."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # manual_seed takes a non-negative int64


@dataclass(slots=True)
class _Sample:
    """One row of generation: sample ``index`` of request number ``request``."""

    request: int
    index: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    tokens: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    finish: FinishReason | None = None


class EmbeddedEngine(RolloutEngine):
    """In-process rollout engine over :class:`Decoder` (see the module docstring).

    ``hf_dir`` loads initial weights from ``model.safetensors`` or a sharded
    ``model.safetensors.index.json``; without it the weights are zeros until ``update_weights``.
    """

    def __init__(
        self,
        arch: ModelArch,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        hf_dir: str | Path | None = None,
        max_batch_size: int = 64,
        max_batch_tokens: int = 65536,
        prefill_tokens: int = 1024,
        seed: int | None = None,
        name: str = "embedded",
    ) -> None:
        super().__init__(name)
        if min(max_batch_size, max_batch_tokens, prefill_tokens) < 1:
            raise ValueError("max_batch_size, max_batch_tokens and prefill_tokens must be >= 1")
        self.arch = arch
        self.dtype = dtype
        self.device = torch.device(device)
        self.max_batch_size = max_batch_size
        self.max_batch_tokens = max_batch_tokens
        self.prefill_tokens = prefill_tokens
        self.decoder = Decoder(arch, dtype, self.device)
        self._expected = expected_hf_names(arch)
        self._buffer = torch.zeros(0, dtype=dtype, device=self.device)
        self._written: set[str] = set()  # HF names loaded since the last commit
        # What one more attention call per layer costs, in cache row-columns read: measured on
        # CPU (~30 us per SDPA call); a GPU launch buys more columns, so groups are coarser there.
        self._group_overhead = 256 if self.device.type == "cpu" else 4096
        self._seeds = torch.Generator()
        if seed is None:
            self._seeds.seed()
        else:
            self._seeds.manual_seed(seed)
        if hf_dir is not None:
            self.load_hf(hf_dir)

    @classmethod
    def from_hf(cls, hf_dir: str | Path, **kwargs: object) -> EmbeddedEngine:
        """An engine for the model in ``hf_dir``: its arch and its weights."""
        return cls(load_arch(hf_dir), hf_dir=hf_dir, **kwargs)  # type: ignore[arg-type]

    # -- weights -----------------------------------------------------------------------------

    def load_hf(self, hf_dir: str | Path) -> None:
        """Load every expected tensor from a safetensors checkpoint (dtype converted)."""
        from safetensors import safe_open

        hf_dir = Path(hf_dir)
        index = hf_dir / "model.safetensors.index.json"
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        elif (hf_dir / "model.safetensors").exists():
            shards = ["model.safetensors"]
        else:
            raise EngineError(self.name, f"no model.safetensors(.index.json) in {hf_dir}")
        known, loaded = set(self._expected), set()
        for shard in shards:
            with safe_open(str(hf_dir / shard), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                    if name in known:
                        self.decoder.load(name, f.get_tensor(name))
                        loaded.add(name)
                    elif not (name == "lm_head.weight" and self.arch.tie_embeddings) and not (
                        name.endswith("rotary_emb.inv_freq")  # a buffer older checkpoints saved
                    ):
                        raise EngineError(self.name, f"{hf_dir}: unexpected tensor {name!r}")
        self._check_complete(loaded, str(hf_dir))

    def _check_complete(self, written: set[str], source: str) -> None:
        missing = [n for n in self._expected if n not in written]
        if missing:
            shown = ", ".join(missing[:8]) + (
                f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
            )
            raise EngineError(self.name, f"{source} misses {len(missing)} tensors: {shown}")

    def _load_weights(self, buckets: Iterable[WeightBucket]) -> None:
        """Copy every bucket tensor into its parameter. The loads between two commits must cover
        every expected name (checked at commit): a failure part-way leaves a mix of old and new
        weights, so retry the whole update."""
        with self._lock, torch.no_grad():
            for bucket in buckets:
                for name, tensor in bucket.tensors():
                    try:
                        target = self.decoder.param(name)
                    except KeyError:
                        raise EngineError(
                            self.name, f"weight update: unknown tensor {name!r}"
                        ) from None
                    if tuple(tensor.shape) != tuple(target.shape) or tensor.dtype != target.dtype:
                        raise EngineError(
                            self.name,
                            f"weight update: tensor {name!r} is {tensor.dtype} "
                            f"{tuple(tensor.shape)}, expected {target.dtype} {tuple(target.shape)}",
                        )
                    target.copy_(tensor)
                    self._written.add(name)

    def _commit_weights(self, version: int) -> None:
        written, self._written = self._written, set()
        self._check_complete(written, f"weight update to version {version}")

    def get_weights(self, names: Sequence[str]) -> dict[str, Tensor]:
        if "weights" in self._released:
            raise EngineError(self.name, "get_weights() while the weights are released")
        out = {}
        for name in names:
            try:
                out[name] = self.decoder.param(name).detach().to("cpu", copy=True)
            except KeyError:
                raise EngineError(self.name, f"get_weights: unknown tensor {name!r}") from None
        return out

    # -- memory ------------------------------------------------------------------------------

    def _release_memory(self, tags: tuple[str, ...]) -> int:
        freed = 0
        with self._lock:
            if "kv_cache" in tags:
                freed += self._buffer.untyped_storage().nbytes()
                self._buffer = torch.zeros(0, dtype=self.dtype, device=self.device)
            if "weights" in tags:
                freed += self.decoder.release_weights()
                self._written = set()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        else:
            platform.release_host_memory()  # freed tensors stay resident otherwise
        return freed

    def _resume_memory(self, tags: tuple[str, ...]) -> None:
        if "weights" in tags:
            with self._lock:
                self.decoder.resume_weights()
        # The KV cache comes back with the next batch (KVCache.over grows the buffer).

    def _health(self) -> str:
        return f"{self.arch.family} {self.dtype} on {self.device}, version {self.weight_version}"

    # -- generation --------------------------------------------------------------------------

    def _generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        samples: list[_Sample] = []
        for r, req in enumerate(requests):
            params = req.params
            if params.seed is None:
                seed = int(torch.randint(0, 2**62, (1,), generator=self._seeds))
            else:
                seed = request_seed(params.seed, req.request_id)
            prompt = list(req.prompt_token_ids)
            samples += [_Sample(r, i, prompt, params, seed) for i in range(params.n)]
        # The trainer's CPU device mode (platform.py) would tax every op of the decode loop.
        with self._lock, torch.inference_mode(), platform.cpu_shims_suspended():
            for batch in self._plan(samples):
                self._run_batch(batch)
        results = [GenerationResult(r.request_id, list(r.prompt_token_ids), []) for r in requests]
        for s in samples:
            assert s.finish is not None
            results[s.request].completions.append(
                Completion(s.tokens, s.logprobs, s.finish, self.weight_version)
            )
        return results

    def _plan(self, samples: list[_Sample]) -> list[list[_Sample]]:
        """Split samples into batches within the row and cache-slot limits (module docstring)."""
        # Longest first; equal prompts (of one request or several) end up adjacent.
        order = sorted(samples, key=lambda s: (-len(s.prompt), s.prompt, s.request, s.index))
        batches: list[list[_Sample]] = []
        batch: list[_Sample] = []
        longest_prompt = longest_new = 0
        for s in order:
            p = max(longest_prompt, len(s.prompt))
            n = max(longest_new, s.params.max_new_tokens)
            if batch and (
                len(batch) + 1 > self.max_batch_size
                or (len(batch) + 1) * (p + n) > self.max_batch_tokens
            ):
                batches.append(batch)
                batch, p, n = [], len(s.prompt), s.params.max_new_tokens
            batch.append(s)
            longest_prompt, longest_new = p, n
        if batch:
            batches.append(batch)
        return batches

    def _prefill(self, pack: list[Prompt], cache: KVCache, logits: Tensor) -> None:
        for prompt, last in zip(pack, self.decoder.prefill(pack, cache)):
            logits[prompt.rows] = last

    def _prefill_shared_prefix(
        self, rows: list[_Sample], runs: list[tuple[int, int]], starts: list[int], cache: KVCache
    ) -> Past | None:
        """Prefill the longest prefix common to every distinct prompt of the batch once (into
        the first row) and copy its keys/values to every row; None if it is too short to pay.

        Each prompt keeps at least one token of its own, whose logits start its sampling.
        """
        if len(runs) < 2:
            return None
        prompts = [rows[r0].prompt for r0, _ in runs]
        length = min(map(len, prompts)) - 1  # each prompt keeps a token of its own
        for prompt in prompts[1:]:
            length = next((i for i in range(length) if prompt[i] != prompts[0][i]), length)
        if length < MIN_SHARED_PREFIX:
            return None
        first = runs[0][0]
        ids = torch.tensor(prompts[0][:length], dtype=torch.long)
        self.decoder.prefill([Prompt(ids, slice(first, first + 1), starts[first])], cache)
        source = cache.kv[:, :, first, :, starts[first] : starts[first] + length].clone()
        for r0, r1 in runs:
            cache.kv[:, :, r0:r1, :, starts[r0] : starts[r0] + length] = source[:, :, None]
        return Past(first, starts[first], length)

    def _run_batch(self, rows: list[_Sample]) -> None:
        dev, dec = self.device, self.decoder
        B = len(rows)
        P = max(len(s.prompt) for s in rows)
        N = max(s.params.max_new_tokens for s in rows)
        cache, self._buffer = KVCache.over(self._buffer, self.arch, B, P + N)
        starts = [P - len(s.prompt) for s in rows]

        # Prefill each run of consecutive rows with the same prompt once, packing prompts into
        # forwards of up to prefill_tokens tokens; a prefix all the batch's prompts share (a
        # template's instructions, a chat system turn) is prefilled once and copied.
        logits = torch.empty(B, self.arch.vocab_size, dtype=torch.float32, device=dev)
        runs: list[tuple[int, int]] = []
        r0 = 0
        while r0 < B:
            r1 = r0 + 1
            while r1 < B and rows[r1].prompt == rows[r0].prompt:
                r1 += 1
            # Padding columns are masked, but zero them so no stale NaN can meet a 0 weight.
            cache.kv[:, :, r0:r1, :, : starts[r0]].zero_()
            runs.append((r0, r1))
            r0 = r1
        past = self._prefill_shared_prefix(rows, runs, starts, cache)
        shared = past.length if past is not None else 0
        pack: list[Prompt] = []
        for r0, r1 in runs:
            ids = torch.tensor(rows[r0].prompt[shared:], dtype=torch.long)
            if pack and sum(len(p.ids) for p in pack) + len(ids) > self.prefill_tokens:
                self._prefill(pack, cache, logits)
                pack = []
            pack.append(Prompt(ids, slice(r0, r1), starts[r0] + shared, past))
        self._prefill(pack, cache, logits)

        sampler = _Sampler(rows, N, dev)
        positions = torch.tensor([len(s.prompt) for s in rows], device=dev)
        valid = (
            torch.arange(P + N, device=dev)[None, :] >= torch.tensor(starts, device=dev)[:, None]
        )
        live = list(range(B))  # cache row -> index into rows, for the rows still in the cache
        groups = attention_groups(starts, self._group_overhead)
        for t in range(N):
            tokens, logprobs = sampler.sample(logits, t)
            token_list, logprob_list = tokens.tolist(), logprobs.tolist()
            keep = []
            for r, i in enumerate(live):
                s = rows[i]
                if s.finish is not None:
                    continue
                tok = token_list[r]
                s.tokens.append(tok)
                s.logprobs.append(logprob_list[r])
                if tok in s.params.stop_token_ids:
                    s.finish = "stop"
                elif len(s.tokens) >= s.params.max_new_tokens:
                    s.finish = "length"
                else:
                    keep.append(r)
            if not keep:
                break
            if 4 * (len(live) - len(keep)) >= len(live):  # compact: drop finished rows
                idx = torch.tensor(keep, device=dev)
                cache.keep_rows(idx, P + t)
                live = [live[r] for r in keep]
                sampler.keep_rows(idx)
                tokens, positions, valid = tokens[idx], positions[idx], valid[idx]
                groups = attention_groups([starts[i] for i in live], self._group_overhead)
            logits = dec.decode(tokens, positions + t, cache, P + t, valid, groups)


class _Sampler:
    """Per-row sampling state of one batch: parameters and pre-drawn uniforms (module docstring)."""

    def __init__(self, rows: list[_Sample], steps: int, device: torch.device) -> None:
        temps = [s.params.temperature for s in rows]
        self.greedy = torch.tensor([t == 0 for t in temps], device=device)
        self.all_greedy = all(t == 0 for t in temps)
        self.unit_temp = all(t in (0, 1) for t in temps)
        self.temps = torch.tensor([t if t > 0 else 1.0 for t in temps], device=device)
        vocab_cap = 2**62
        self.top_k = torch.tensor(
            [s.params.top_k if s.params.top_k > 0 else vocab_cap for s in rows], device=device
        )
        self.top_p = torch.tensor([s.params.top_p for s in rows], device=device)
        self.filtered = torch.tensor(
            [t > 0 and (s.params.top_k > 0 or s.params.top_p < 1) for t, s in zip(temps, rows)],
            device=device,
        )
        uniforms = torch.zeros(len(rows), steps)
        for r, s in enumerate(rows):
            if s.params.temperature > 0:
                gen = torch.Generator().manual_seed(sample_seed(s.seed, s.index))
                uniforms[r, : s.params.max_new_tokens] = torch.rand(
                    s.params.max_new_tokens, generator=gen
                )
        self.uniforms = uniforms.to(device)

    def keep_rows(self, idx: Tensor) -> None:
        for attr in ("greedy", "temps", "top_k", "top_p", "filtered", "uniforms"):
            setattr(self, attr, getattr(self, attr)[idx])

    def sample(self, logits: Tensor, step: int) -> tuple[Tensor, Tensor]:
        """Tokens ``[B]`` for step ``step`` and their unscaled log-probs, from fp32 logits."""
        lse = torch.logsumexp(logits, dim=-1)
        if self.all_greedy:
            tokens = logits.argmax(dim=-1)
        else:
            if self.unit_temp:
                probs = torch.exp(logits - lse[:, None])  # softmax, reusing the log-prob lse
            else:
                probs = torch.softmax(logits / self.temps[:, None], dim=-1)
            if bool(self.filtered.any()):
                rows = self.filtered.nonzero()[:, 0]
                probs[rows] = _top_k_top_p(probs[rows], self.top_k[rows], self.top_p[rows])
            cdf = torch.cumsum(probs, dim=-1)
            total = cdf[:, -1]
            # u in [0, total): the first cdf entry above it is a token of non-zero probability.
            u = torch.minimum(self.uniforms[:, step] * total, torch.nextafter(total, total * 0))
            tokens = torch.searchsorted(cdf, u[:, None], right=True)[:, 0]
            tokens = tokens.clamp_max(logits.shape[-1] - 1)
            if bool(self.greedy.any()):
                tokens = torch.where(self.greedy, logits.argmax(dim=-1), tokens)
        logprobs = logits.gather(1, tokens[:, None])[:, 0] - lse
        return tokens, logprobs


def _top_k_top_p(probs: Tensor, top_k: Tensor, top_p: Tensor) -> Tensor:
    """Zero all but each row's ``top_k`` most likely tokens, then all but the smallest leading
    set whose mass reaches ``top_p`` of what top-k kept (transformers' order: k, then p)."""
    sorted_p, order = probs.sort(dim=-1, descending=True)
    ranks = torch.arange(probs.shape[-1], device=probs.device)
    sorted_p = torch.where(ranks[None, :] < top_k[:, None], sorted_p, 0.0)
    before = torch.cumsum(sorted_p, dim=-1) - sorted_p  # mass of the more likely tokens
    mass = sorted_p.sum(dim=-1, keepdim=True)
    sorted_p = torch.where(before < top_p[:, None] * mass, sorted_p, 0.0)
    return torch.zeros_like(probs).scatter_(1, order, sorted_p)
