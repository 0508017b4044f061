"""Real SGLang and vLLM engines on a GPU: generation with unscaled log-probs, a colocated weight
update that changes what is generated, weight read-back, and a memory release/resume cycle.

Skipped without CUDA or without the package. The model is ``$MEGATRON_MEL_TEST_MODEL``, or the
offline SmolLM2 asset (``make assets``).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from megatron_mel.config import RolloutConfig, ServerConfig
from megatron_mel.rollout.engine import GenerationRequest, SamplingParams, WeightBucket

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

PROMPT = list(range(200, 232))
NORM = "model.norm.weight"


@pytest.fixture(scope="module")
def model_dir() -> Path:
    env = os.environ.get("MEGATRON_MEL_TEST_MODEL")
    if env:
        return Path(env)
    from megatron_mel.assets import AssetsError, prepare_assets

    try:
        return prepare_assets(model=True, data=False).model_dir
    except AssetsError as exc:
        pytest.skip(f"no test model ({exc}); set MEGATRON_MEL_TEST_MODEL or run `make assets`")


def hf_norm(model_dir: Path) -> torch.Tensor:
    from safetensors import safe_open

    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            if NORM in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                return f.get_tensor(NORM)
    raise AssertionError(f"{NORM} not found in {model_dir}")


def logprob_errors(model_dir: Path, tokens: list[int], logprobs: list[float], temperature: float):
    """Mean |engine - HF| of the sampled tokens' log-probs, unscaled and temperature-scaled."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT + tokens])
    with torch.no_grad():
        logits = model(ids).logits[0, len(PROMPT) - 1 : -1]
    picked = torch.tensor(tokens).view(-1, 1)
    raw = torch.log_softmax(logits, -1).gather(1, picked).view(-1)
    scaled = torch.log_softmax(logits / temperature, -1).gather(1, picked).view(-1)
    got = torch.tensor(logprobs)
    return (got - raw).abs().mean().item(), (got - scaled).abs().mean().item()


def run_engine_checks(engine, model_dir: Path, load) -> None:
    """``load(bucket)`` delivers one bucket the way this engine's transport does."""
    greedy = [GenerationRequest("g", PROMPT, SamplingParams(temperature=0.0, max_new_tokens=12))]
    before = engine.generate(greedy)[0].completions[0]
    assert before.token_ids and all(lp <= 1e-4 for lp in before.logprobs)
    assert before.weight_version == 0

    sampled = GenerationRequest(
        "s", PROMPT, SamplingParams(n=2, temperature=0.5, max_new_tokens=12, seed=3)
    )
    for completion in engine.generate([sampled])[0].completions:
        unscaled, scaled = logprob_errors(model_dir, completion.token_ids, completion.logprobs, 0.5)
        assert unscaled < 0.1 and unscaled < scaled, (unscaled, scaled)

    norm = hf_norm(model_dir).float()
    got = engine.get_weights([NORM])[NORM]  # SGLang: a truncated prefix; vLLM: the whole tensor
    assert torch.allclose(got, norm[: got.numel()], atol=2e-2)

    flipped = (-norm).to(torch.bfloat16).cuda()  # negated final norm: other greedy tokens
    engine.pause()
    engine.flush()
    engine.begin_weight_update()
    load(WeightBucket.from_tensors([(NORM, flipped)]))
    engine.commit_weights(1)
    engine.resume()
    after = engine.generate(greedy)[0].completions[0]
    assert after.token_ids != before.token_ids and after.weight_version == 1
    got = engine.get_weights([NORM])[NORM]
    assert torch.allclose(got, flipped.float().cpu()[: got.numel()], atol=2e-2)

    engine.release_memory()
    engine.resume_memory()
    again = engine.generate(greedy)[0].completions[0]
    assert again.token_ids == after.token_ids  # weights survived the release


@pytest.mark.skipif(importlib.util.find_spec("sglang") is None, reason="needs sglang")
def test_sglang_real_engine(model_dir, tmp_path):
    """One server on GPU 0 started like a node's launcher starts it; the bucket goes over CUDA
    IPC as the colocated transport sends it (one entry: tp=1)."""
    from megatron_mel.platform import free_port
    from megatron_mel.rollout.http import poster
    from megatron_mel.rollout.placement import EngineSlot
    from megatron_mel.rollout.servers import NodeServers
    from megatron_mel.rollout.sglang_engine import SGLangEngine
    from megatron_mel.rollout.sglang_weights import sglang_serializer, tensor_request

    cfg = RolloutConfig(
        engine="sglang",
        placement="colocate",
        server=ServerConfig(
            mem_fraction_static=0.3,
            request_timeout_s=300,
            # Released weights come back only with a CPU backup; an RL step re-pushes them.
            extra_server_args=["--dtype", "bfloat16", "--enable-weights-cpu-backup"],
        ),
    )
    slot = EngineSlot(index=0, node=0, gpus=(0,), host="127.0.0.1", port=free_port())
    servers = NodeServers([slot], cfg.rollout, model_path=str(model_dir), seed=0, log_dir=tmp_path)
    servers.start()
    serialize = sglang_serializer()
    try:
        engine = SGLangEngine([slot.url], engine_tps=[1], truncate_size=4)

        def load(bucket):
            poster(
                slot.url, "/update_weights_from_tensor", tensor_request([serialize(bucket)]), 300
            )()

        run_engine_checks(engine, model_dir, load)
    finally:
        servers.close()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vllm")
def test_vllm_real_engine(model_dir, tmp_path):
    """vLLM in its own process (the default); buckets travel as CUDA IPC handles."""
    from megatron_mel.rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        str(model_dir),
        gpu_memory_utilization=0.3,
        dtype="bfloat16",
        llm_kwargs={"enforce_eager": True},
        log_dir=str(tmp_path),
    )
    try:
        run_engine_checks(engine, model_dir, lambda bucket: engine.load_weights([bucket]))
    finally:
        engine.shutdown()
