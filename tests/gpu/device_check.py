"""GPU acceptance checks, one summary line each: run on a CUDA machine with tests/gpu/device_check.sh.

    nccl-train-step     the actor on NCCL (world of one, TP=1, bf16) trains two steps of a
                        randomly initialised model of SmolLM2's shape on a packed PG + NLL
                        batch: log-prob recompute, fused loss, backward, optimizer step; every
                        collective tensor on the GPU (the platform rule), loss and norm finite
    triton-fused-loss   the Triton kernels compiled on the GPU against the naive full-logits
                        reference (loss, log-probs, d_hidden, d_weight) in fp32 and bf16, at a
                        vocabulary that is not a multiple of 128
    gpu-parity          Megatron (local attention spec) logits against transformers on the GPU,
                        fp32, batch and THD pack
    weight-sync         the trained weights through the bucketed sync into the embedded engine
                        on the GPU, verified against the trainer's export

Needs torch, triton, transformers and megatron-core (a wheel carried there). ``--device cpu
--small`` runs the same code on CPU/gloo with tiny shapes (the Triton check under its
interpreter): the test suite does that, so this script cannot rot where no GPU is seen.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

SMOL = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048,
            rope_theta=100000.0, rms_norm_eps=1e-5, tie_word_embeddings=True)  # fmt: skip
SMALL = dict(vocab_size=1000, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
             rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=True)  # fmt: skip


def random_model(out: Path, shape: dict, seed: int = 0) -> Path:
    """A randomly initialised Llama of ``shape`` saved as an HF directory."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(**shape, architectures=["LlamaForCausalLM"], bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(out)
    return out


def training_batch(vocab: int, scale: int) -> list:
    """Rollout responses (two mixed groups) and meta-experiences, like a MEL step."""
    from megatron_mel.data.packing import TrainSample

    gen = torch.Generator().manual_seed(7)
    samples = []
    for prompt in range(2):
        context = torch.randint(3, vocab, (24 * scale,), generator=gen).tolist()
        for i in range(4):
            response = torch.randint(3, vocab, ((8 + 4 * i) * scale,), generator=gen).tolist()
            samples.append(TrainSample(tokens=context + response, num_context=len(context),
                                       term="pg", advantage=1.0 if i % 2 else -1.0,
                                       old_logprobs=[-5.0] * len(response),
                                       prompt_id=f"p{prompt}"))  # fmt: skip
    for k in range(2):
        context = torch.randint(3, vocab, (40 * scale,), generator=gen).tolist()
        me = torch.randint(3, vocab, (12 * scale,), generator=gen).tolist()
        samples.append(TrainSample(tokens=context + me, num_context=len(context), term="me",
                                   group_size=1, prompt_id=f"p{k}"))  # fmt: skip
    return samples


def check_train_step(hf_dir: Path, small: bool) -> tuple[str, object, object]:
    from megatron_mel import platform
    from megatron_mel.config import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_mel.convert.checkpoint import load_hf_weights
    from megatron_mel.models.arch import load_arch
    from megatron_mel.models.gpt import DTYPES, build_model_chunks
    from megatron_mel.trainer.actor import ActorSettings, build_actor

    dtype = "float32" if small else "bfloat16"
    arch = load_arch(hf_dir)
    parallel = ParallelConfig(tp=1, pp=1)
    model_cfg = ModelConfig(hf_dir=str(hf_dir), dtype=dtype, attention_backend="local")
    chunks = build_model_chunks(arch, model_cfg, parallel)
    load_hf_weights(
        chunks, str(hf_dir), arch, arch.padded_vocab_size(model_cfg.vocab_padding_multiple)
    )
    settings = ActorSettings(parallel=parallel, optim=OptimConfig(lr=1e-5), num_steps=2,
                             dtype=DTYPES[dtype])  # fmt: skip
    actor = build_actor(chunks, settings, AlgorithmConfig(), response_budget=64)
    batch = training_batch(arch.vocab_size, 1 if small else 4)
    device = platform.collective_device()
    expected = "cpu" if small else "cuda"
    if device.type != expected:
        raise AssertionError(f"the rule puts collective tensors on {device}, expected {expected}")
    start = time.perf_counter()
    responses = [s for s in batch if s.term == "pg"]
    logprobs = actor.compute_logprobs(responses)
    for sample, values in zip(responses, logprobs):
        sample.old_logprobs = values
    metrics = [actor.train_step(batch, step=s, num_prompts=2) for s in (1, 2)]
    seconds = time.perf_counter() - start
    for m in metrics:
        if not all(math.isfinite(m[k]) for k in ("loss", "pg_loss", "nll_loss", "grad_norm")):
            raise AssertionError(f"non-finite metrics {m}")
    tokens = sum(len(s.tokens) for s in batch)
    return (
        (
            f"{dist_backend()} {dtype} {arch.num_layers} layers, {tokens} tokens: loss "
            f"{metrics[0]['loss']:.4f} -> {metrics[1]['loss']:.4f}, grad_norm "
            f"{metrics[0]['grad_norm']:.3f}, nll_loss {metrics[1]['nll_loss']:.4f}, "
            f"{seconds:.1f}s"
        ),
        actor,
        arch,
    )


def dist_backend() -> str:
    import torch.distributed as dist

    return str(dist.get_backend())


def check_triton_loss(small: bool) -> str:
    from megatron_mel.ops import fused_combined_loss
    from megatron_mel.ops.reference import reference_combined_loss

    device = "cpu" if small else "cuda"
    T, H, V = (24, 32, 1003) if small else (2048, 576, 49157)
    worst = []
    for dtype, tol in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        gen = torch.Generator().manual_seed(3)
        hidden = (torch.randn(T, H, generator=gen) * 0.5).to(device, dtype).requires_grad_()
        weight = (torch.randn(V, H, generator=gen) * 0.05).to(device, dtype).requires_grad_()
        labels = torch.randint(0, V, (T,), generator=gen).to(device)
        loss_type = torch.randint(0, 3, (T,), generator=gen).to(device)
        token_weight = torch.rand(T, generator=gen).to(device)
        advantages = torch.randn(T, generator=gen).to(device)
        old = (torch.randn(T, generator=gen) * 0.1 - 8.0).to(device)
        args = (labels, loss_type, token_weight, advantages, old)
        out = fused_combined_loss(hidden, weight, *args, kernels="triton")
        d_h, d_w = torch.autograd.grad(out[0], (hidden, weight))
        ref = reference_combined_loss(hidden, weight, *args)
        r_h, r_w = torch.autograd.grad(ref[0], (hidden, weight))
        for name, got, want in (("loss", out[0], ref[0]), ("logprobs", out[1], ref[1]),
                                ("d_hidden", d_h, r_h), ("d_weight", d_w, r_w)):  # fmt: skip
            scale = want.float().abs().max().clamp_min(1e-6)
            err = float((got.float() - want.float()).abs().max() / scale)
            worst.append((err, f"{name} {str(dtype).removeprefix('torch.')}"))
            if err > tol:
                raise AssertionError(f"{name} in {dtype}: relative error {err:.2e} > {tol}")
    err, where = max(worst)
    return (
        f"T={T} H={H} V={V}: worst relative error {err:.2e} ({where}); fp32 <= 1e-4, bf16 <= 2e-2"
    )


def check_parity(hf_dir: Path) -> str:
    from megatron_mel.config import ModelConfig, ParallelConfig
    from megatron_mel.convert.checkpoint import load_hf_weights
    from megatron_mel.convert.verify import check_parity as parity
    from megatron_mel.models.arch import load_arch
    from megatron_mel.models.gpt import build_model_chunks

    arch = load_arch(hf_dir)
    model_cfg = ModelConfig(hf_dir=str(hf_dir), dtype="float32", attention_backend="local")
    chunks = build_model_chunks(arch, model_cfg, ParallelConfig())
    load_hf_weights(
        chunks, str(hf_dir), arch, arch.padded_vocab_size(model_cfg.vocab_padding_multiple)
    )
    report = parity(chunks, arch, hf_dir, torch.float32)
    assert report is not None
    if not report.ok(1e-3):
        raise AssertionError(
            f"logit diff batch {report.batch_max_abs_diff:.3e}, pack {report.packed_max_abs_diff:.3e}"
        )
    return (
        f"batch {report.batch_max_abs_diff:.3e}, THD pack {report.packed_max_abs_diff:.3e} "
        f"(max |logit| {report.logit_scale:.2f}; tolerance 1e-3)"
    )


def check_weight_sync(actor, arch, hf_dir: Path, small: bool) -> str:
    from megatron_mel.rollout.embedded import EmbeddedEngine
    from megatron_mel.rollout.weight_sync import RootTransport, WeightSynchronizer

    device = "cpu" if small else "cuda"
    dtype = next(actor.chunks[0].parameters()).dtype
    engine = EmbeddedEngine(arch, dtype=dtype, device=device, hf_dir=hf_dir)
    sync = WeightSynchronizer(actor.chunks, arch, RootTransport(engine), engine,
                              bucket_bytes=64 * 2**20, verify=True)  # fmt: skip
    metrics = sync.sync(version=1)
    return (
        f"{metrics.bytes / 2**20:.0f} MiB in {metrics.buckets} buckets, "
        f"{metrics.gb_per_s:.2f} GB/s, {int(metrics.extra['sync/verified_tensors'])} tensors verified"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tests/gpu/device_check.py")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--small", action="store_true", help="tiny shapes (the CPU self-test)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("device check: no CUDA device visible (run this on a GPU machine)", flush=True)
        return 2
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # read when triton decorates kernels
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29400 + os.getpid() % 1000))
    from megatron_mel import platform
    from megatron_mel.config import ParallelConfig

    shape = SMALL if args.small else SMOL
    work = Path(tempfile.mkdtemp(prefix="mel-device-check-"))
    hf_dir = random_model(work / "policy", shape)
    print(f"device check: torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}", flush=True)  # fmt: skip
    failures = 0

    def run(name: str, fn: Callable[[], object]) -> object:
        nonlocal failures
        start = time.perf_counter()
        try:
            result = fn()
        except Exception as exc:
            failures += 1
            traceback.print_exc()
            print(f"CHECK {name}: FAIL {type(exc).__name__}: {exc}", flush=True)
            return None
        detail = result[0] if isinstance(result, tuple) else result
        print(f"CHECK {name}: PASS {detail} [{time.perf_counter() - start:.1f}s]", flush=True)
        return result

    ctx = platform.init_distributed(
        ParallelConfig(backend="gloo" if args.device == "cpu" else "nccl")
    )
    assert ctx.backend == ("gloo" if args.device == "cpu" else "nccl")
    trained = run("nccl-train-step", lambda: check_train_step(hf_dir, args.small))
    run("triton-fused-loss", lambda: check_triton_loss(args.small))
    run("gpu-parity", lambda: check_parity(hf_dir))
    if trained is not None:
        _, actor, arch = trained  # type: ignore[misc]
        run("weight-sync", lambda: check_weight_sync(actor, arch, hf_dir, args.small))
    platform.destroy_distributed()
    print(f"device check: {4 - failures}/4 passed", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
