"""The embedded engine against transformers: logits, greedy tokens and log-probs match, sampling
is seeded per sample and independent of batch composition, stop/length end generation, weight
updates and reads are exact and validated. Tiny random models of every family; SmolLM2 for the
realistic checks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from megatron_mel.convert.mapping import expected_hf_names
from megatron_mel.models.arch import load_arch
from megatron_mel.rollout.decoder import Decoder, KVCache, Prompt, attention_groups
from megatron_mel.rollout.embedded import EmbeddedEngine
from megatron_mel.rollout.engine import (
    EngineError,
    GenerationRequest,
    SamplingParams,
    WeightBucket,
)
from tests.factories import FAMILIES, make_tiny_hf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TOL = 1e-4


def _hf_model(path: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes gain nothing from intra-op threads, and on a shared busy CPU OpenMP threads
    waiting for each other turn seconds into minutes."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny(tiny_models):
    """family -> (hf model dir, transformers model, engine with its weights)."""
    return {
        f: (path, _hf_model(path), EmbeddedEngine.from_hf(path, seed=0))
        for f, path in tiny_models.items()
    }


@pytest.fixture(scope="module")
def smol(assets):
    return _hf_model(assets.model_dir), EmbeddedEngine.from_hf(assets.model_dir)


def _prompts(lengths, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]


def _requests(prompts, **params) -> list[GenerationRequest]:
    return [GenerationRequest(f"r{i}", p, SamplingParams(**params)) for i, p in enumerate(prompts)]


def _hf_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Teacher-forced log_softmax(logits) of ``tokens`` after ``prompt``."""
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0].float()
    logp = torch.log_softmax(logits[len(prompt) - 1 : -1], dim=-1)
    return logp.gather(1, torch.tensor(tokens)[:, None])[:, 0]


def _hf_greedy(model, prompt: list[int], new: int) -> list[int]:
    # min_new_tokens keeps EOS from ending it early; no prompt here is followed by EOS greedily.
    out = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=new, min_new_tokens=new,
        pad_token_id=0,
    )  # fmt: skip
    return out[0, len(prompt) :].tolist()


def _check_decoder(model, dec: Decoder, seq: list[int], prompt_len: int) -> None:
    ids = torch.tensor(seq)
    with torch.no_grad():
        ref = model(ids[None]).logits[0].float()
    assert (dec.score(ids) - ref).abs().max().item() <= TOL
    # Prefill the prompt into rows 1..2 behind 3 padding columns, then decode the rest.
    start, rows = 3, 3
    cache, _ = KVCache.over(torch.zeros(0), dec.arch, rows, start + len(seq))
    last = dec.prefill([Prompt(ids[:prompt_len], slice(1, 3), start)], cache)
    assert (last[0] - ref[prompt_len - 1]).abs().max().item() <= TOL
    valid = torch.arange(start + len(seq))[None].expand(rows, -1) >= start
    groups = attention_groups([start] * rows)
    for t in range(prompt_len, len(seq)):
        step = dec.decode(ids[t].repeat(rows), torch.full((rows,), t), cache, start + t, valid,
                          groups)  # fmt: skip
        assert (step[1:] - ref[t]).abs().max().item() <= TOL


@pytest.mark.parametrize("family", FAMILIES)
def test_decoder_logits_match_transformers(tiny, family):
    _, model, engine = tiny[family]
    _check_decoder(model, engine.decoder, _prompts([40], 1000)[0], prompt_len=25)


def test_decoder_logits_match_transformers_smollm2(smol):
    model, engine = smol
    _check_decoder(model, engine.decoder, _prompts([48], 49152)[0], prompt_len=40)


def test_rope_scaling_matches_transformers(tmp_path):
    """llama3 and linear scaled RoPE: the decoder's logits still equal transformers'."""
    import json

    for scaling in (
        {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
         "original_max_position_embeddings": 64},
        {"rope_type": "linear", "factor": 2.0},
    ):  # fmt: skip
        path = make_tiny_hf("llama", tmp_path / scaling["rope_type"])
        cfg = json.loads((path / "config.json").read_text())
        cfg["rope_parameters"] = {"rope_theta": 10000.0, **scaling}
        (path / "config.json").write_text(json.dumps(cfg))
        assert load_arch(path).rope_scaling is not None
        engine = EmbeddedEngine.from_hf(path)
        _check_decoder(_hf_model(path), engine.decoder, _prompts([30], 1000)[0], prompt_len=20)


@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_matches_transformers_bf16(tiny, family):
    from transformers import AutoModelForCausalLM

    path = tiny[family][0]
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    engine = EmbeddedEngine.from_hf(path, dtype=torch.bfloat16)
    ids = torch.tensor(_prompts([30], 1000, seed=7)[0])
    with torch.no_grad():
        ref = model(ids[None]).logits[0].float()
    logits = engine.decoder.score(ids)
    assert logits.dtype == torch.float32 and (logits - ref).abs().max() <= 0.05
    (result,) = engine.generate([GenerationRequest("b", ids[:9].tolist(), SamplingParams(
        n=2, max_new_tokens=6, seed=0))])  # fmt: skip
    assert all(len(c.token_ids) == 6 and max(c.logprobs) <= 0 for c in result.completions)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(tiny, family):
    _, model, engine = tiny[family]
    prompts = _prompts([5, 17, 9], 1000)
    results = engine.generate(_requests(prompts, temperature=0, max_new_tokens=16))
    for prompt, result in zip(prompts, results):
        (completion,) = result.completions
        assert completion.token_ids == _hf_greedy(model, prompt, 16)
        assert completion.finish_reason == "length"
        got = torch.tensor(completion.logprobs)
        assert (got - _hf_logprobs(model, prompt, completion.token_ids)).abs().max() <= TOL


def test_smollm2_greedy_and_sampled_logprobs(smol, assets):
    from transformers import AutoTokenizer

    model, engine = smol
    tok = AutoTokenizer.from_pretrained(assets.model_dir)
    prompts = [
        list(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                     tokenize=True, return_dict=False))
        for q in ("What is 7 * 8?", "Simplify $\\sqrt{242}$ and explain each step.")
    ]  # fmt: skip
    greedy = engine.generate(_requests(prompts, temperature=0, max_new_tokens=6))
    sampled = engine.generate(_requests(prompts, temperature=0.7, max_new_tokens=6, seed=3))
    for prompt, g, s in zip(prompts, greedy, sampled):
        assert g.completions[0].token_ids == _hf_greedy(model, prompt, 6)
        for c in (g.completions[0], s.completions[0]):
            ref = _hf_logprobs(model, prompt, c.token_ids)
            assert (torch.tensor(c.logprobs) - ref).abs().max() <= TOL


def test_sampled_logprobs_are_unscaled(tiny):
    """At temperature 0.7 with top-k/top-p the log-probs are still log_softmax(raw logits)."""
    _, model, engine = tiny["qwen3"]
    prompts = _prompts([7, 12], 1000)
    params = dict(temperature=0.7, top_k=50, top_p=0.9, max_new_tokens=12, seed=5, n=2)
    for prompt, result in zip(prompts, engine.generate(_requests(prompts, **params))):
        for c in result.completions:
            ref = _hf_logprobs(model, prompt, c.token_ids)
            assert (torch.tensor(c.logprobs) - ref).abs().max() <= TOL


def test_seeded_sampling_is_deterministic_and_batch_independent(tiny):
    _, _, engine = tiny["llama"]
    prompts = _prompts([6, 15, 11, 3], 1000, seed=1)
    req = GenerationRequest("x", prompts[0], SamplingParams(n=3, max_new_tokens=20, seed=42))
    alone = engine.generate([req])[0].completions
    again = engine.generate([req])[0].completions
    others = _requests(prompts[1:], n=2, max_new_tokens=9, seed=7, temperature=0.5)
    mixed = engine.generate([*others, req])[-1].completions
    engine.max_batch_size = 2  # the request's samples now spread over two batches
    try:
        split = engine.generate([req, *others])[0].completions
    finally:
        engine.max_batch_size = 64
    tokens = [c.token_ids for c in alone]
    for run in (again, mixed, split):
        assert [c.token_ids for c in run] == tokens
    assert len({tuple(t) for t in tokens}) == 3  # the n samples differ


def test_requests_sharing_a_seed_draw_independent_streams(tiny):
    """Each request's stream comes from (seed, request id): two requests of one call with the
    same prompt and seed differ, and a request id reproduces its tokens in any call."""
    _, _, engine = tiny["qwen3"]
    prompt = _prompts([7], 1000, seed=3)[0]
    params = SamplingParams(n=2, max_new_tokens=12, seed=9)
    first, second = engine.generate(
        [
            GenerationRequest("replay/1/0", prompt, params),
            GenerationRequest("replay/1/1", prompt, params),
        ]
    )
    assert [c.token_ids for c in first.completions] != [c.token_ids for c in second.completions]
    (alone,) = engine.generate([GenerationRequest("replay/1/1", prompt, params)])
    assert [c.token_ids for c in alone.completions] == [c.token_ids for c in second.completions]


def test_sampling_follows_the_filtered_distribution(tiny):
    """One-token samples: only top-k / nucleus tokens appear, at their renormalised rates."""
    _, model, engine = tiny["qwen2"]
    prompt = _prompts([8], 1000, seed=2)[0]
    with torch.no_grad():
        logits = model(torch.tensor([prompt])).logits[0, -1].float()
    probs = torch.softmax(logits / 0.5, dim=-1)
    top = probs.topk(5)
    n = 3000
    req = GenerationRequest("d", prompt, SamplingParams(n=n, temperature=0.5, top_k=5,
                                                        max_new_tokens=1, seed=0))  # fmt: skip
    counts = torch.bincount(
        torch.tensor([c.token_ids[0] for c in engine.generate([req])[0].completions]),
        minlength=1000,
    ).float()
    assert counts.sum() == n and set(counts.nonzero()[:, 0].tolist()) <= set(top.indices.tolist())
    expected = top.values / top.values.sum()
    sigma = (expected * (1 - expected) / n).sqrt()
    assert ((counts[top.indices] / n - expected).abs() <= 5 * sigma + 1e-3).all()
    # top_p: the smallest set of most likely tokens reaching the mass; ~uniform logits are
    # avoided by the low temperature.
    cum = probs.sort(descending=True).values.cumsum(0)
    nucleus = int((cum < 0.6).sum()) + 1
    req = GenerationRequest("p", prompt, SamplingParams(n=200, temperature=0.5, top_p=0.6,
                                                        max_new_tokens=1, seed=1))  # fmt: skip
    seen = {c.token_ids[0] for c in engine.generate([req])[0].completions}
    assert seen <= set(probs.topk(nucleus).indices.tolist())


def test_stop_and_length(tiny):
    _, _, engine = tiny["qwen2"]
    prompt = _prompts([9], 1000, seed=3)[0]
    free = engine.generate(_requests([prompt], temperature=0, max_new_tokens=12))[0]
    tokens = free.completions[0].token_ids
    stop = tokens[4]
    cut = tokens.index(stop) + 1
    res = engine.generate(
        _requests([prompt, prompt[:5]], temperature=0, max_new_tokens=12, stop_token_ids=(stop,))
    )
    c = res[0].completions[0]
    assert c.token_ids == tokens[:cut] and c.finish_reason == "stop" and not c.truncated
    assert len(c.logprobs) == cut
    # Its batch mate keeps going after the first row stopped and was compacted away.
    alone = engine.generate(
        _requests([prompt[:5]], temperature=0, max_new_tokens=12, stop_token_ids=(stop,))
    )[0]
    assert res[1].completions[0].token_ids == alone.completions[0].token_ids
    short = engine.generate(_requests([prompt], temperature=0, max_new_tokens=3))[0]
    assert short.completions[0].token_ids == tokens[:3]
    assert short.completions[0].finish_reason == "length" and short.completions[0].truncated


def test_mixed_prompt_lengths_match_running_alone(tiny):
    _, _, engine = tiny["qwen3"]
    prompts = _prompts([3, 40, 11, 25, 1, 64], 1000, seed=4)
    batch = engine.generate(_requests(prompts, temperature=0, max_new_tokens=10))
    for i, prompt in enumerate(prompts):
        alone = engine.generate(_requests([prompt], temperature=0, max_new_tokens=10))[0]
        assert batch[i].completions[0].token_ids == alone.completions[0].token_ids
        assert torch.allclose(torch.tensor(batch[i].completions[0].logprobs),
                              torch.tensor(alone.completions[0].logprobs), atol=TOL)  # fmt: skip


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_shared_prefix_prefill_matches_running_alone(tiny, family):
    """Prompts with a common 30-token head (of different lengths, some with several samples):
    the head is prefilled once for the batch; tokens and log-probs equal each prompt alone."""
    _, model, engine = tiny[family]
    head = _prompts([30], 1000, seed=5)[0]
    tails = _prompts([1, 12, 5, 20], 1000, seed=6)
    prompts = [head + tail for tail in tails]
    params = dict(temperature=0, max_new_tokens=8)
    batch = engine.generate(
        [GenerationRequest(f"r{i}", p, SamplingParams(n=1 + i % 2, **params))
         for i, p in enumerate(prompts)]
    )  # fmt: skip
    for prompt, result in zip(prompts, batch):
        alone = engine.generate(_requests([prompt], **params))[0].completions[0]
        for completion in result.completions:
            assert completion.token_ids == alone.token_ids
            assert torch.allclose(torch.tensor(completion.logprobs), torch.tensor(alone.logprobs),
                                  atol=TOL)  # fmt: skip
            reference = _hf_logprobs(model, prompt, completion.token_ids)
            assert (torch.tensor(completion.logprobs) - reference).abs().max() <= TOL


def test_weight_update_version_and_validation(tiny, tmp_path):
    from safetensors.torch import load_file

    path, _, _ = tiny["llama"]
    engine = EmbeddedEngine.from_hf(path)
    other = make_tiny_hf("llama", tmp_path / "other", seed=1)
    other_model = _hf_model(other)
    new = load_file(other / "model.safetensors")
    names = expected_hf_names(engine.arch)
    prompt = _prompts([10], 1000, seed=5)[0]
    before = engine.generate(_requests([prompt], temperature=0, max_new_tokens=8))[0]
    assert before.completions[0].weight_version == 0

    buckets = [WeightBucket.from_tensors([(n, new[n]) for n in names[:7]]),
               WeightBucket.from_tensors([(n, new[n]) for n in names[7:]])]  # fmt: skip
    with pytest.raises(EngineError, match="pause"):
        engine.update_weights(buckets, 1)
    engine.pause()
    engine.update_weights(buckets, 1)
    engine.resume()
    after = engine.generate(_requests([prompt], temperature=0, max_new_tokens=8))[0]
    assert after.completions[0].weight_version == 1
    assert after.completions[0].token_ids == _hf_greedy(other_model, prompt, 8)
    assert after.completions[0].token_ids != before.completions[0].token_ids

    engine.pause()
    bad_name = [("model.layers.0.self_attn.nope.weight", torch.zeros(3))]
    n0 = names[0]
    bad_shape = [(n0, torch.zeros(2, 2))]
    bad_dtype = [(n0, new[n0].double())]
    for named, needle in ((bad_name, "nope"), (bad_shape, n0), (bad_dtype, n0)):
        with pytest.raises(EngineError, match=needle.replace(".", r"\.")):
            engine.update_weights([WeightBucket.from_tensors(named)], 2)
    with pytest.raises(EngineError, match=f"misses {len(names) - 1} tensors"):
        engine.update_weights([WeightBucket.from_tensors([(n0, new[n0])])], 2)
    assert engine.weight_version == 1


def test_get_weights_is_bit_exact(tiny):
    from safetensors.torch import load_file

    for family in FAMILIES:
        path, _, engine = tiny[family]
        disk = load_file(path / "model.safetensors")
        names = expected_hf_names(engine.arch)
        got = engine.get_weights(names)
        for name in names:
            assert got[name].device.type == "cpu" and torch.equal(got[name], disk[name]), name
        with pytest.raises(EngineError, match="unknown tensor"):
            engine.get_weights(["lm_head.weight" if family == "llama" else "model.bogus"])
    # Written through the fused storage and read back: exactly the values sent.
    path, _, engine = tiny["qwen2"]
    disk, names = load_file(path / "model.safetensors"), expected_hf_names(engine.arch)
    fresh = {n: torch.randn_like(t) for n, t in engine.get_weights(names).items()}
    engine.pause()
    engine.update_weights([WeightBucket.from_tensors(list(fresh.items()))], 99)
    engine.resume()
    got = engine.get_weights(names)
    assert all(torch.equal(got[n], fresh[n]) for n in names)
    engine.pause()
    engine.update_weights([WeightBucket.from_tensors(list(disk.items()))], 100)
    engine.resume()


def test_release_memory_and_small_batches(tiny):
    _, _, engine = tiny["qwen2"]
    prompts = _prompts([4, 30, 8], 1000, seed=6)
    ref = engine.generate(_requests(prompts, temperature=0, max_new_tokens=6))
    assert engine.release_memory(["kv_cache"]) > 0
    assert engine._buffer.numel() == 0
    engine.resume_memory(["kv_cache"])
    small = EmbeddedEngine(engine.arch, max_batch_size=1, max_batch_tokens=8, prefill_tokens=4)
    small.pause()
    small.update_weights(
        [
            WeightBucket.from_tensors(
                list(engine.get_weights(expected_hf_names(engine.arch)).items())
            )
        ],
        1,
    )
    small.resume()
    for r, s in zip(ref, small.generate(_requests(prompts, temperature=0, max_new_tokens=6))):
        assert r.completions[0].token_ids == s.completions[0].token_ids


def test_release_frees_weights_and_cache_for_real_and_the_sync_brings_them_back(tiny):
    """The colocated hand-off on CPU: release frees parameter and cache storage, nothing
    generates until a complete load is committed, and the reloaded engine equals the original."""
    engine = EmbeddedEngine.from_hf(tiny["llama"][0], seed=0)
    names = expected_hf_names(engine.arch)
    prompts = _prompts([5, 9], 1000, seed=11)
    ref = engine.generate(_requests(prompts, temperature=1.0, max_new_tokens=5, seed=3))
    weights = {n: t.clone() for n, t in engine.get_weights(names).items()}
    param_bytes = sum(t.untyped_storage().nbytes() for t in engine.decoder.base_tensors())
    cache_bytes = engine._buffer.untyped_storage().nbytes()
    assert cache_bytes > 0
    freed = engine.release_memory()
    assert freed == param_bytes + cache_bytes
    assert all(t.untyped_storage().nbytes() == 0 for t in engine.decoder.base_tensors())
    assert engine.release_memory() == 0  # already released: nothing more to free
    with pytest.raises(EngineError, match="released"):
        engine.generate(_requests(prompts, max_new_tokens=2))
    engine.resume_memory(["weights"])
    engine.pause()
    half = names[: len(names) // 2]
    engine.load_weights([WeightBucket.from_tensors([(n, weights[n]) for n in half])])
    with pytest.raises(EngineError, match="misses"):
        engine.commit_weights(engine.weight_version + 1)  # a partial load is never served
    engine.load_weights([WeightBucket.from_tensors(list(weights.items()))])
    engine.commit_weights(engine.weight_version + 1)
    engine.resume()
    with pytest.raises(EngineError, match="kv_cache"):
        engine.generate(_requests(prompts, max_new_tokens=2))
    engine.resume_memory(["kv_cache"])
    again = engine.generate(_requests(prompts, temperature=1.0, max_new_tokens=5, seed=3))
    for a, b in zip(ref, again):
        assert [c.token_ids for c in a.completions] == [c.token_ids for c in b.completions]
        assert [c.logprobs for c in a.completions] == [c.logprobs for c in b.completions]


def test_commit_needs_resumed_weights(tiny):
    engine = EmbeddedEngine.from_hf(tiny["qwen3"][0], seed=0)
    engine.release_memory(["weights"])
    engine.pause()
    with pytest.raises(EngineError, match="released"):
        engine.load_weights([])
    with pytest.raises(EngineError, match="released"):
        engine.commit_weights(engine.weight_version + 1)
    engine.resume()
    engine.resume_memory()
