"""vLLM engine on CPU, up to the process boundary: SamplingParams arguments, RequestOutput
parsing, weight buckets through the worker extension into a vLLM-shaped model (fused q/k/v,
padded vocabulary, tied lm_head), memory release/resume, and the CPU error."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from megatron_mel.rollout.engine import EngineError, GenerationRequest, SamplingParams, WeightBucket
from megatron_mel.rollout.vllm_engine import (
    WORKER_EXTENSION,
    GPUBackendUnavailable,
    MelWorkerExtension,
    VLLMEngine,
    bucket_payload,
    parse_request_output,
    read_hf_weights,
    sampling_kwargs,
    views_from_payload,
)

HIDDEN, Q, KV, VOCAB, PADDED = 4, 4, 2, 6, 8


# -- a model laid out like vLLM's (fused projections, padded vocabulary, tied head) ----------


class FusedLinear(nn.Module):
    def __init__(self, sizes: list[int], hidden: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(sum(sizes), hidden))
        self.output_sizes, self.tp_size = sizes, 1


class PaddedEmbedding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(PADDED, HIDDEN))
        self.org_vocab_size, self.tp_size = VOCAB, 1


class VllmShapedModel(nn.Module):
    """Parameter names and ``load_weights`` follow vLLM's Llama: HF names in, fused storage."""

    def __init__(self) -> None:
        super().__init__()
        layer = nn.Module()
        layer.self_attn = nn.Module()
        layer.self_attn.qkv_proj = FusedLinear([Q, KV, KV], HIDDEN)
        layer.mlp = nn.Module()
        layer.mlp.down_proj = nn.Linear(HIDDEN, HIDDEN, bias=False)
        self.model = nn.Module()
        self.model.embed_tokens = PaddedEmbedding()
        self.model.layers = nn.ModuleList([layer])
        self.model.norm = nn.Module()
        self.model.norm.weight = nn.Parameter(torch.zeros(HIDDEN))
        self.loaded: list[str] = []

    @torch.no_grad()
    def load_weights(self, weights):
        params = dict(self.named_parameters())
        for name, tensor in weights:
            self.loaded.append(name)
            if name == "lm_head.weight":
                continue  # tied to the embedding
            for part, index in ((".q_proj", 0), (".k_proj", 1), (".v_proj", 2)):
                if part in name:
                    fused = params[name.replace(part, ".qkv_proj")]
                    start = [0, Q, Q + KV][index]
                    fused[start : start + tensor.shape[0]].copy_(tensor)
                    break
            else:
                params[name][: tensor.shape[0]].copy_(tensor)


class Worker(MelWorkerExtension):
    def __init__(self) -> None:
        self.model_runner = SimpleNamespace(model=VllmShapedModel())


class FakeLLM:
    """The ``vllm.LLM`` surface the engine uses; ``collective_rpc`` runs on every worker."""

    def __init__(self, workers: int = 2) -> None:
        self.workers = [Worker() for _ in range(workers)]
        self.calls: list[tuple] = []

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append(("generate", prompts, sampling_params, use_tqdm))
        outputs = []
        for prompt, sp in zip(prompts, sampling_params):
            completions = []
            for i in range(sp["n"]):
                tokens = [len(prompt["prompt_token_ids"]) + i, *sp["stop_token_ids"][:1]]
                steps = [
                    {t: SimpleNamespace(logprob=-0.25 * (k + 1))} for k, t in enumerate(tokens)
                ]
                reason = "stop" if sp["stop_token_ids"] else "length"
                completions.append(
                    SimpleNamespace(index=i, token_ids=tokens, logprobs=steps, finish_reason=reason)
                )
            outputs.append(SimpleNamespace(outputs=completions[::-1]))  # order restored by index
        return outputs

    def collective_rpc(self, method, args=()):
        self.calls.append(("rpc", method))
        return [getattr(worker, method)(*args) for worker in self.workers]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def names(self):
        return [c[0] if c[0] != "rpc" else f"rpc:{c[1]}" for c in self.calls]


def make_engine(**kwargs) -> tuple[VLLMEngine, FakeLLM]:
    llm = FakeLLM()
    return VLLMEngine(llm=llm, sampling_params_cls=lambda **kw: kw, **kwargs), llm


def hf_buckets() -> list[WeightBucket]:
    g = torch.Generator().manual_seed(0)
    attn = "model.layers.0.self_attn"
    first = WeightBucket.from_tensors(
        [
            (f"{attn}.q_proj.weight", torch.randn(Q, HIDDEN, generator=g)),
            (f"{attn}.k_proj.weight", torch.randn(KV, HIDDEN, generator=g)),
            (f"{attn}.v_proj.weight", torch.randn(KV, HIDDEN, generator=g)),
            ("model.embed_tokens.weight", torch.randn(VOCAB, HIDDEN, generator=g)),
        ]
    )
    second = WeightBucket.from_tensors(
        [
            ("model.layers.0.mlp.down_proj.weight", torch.randn(HIDDEN, HIDDEN, generator=g)),
            ("model.norm.weight", torch.randn(HIDDEN, generator=g)),
        ]
    )
    return [first, second]


# -- pure parts ------------------------------------------------------------------------------


def test_sampling_kwargs_are_exact():
    params = SamplingParams(n=4, temperature=0.8, top_p=0.95, top_k=50, max_new_tokens=64,
                            stop_token_ids=(2, 9), seed=11)  # fmt: skip
    assert sampling_kwargs(params) == {
        "n": 4, "temperature": 0.8, "top_p": 0.95, "top_k": 50, "max_tokens": 64,
        "stop_token_ids": [2, 9], "ignore_eos": True, "seed": 11, "logprobs": 0,
    }  # fmt: skip
    assert sampling_kwargs(SamplingParams())["seed"] is None


def _completion(index, tokens, reason, logprobs=True):
    steps = [{t: SimpleNamespace(logprob=-1.0 - k), t + 1000: SimpleNamespace(logprob=-9.0)}
             for k, t in enumerate(tokens)] if logprobs else None  # fmt: skip
    return SimpleNamespace(index=index, token_ids=tokens, logprobs=steps, finish_reason=reason)


def test_parse_request_output_reads_the_sampled_token_logprob():
    output = SimpleNamespace(
        outputs=[_completion(1, [5], "length"), _completion(0, [3, 2], "stop")]
    )
    first, second = parse_request_output(output, 2, version=3)
    assert first.token_ids == [3, 2] and first.logprobs == [-1.0, -2.0]
    assert first.finish_reason == "stop" and second.truncated and second.weight_version == 3
    aborted = parse_request_output(SimpleNamespace(outputs=[_completion(0, [], "abort")]), 1, 0)
    assert aborted[0].finish_reason == "abort"


@pytest.mark.parametrize(
    "outputs, problem",
    [
        ([_completion(0, [1], "stop")] * 2, "expected 1"),
        ([_completion(0, [1], "stop", logprobs=False)], "log-prob"),
        ([_completion(0, [1], None)], "finish_reason"),
    ],
)
def test_parse_request_output_rejects(outputs, problem):
    with pytest.raises(ValueError, match=problem):
        parse_request_output(SimpleNamespace(outputs=outputs), 1, 0)


def test_bucket_payload_entries_and_views():
    bucket = hf_buckets()[1]
    payload = bucket_payload(bucket, "direct")
    assert payload["tensor"] is bucket.flat
    assert payload["entries"] == [["model.layers.0.mlp.down_proj.weight", [4, 4], 0, 16],
                                  ["model.norm.weight", [4], 16, 4]]  # fmt: skip
    views = views_from_payload(bucket_payload(bucket, "cpu"))
    assert [(n, tuple(t.shape)) for n, t in views] == [
        (n, tuple(t.shape)) for n, t in bucket.tensors()
    ]
    with pytest.raises(ValueError, match="CUDA"):
        bucket_payload(bucket, "ipc")
    assert f"{MelWorkerExtension.__module__}.{MelWorkerExtension.__name__}" == WORKER_EXTENSION


# -- the engine over a fake LLM --------------------------------------------------------------


def test_generate_builds_prompts_and_params():
    engine, llm = make_engine()
    reqs = [
        GenerationRequest("a", [1, 2, 3], SamplingParams(n=2, stop_token_ids=(7,), seed=5)),
        GenerationRequest("b", [4], SamplingParams(max_new_tokens=9)),
    ]
    results = engine.generate(reqs)
    _, prompts, params, use_tqdm = llm.calls[0]
    assert prompts == [{"prompt_token_ids": [1, 2, 3]}, {"prompt_token_ids": [4]}]
    assert params == [sampling_kwargs(r.params) for r in reqs] and use_tqdm is False
    assert [r.request_id for r in results] == ["a", "b"]
    assert [c.token_ids for c in results[0].completions] == [[3, 7], [4, 7]]
    assert results[0].completions[0].logprobs == [-0.25, -0.5]
    assert results[1].completions[0].finish_reason == "length"


@pytest.mark.parametrize("transport", ["auto", "cpu"])
def test_update_weights_loads_hf_buckets_on_every_worker(transport):
    engine, llm = make_engine(weight_transport=transport)
    buckets = hf_buckets()
    with pytest.raises(EngineError, match="pause"):
        engine.update_weights(buckets, 1)
    engine.pause()
    engine.update_weights(iter(buckets), 1)
    engine.resume()
    assert engine.weight_version == 1
    assert llm.names()[-3:] == ["rpc:mel_load_bucket", "rpc:mel_load_bucket", "reset_prefix_cache"]
    expected = dict(t for b in buckets for t in b.tensors())
    for worker in llm.workers:
        got = read_hf_weights(worker.model_runner.model, list(expected))
        assert got.keys() == expected.keys()
        for name, tensor in expected.items():
            assert torch.equal(got[name], tensor), name
    via_engine = engine.get_weights([*expected, "lm_head.weight", "not.there"])
    assert torch.equal(via_engine["lm_head.weight"], expected["model.embed_tokens.weight"])
    assert via_engine["model.embed_tokens.weight"].shape == (VOCAB, HIDDEN)  # padding trimmed
    assert "not.there" not in via_engine
    results = engine.generate([GenerationRequest("x", [1], SamplingParams(max_new_tokens=1))])
    assert results[0].completions[0].weight_version == 1


def test_worker_count_mismatch_is_an_engine_error():
    engine, llm = make_engine()
    llm.workers[1].mel_load_bucket = lambda payload: 0
    engine.pause()
    with pytest.raises(EngineError, match="loaded"):
        engine.update_weights(hf_buckets(), 1)
    assert engine.weight_version == 0


def test_flush_release_resume_memory():
    engine, llm = make_engine(sleep_level=2)
    engine.flush()
    engine.release_memory()
    with pytest.raises(EngineError, match="released") as info:
        engine.generate([GenerationRequest("q", [1], SamplingParams())])
    assert info.value.lost == ["q"]
    engine.resume_memory(["weights"])
    with pytest.raises(EngineError):
        engine.generate([GenerationRequest("q", [1], SamplingParams())])
    engine.resume_memory(["kv_cache"])
    engine.generate([GenerationRequest("q", [1], SamplingParams())])
    engine.release_memory()
    engine.resume_memory()
    assert ("sleep", 2) in llm.calls and ("wake_up", ["weights"]) in llm.calls
    assert ("wake_up", ["kv_cache"]) in llm.calls and (
        "wake_up",
        ["weights", "kv_cache"],
    ) in llm.calls
    assert llm.names().count("reset_prefix_cache") == 3  # flush + two releases


def test_vllm_without_cuda_explains_itself():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(
        GPUBackendUnavailable,
        match=r"pip install -e \.\[sglang\]` or `\.\[vllm\].*rollout.engine: embedded",
    ):
        VLLMEngine("/models/x")
    with pytest.raises(ValueError, match="sampling_params_cls"):
        VLLMEngine(llm=FakeLLM())


def test_vllm_runs_in_a_process_of_its_own(tmp_path):
    """The default: the LLM lives in a child process (a multi-rank job would hang in vLLM's
    new_group otherwise); calls, weight buckets and sleep/wake cross the process boundary."""
    import os

    from megatron_mel.rollout.vllm_host import spawn_llm
    from tests.conftest import REPO

    env = {**os.environ, "PYTHONPATH": str(REPO), "RANK": "3", "WORLD_SIZE": "8"}
    remote = spawn_llm({"workers": 2}, env=env, log_dir=tmp_path,
                       factory="tests.unit.test_vllm_engine:FakeLLM", params_factory="builtins:dict")  # fmt: skip
    engine = VLLMEngine(llm=remote, sampling_params_cls=dict, weight_transport="cpu")
    try:
        (result,) = engine.generate(
            [GenerationRequest("a", [1, 2], SamplingParams(n=2, stop_token_ids=(7,)))]
        )
        assert [c.token_ids for c in result.completions] == [[2, 7], [3, 7]]
        buckets = hf_buckets()
        engine.pause()
        engine.update_weights(buckets, 1)
        engine.resume()
        expected = dict(t for b in buckets for t in b.tensors())
        got = engine.get_weights(list(expected))
        assert all(torch.equal(got[n], t) for n, t in expected.items())
        engine.release_memory()
        engine.resume_memory()
        with pytest.raises(EngineError, match="unknown method"):
            remote._call("not_a_method")
    finally:
        engine.shutdown()
    assert remote.proc.poll() is not None
