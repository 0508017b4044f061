"""EmbeddedEngine vs transformers ``generate``: sampling throughput on SmolLM2-135M-Instruct.

    python benchmarks/bench_generate.py [--prompts 32] [--new-tokens 128] [--device cpu]

Both sides get the same batch: the first ``--prompts`` MATH-500 questions through the chat
template (``add_generation_prompt=True``), exactly ``--new-tokens`` new tokens each (EOS stopping
off: ``min_new_tokens == max_new_tokens`` for transformers, no stop ids for the engine), plain
sampling at temperature 1.0 (transformers: ``do_sample=True, top_k=0, top_p=1.0``; engine:
``top_k=-1, top_p=1.0``), fp32, in this process and on the same threads. transformers runs with
its defaults (SDPA attention, its default dynamic cache) on the left-padded batch, as its docs
prescribe for batched generation. Each side first runs a 2-prompt x 4-token warm-up so one-time
costs (allocator, kernel selection) are not timed.

Throughput = generated tokens / wall seconds of the whole call (prefill included). The last line
is ``ratio tokens_per_s embedded/hf=<x>``.
"""

from __future__ import annotations

import argparse
import json
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach for the hub


def _prompts(tokenizer, data_path, count: int) -> list[list[int]]:
    with open(data_path) as f:
        questions = [json.loads(line)["question"] for line in f][:count]
    return [
        list(
            tokenizer.apply_chat_template(
                [{"role": "user", "content": q}],
                add_generation_prompt=True,
                tokenize=True,
                return_dict=False,
            )
        )
        for q in questions
    ]


def _run_hf(model, prompts: list[list[int]], new_tokens: int, pad_id: int, device) -> float:
    """Seconds for one left-padded ``generate`` call over ``prompts``."""
    import torch

    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + p for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    _sync(device)
    start = time.perf_counter()
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        do_sample=True,
        temperature=1.0,
        top_k=0,
        top_p=1.0,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        pad_token_id=pad_id,
    )
    _sync(device)
    seconds = time.perf_counter() - start
    assert out.shape == (len(prompts), width + new_tokens), out.shape
    return seconds


def _run_engine(engine, prompts: list[list[int]], new_tokens: int, device) -> float:
    """Seconds for one ``generate`` call over ``prompts``."""
    from megatron_mel.rollout.engine import GenerationRequest, SamplingParams

    params = SamplingParams(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=new_tokens)
    requests = [
        GenerationRequest(f"q{i}", p, SamplingParams(**{**_fields(params), "seed": i}))
        for i, p in enumerate(prompts)
    ]
    _sync(device)
    start = time.perf_counter()
    results = engine.generate(requests)
    _sync(device)
    seconds = time.perf_counter() - start
    assert all(len(r.completions[0].token_ids) == new_tokens for r in results)
    return seconds


def _fields(params) -> dict:
    return {name: getattr(params, name) for name in params.__dataclass_fields__}


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from megatron_mel.assets import prepare_assets
    from megatron_mel.rollout.embedded import EmbeddedEngine

    assets = prepare_assets()
    tokenizer = AutoTokenizer.from_pretrained(assets.model_dir)
    prompts = _prompts(tokenizer, assets.data["math500"], args.prompts)
    pad_id = tokenizer.pad_token_id
    lengths = sorted(map(len, prompts))
    print(
        f"model {assets.model_dir.name}, device {args.device}, fp32, torch threads "
        f"{torch.get_num_threads()}; {len(prompts)} prompts of {lengths[0]}..{lengths[-1]} tokens "
        f"(sum {sum(lengths)}, padded {len(prompts) * lengths[-1]}) x {args.new_tokens} new tokens"
    )

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(assets.model_dir, dtype=torch.float32)
    hf = hf.to(args.device).eval()
    engine = EmbeddedEngine.from_hf(assets.model_dir, dtype=torch.float32, device=args.device)
    generated = len(prompts) * args.new_tokens

    with torch.inference_mode():
        _run_engine(engine, prompts[:2], 4, args.device)
        embedded_s = _run_engine(engine, prompts, args.new_tokens, args.device)
    embedded_tps = generated / embedded_s
    print(f"embedded: {generated} tokens in {embedded_s:.2f} s = {embedded_tps:.1f} tokens/s")

    with torch.inference_mode():
        _run_hf(hf, prompts[:2], 4, pad_id, args.device)
        hf_s = _run_hf(hf, prompts, args.new_tokens, pad_id, args.device)
    hf_tps = generated / hf_s
    print(f"hf generate: {generated} tokens in {hf_s:.2f} s = {hf_tps:.1f} tokens/s")
    print(f"ratio tokens_per_s embedded/hf={embedded_tps / hf_tps:.2f}")


if __name__ == "__main__":
    main()
