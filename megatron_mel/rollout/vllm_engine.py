"""vLLM rollout engine: a ``vllm.LLM`` in its own process (rollout/vllm_host.py), with an RL
worker extension.

Why its own process: built inside a multi-rank torchrun job, vLLM's
``init_distributed_environment`` reuses the job's world and creates groups over all ranks, which
only the driver enters: a hang. ``in_process=True`` (one-process jobs only; refused otherwise)
keeps the engine core in this process for the zero-copy TP=1 path.

Generation: ``LLM.generate([{"prompt_token_ids": ids}, ...], sampling_params=[...])`` with
``vllm.SamplingParams(n, temperature, top_p, top_k, max_tokens, stop_token_ids, seed,
logprobs=0, ignore_eos=True)``. ``logprobs=0`` returns the log-prob of the sampled token only.
The engine is built with ``logprobs_mode="raw_logprobs"`` (also vLLM's default): log-probs are
``log_softmax`` of the model's raw logits, before temperature, penalties and top-k/top-p, which
is the unscaled quantity the contract asks for. ``ignore_eos=True`` keeps vLLM from adding the
generation-config EOS ids to the stop set, so exactly ``stop_token_ids`` end a completion (the
stop token stays in ``token_ids``). With a seed and ``n > 1``, vLLM gives child ``i`` the seed
``seed + i``, which is the same convention as the SGLang engine.

Weights: the worker extension (``worker_extension_cls`` = :data:`WORKER_EXTENSION`) adds
``mel_load_bucket`` and ``mel_get_weights`` to every vLLM worker, called through
``LLM.collective_rpc``. A bucket reaches the workers in one of three ways:

* ``direct``: the tensor object itself, for TP=1 with the engine core in this process. No copy.
* ``ipc``: a CUDA IPC handle pickled to bytes (``ForkingPickler``). Worker processes map the
  trainer's buffer and copy from it before the call returns.
* ``cpu``: the flat buffer copied to CPU and sent by value. This works everywhere and is slow.

Each worker calls ``model.load_weights`` with HF-named views of the flat buffer. vLLM's loaders
stack q/k/v and gate/up and take their own TP shard. The commit resets the prefix cache.
Quantized checkpoints would also need vLLM's post-load processing, which is not done here.

Memory: ``release_memory`` is ``LLM.sleep(level)`` (``enable_sleep_mode=True``), which frees
weights and KV cache together; level 1 keeps a CPU copy of the weights, level 2 does not (fine
when new weights are pushed right after). ``resume_memory(tags)`` is ``LLM.wake_up(tags)``.
Pause: ``LLM.generate`` blocks, so nothing runs between calls: ``pause``/``resume`` are state
only and ``flush`` resets the prefix cache.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Iterable, Sequence
from typing import Any, Literal

import torch

from megatron_mel.errors import ConfigError
from megatron_mel.rollout.engine import (
    Completion,
    EngineError,
    GenerationRequest,
    GenerationResult,
    RolloutEngine,
    SamplingParams,
    WeightBucket,
)
from megatron_mel.rollout.sglang_weights import (
    GPUBackendUnavailable,
    import_or_explain,
    require_cuda,
)

__all__ = [
    "WORKER_EXTENSION",
    "GPUBackendUnavailable",
    "MelWorkerExtension",
    "VLLMEngine",
    "bucket_payload",
    "parse_request_output",
    "sampling_kwargs",
]

WORKER_EXTENSION = "megatron_mel.rollout.vllm_engine.MelWorkerExtension"
Transport = Literal["auto", "direct", "ipc", "cpu"]

# (fused vLLM parameter, HF name part, index into the fused module's output_sizes)
_STACKED = (
    (".qkv_proj", ".q_proj", 0),
    (".qkv_proj", ".k_proj", 1),
    (".qkv_proj", ".v_proj", 2),
    (".gate_up_proj", ".gate_proj", 0),
    (".gate_up_proj", ".up_proj", 1),
)


# -- pure parts ------------------------------------------------------------------------------


def sampling_kwargs(p: SamplingParams) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one request."""
    return {
        "n": p.n,
        "temperature": p.temperature,
        "top_p": p.top_p,
        "top_k": p.top_k,
        "max_tokens": p.max_new_tokens,
        "stop_token_ids": list(p.stop_token_ids),
        "ignore_eos": True,
        "seed": p.seed,
        "logprobs": 0,
    }


def parse_request_output(output: Any, n: int, version: int) -> list[Completion]:
    """``n`` completions from a ``RequestOutput`` (``.outputs``: ``CompletionOutput`` list)."""
    outs = sorted(output.outputs, key=lambda o: getattr(o, "index", 0))
    if len(outs) != n:
        raise ValueError(f"expected {n} completions, got {len(outs)}")
    completions = []
    for out in outs:
        token_ids = [int(t) for t in out.token_ids]
        if out.logprobs is None or len(out.logprobs) != len(token_ids):
            raise ValueError("vLLM returned no log-prob for some sampled token (logprobs=0?)")
        logprobs = [float(step[tok].logprob) for tok, step in zip(token_ids, out.logprobs)]
        reason = out.finish_reason
        if reason not in ("stop", "length", "abort"):
            raise ValueError(f"unfinished or unknown finish_reason {reason!r}")
        completions.append(Completion(token_ids, logprobs, reason, version))
    return completions


def bucket_payload(bucket: WeightBucket, transport: Literal["direct", "ipc", "cpu"]) -> dict:
    """What ``mel_load_bucket`` receives: the buffer (or its IPC handle) and the entries."""
    entries = [[e.name, list(e.shape), e.offset, e.numel] for e in bucket.entries]
    if transport == "ipc":
        if not bucket.flat.is_cuda:
            raise ValueError("the ipc transport shares CUDA memory; got a CPU bucket")
        from multiprocessing.reduction import ForkingPickler

        import torch.multiprocessing  # noqa: F401  (registers the CUDA IPC reductions)

        return {"ipc": bytes(ForkingPickler.dumps(bucket.flat)), "entries": entries}
    flat = bucket.flat.cpu() if transport == "cpu" else bucket.flat
    return {"tensor": flat, "entries": entries}


def views_from_payload(payload: dict) -> list[tuple[str, torch.Tensor]]:
    flat = payload["tensor"] if "tensor" in payload else pickle.loads(payload["ipc"])
    return [
        (name, flat[offset : offset + numel].view(shape))
        for name, shape, offset, numel in payload["entries"]
    ]


# -- the worker side -------------------------------------------------------------------------


class MelWorkerExtension:
    """Mixed into vLLM's GPU worker class. ``self.model_runner`` is the worker's runner."""

    def _mel_model(self) -> Any:
        runner = self.model_runner  # type: ignore[attr-defined]
        getter = getattr(runner, "get_model", None)
        return getter() if callable(getter) else runner.model

    def mel_load_bucket(self, payload: dict) -> int:
        weights = views_from_payload(payload)
        self._mel_model().load_weights(weights=weights)
        if any(t.is_cuda for _, t in weights):
            torch.cuda.synchronize()  # the producer may free or reuse its buffer afterwards
        return len(weights)

    def mel_get_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        return read_hf_weights(self._mel_model(), names)


def read_hf_weights(model: torch.nn.Module, names: Sequence[str]) -> dict[str, torch.Tensor]:
    """HF-named tensors from a vLLM model on this TP rank (full tensors when TP=1): fused
    q/k/v and gate/up are sliced, padded vocab rows trimmed, a tied lm_head read from the
    embedding. Names with no counterpart are left out."""
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        tensor = _lookup(model, params, name)
        if tensor is not None:
            out[name] = tensor.detach().float().cpu()
    return out


def _lookup(model: torch.nn.Module, params: dict, name: str) -> torch.Tensor | None:
    if name in params:
        tensor = params[name]
        owner = _module(model, name)
        rows = getattr(owner, "org_vocab_size", None)
        if rows is not None and getattr(owner, "tp_size", 1) == 1:
            tensor = tensor[:rows]
        return tensor
    if name == "lm_head.weight" and "model.embed_tokens.weight" in params:
        return _lookup(model, params, "model.embed_tokens.weight")
    for fused, part, index in _STACKED:
        if part not in name:
            continue
        fused_name = name.replace(part, fused)
        owner = _module(model, fused_name)
        sizes = getattr(owner, "output_sizes", None)
        if fused_name not in params or sizes is None:
            return None
        tp = getattr(owner, "tp_size", 1)
        local = [size // tp for size in sizes]
        start = sum(local[:index])
        return params[fused_name].narrow(0, start, local[index])
    return None


def _module(model: torch.nn.Module, param_name: str) -> Any:
    try:
        return model.get_submodule(param_name.rsplit(".", 1)[0])
    except AttributeError:
        return None


# -- the engine ------------------------------------------------------------------------------


class VLLMEngine(RolloutEngine):
    """See the module docstring. ``llm``/``sampling_params_cls`` inject fakes for tests."""

    def __init__(
        self,
        model_path: str | None = None,
        *,
        tp: int = 1,
        gpu_memory_utilization: float = 0.5,
        dtype: str = "auto",
        seed: int = 1234,
        enable_sleep_mode: bool = True,
        sleep_level: int = 1,
        in_process: bool = False,
        weight_transport: Transport = "auto",
        llm_kwargs: dict[str, Any] | None = None,
        llm: Any = None,
        sampling_params_cls: Any = None,
        log_dir: str | None = None,
        name: str = "vllm",
    ) -> None:
        super().__init__(name)
        self.tp, self.sleep_level = tp, sleep_level
        self.in_process, self.weight_transport = in_process, weight_transport
        if llm is None:
            if model_path is None:
                raise ValueError("VLLMEngine needs model_path")
            require_cuda("vLLM rollout")
            vllm = import_or_explain("vllm", "vLLM rollout")
            kwargs = dict(
                model=str(model_path), tensor_parallel_size=tp,
                gpu_memory_utilization=gpu_memory_utilization, dtype=dtype, seed=seed,
                enable_sleep_mode=enable_sleep_mode, logprobs_mode="raw_logprobs",
                worker_extension_cls=WORKER_EXTENSION, **(llm_kwargs or {}),
            )  # fmt: skip
            if in_process:
                _refuse_in_multi_rank_job()
                # Engine core in this process: TP=1 workers receive tensors by reference.
                os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
                llm, sampling_params_cls = vllm.LLM(**kwargs), vllm.SamplingParams
            else:
                from megatron_mel.rollout.servers import server_env
                from megatron_mel.rollout.vllm_host import spawn_llm

                llm = spawn_llm(kwargs, env=server_env(colocate=True), log_dir=log_dir)
                sampling_params_cls = dict  # built into vllm.SamplingParams in the child
        if sampling_params_cls is None:
            raise ValueError("an injected llm needs sampling_params_cls")
        self.llm, self._sampling_cls = llm, sampling_params_cls

    def _transport_for(self, bucket: WeightBucket) -> Literal["direct", "ipc", "cpu"]:
        if self.weight_transport != "auto":
            return self.weight_transport
        if self.tp == 1 and self.in_process:
            return "direct"
        return "ipc" if bucket.flat.is_cuda else "cpu"

    def _generate(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        prompts = [{"prompt_token_ids": list(r.prompt_token_ids)} for r in requests]
        params = [self._sampling_cls(**sampling_kwargs(r.params)) for r in requests]
        outputs = self.llm.generate(prompts, sampling_params=params, use_tqdm=False)
        if len(outputs) != len(requests):
            raise EngineError(self.name, f"{len(outputs)} outputs for {len(requests)} prompts")
        return [
            GenerationResult(
                r.request_id,
                list(r.prompt_token_ids),
                parse_request_output(out, r.params.n, self._version),
            )
            for r, out in zip(requests, outputs)
        ]

    def _load_weights(self, buckets: Iterable[WeightBucket]) -> None:
        for bucket in buckets:
            if bucket.flat.is_cuda:
                torch.cuda.synchronize(bucket.flat.device)
            payload = bucket_payload(bucket, self._transport_for(bucket))
            # The call returns after every worker copied: the buffer may be reused after it.
            loaded = self.llm.collective_rpc("mel_load_bucket", args=(payload,))
            if any(count != len(bucket.entries) for count in loaded):
                raise EngineError(self.name, f"workers loaded {loaded} of {len(bucket.entries)}")

    def _commit_weights(self, version: int) -> None:
        self.llm.reset_prefix_cache()

    def _flush(self) -> None:
        self.llm.reset_prefix_cache()

    def get_weights(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """HF-named tensors from TP rank 0: whole tensors at TP=1, rank-0 shards beyond."""
        return self.llm.collective_rpc("mel_get_weights", args=(list(names),))[0]

    def _release_memory(self, tags: tuple[str, ...]) -> int:
        if set(tags) != {"weights", "kv_cache"}:
            raise EngineError(self.name, "vLLM's sleep releases weights and KV cache together")
        self.llm.reset_prefix_cache()
        self.llm.sleep(level=self.sleep_level)
        return 0  # vLLM does not report it; the hand-off measures free device memory

    def _resume_memory(self, tags: tuple[str, ...]) -> None:
        self.llm.wake_up(tags=list(tags))

    def shutdown(self) -> None:
        llm, self.llm = self.llm, None
        if llm is None:
            return
        if hasattr(llm, "shutdown"):  # the child process
            llm.shutdown()
            return
        engine = getattr(llm, "llm_engine", None)
        core = getattr(engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        del llm
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _refuse_in_multi_rank_job() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ConfigError(
            "vLLM in_process=True inside a multi-rank job would hang in vLLM's new_group over "
            "the trainer's world; use the default out-of-process vLLM"
        )
