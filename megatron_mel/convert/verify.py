"""Logit parity between Megatron model chunks and the transformers implementation of a model.

Used by ``convert_checkpoint --verify`` and ``megatron-mel parity``. Two checks on fixed inputs:

* batch: a ``[2, 16]`` batch of random token ids, Megatron vs ``AutoModelForCausalLM``;
* packed: three sequences of different lengths packed as THD in one micro-batch, vs the same
  sequences run separately through transformers (so the packing is checked too).

Judged against the noise of the dtype itself. A fixed absolute tolerance cannot tell a defect
from rounding: on Qwen2.5-0.5B fp32, transformers' own logits differ from its fp64 logits by
3-6e-4, more than a correct Megatron conversion differs from transformers, and more than any
fixed 1e-4. So transformers also runs in fp64, and the check passes when

    max |Megatron - fp64|  <=  noise_factor * max |transformers(dtype) - fp64|  +  floor

for both the batch and the pack, i.e. when Megatron is as close to the exact function as
transformers at the same dtype is (measured ratios 0.8-1.25 on every family and layout here;
the default factor is 4). A real defect (a dropped bias, a wrong RoPE base, swapped QKV rows, one
corrupted tensor) moves logits by orders of magnitude more. The fp64 reference keeps
transformers' RoPE angles in fp32 (its rotary module computes them in fp32 whatever the dtype).

``megatron-mel parity`` also compares token log-probs computed through the actor's loss path
(:class:`~megatron_mel.trainer.actor.PolicyRunner`, the fused loss with the padded vocabulary
masked) with transformers' ``log_softmax`` over the true vocabulary.

Importing this module is cheap (no megatron-core); the collective parts import it lazily.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_mel.models.arch import ModelArch

BATCH_SHAPE = (2, 16)
PACKED_LENGTHS = (5, 13, 8)
NOISE_FACTOR = 4.0
# Added to the noise bound so that a transformers forward that happens to round like fp64 (tiny
# models, few layers) does not turn Megatron's own fp32 rounding into a failure.
ABS_FLOOR = {"float32": 1e-5, "bfloat16": 1e-3, "float16": 1e-3}


@dataclass(frozen=True, slots=True)
class Distance:
    """Max abs differences of one check, all against the fp64 transformers reference unless
    named otherwise."""

    megatron: float
    """max |Megatron - transformers fp64|."""
    noise: float
    """max |transformers at the checked dtype - transformers fp64|: the dtype's own error."""
    vs_transformers: float
    """max |Megatron - transformers at the checked dtype| (what a fixed tolerance would read)."""

    def ok(self, factor: float, floor: float) -> bool:
        return self.megatron <= factor * self.noise + floor

    def describe(self) -> str:
        return (
            f"Megatron {self.megatron:.3e}, transformers {self.noise:.3e} "
            f"(ratio {self.megatron / self.noise if self.noise else float('inf'):.2f}); "
            f"Megatron vs transformers {self.vs_transformers:.3e}"
        )


@dataclass(frozen=True, slots=True)
class ParityReport:
    batch: Distance
    packed: Distance
    logit_scale: float
    """max |logit| of the references, so a diff is read against the logit magnitude."""
    logprobs: Distance | None = None
    """Token log-probs through the actor's loss path (``megatron-mel parity`` only)."""

    def ok(self, factor: float = NOISE_FACTOR, floor: float = ABS_FLOOR["float32"]) -> bool:
        checks = [self.batch, self.packed] + ([self.logprobs] if self.logprobs else [])
        return all(check.ok(factor, floor) for check in checks)


def reference_inputs(vocab_size: int) -> tuple[torch.Tensor, list[list[int]]]:
    gen = torch.Generator().manual_seed(0)
    batch = torch.randint(0, vocab_size, BATCH_SHAPE, generator=gen)
    packed = [torch.randint(0, vocab_size, (n,), generator=gen).tolist() for n in PACKED_LENGTHS]
    return batch, packed


def transformers_logits(
    hf_dir: str | Path, batch: torch.Tensor, packed: list[list[int]], dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference logits: ``[b, s, V]`` for the batch and ``[t, V]`` for the packed sequences
    (each run separately), in fp64 whatever ``dtype`` computed them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=dtype)
    model.eval()
    with torch.no_grad():
        ref_batch = model(batch).logits.double()
        ref_packed = torch.cat([model(torch.tensor([seq])).logits[0].double() for seq in packed])
    del model
    return ref_batch, ref_packed


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    # Megatron's logits may sit on the GPU; the transformers references are on the CPU.
    return (a.detach().cpu().double() - b.detach().cpu().double()).abs().max().item()


def _distance(megatron: torch.Tensor, at_dtype: torch.Tensor, exact: torch.Tensor) -> Distance:
    return Distance(
        megatron=_max_diff(megatron, exact),
        noise=_max_diff(at_dtype, exact),
        vs_transformers=_max_diff(megatron, at_dtype),
    )


def packed_logprobs(logits: torch.Tensor, packed: list[list[int]]) -> torch.Tensor:
    """log_softmax log-probs of every next token of each packed sequence, concatenated."""
    out, start = [], 0
    for seq in packed:
        logp = torch.log_softmax(logits[start : start + len(seq) - 1].double(), dim=-1)
        out.append(logp.gather(1, torch.tensor(seq[1:])[:, None])[:, 0])
        start += len(seq)
    return torch.cat(out)


def check_parity(
    chunks: list[torch.nn.Module],
    arch: ModelArch,
    hf_dir: str | Path,
    dtype: torch.dtype,
    *,
    with_logprobs: bool = False,
) -> ParityReport | None:
    """Run the checks; collective over all ranks, report on global rank 0 (None elsewhere).

    ``with_logprobs`` adds the log-prob check through the actor's loss path.
    """
    from megatron_mel.models.forward import (
        batched_micro_batch,
        forward_logits,
        packed_micro_batch,
        share_from_last_stage,
    )

    batch, packed = reference_inputs(arch.vocab_size)
    micro_batches = [batched_micro_batch(batch), packed_micro_batch(packed)]
    logits = share_from_last_stage(forward_logits(chunks, micro_batches, arch.vocab_size))
    logprobs = _actor_logprobs(chunks, arch, packed) if with_logprobs else None
    if dist.get_rank() != 0:
        return None
    at_dtype = transformers_logits(hf_dir, batch, packed, dtype)
    exact = transformers_logits(hf_dir, batch, packed, torch.float64)
    lp = None
    if logprobs is not None:
        lp = _distance(logprobs, packed_logprobs(at_dtype[1], packed),
                       packed_logprobs(exact[1], packed))  # fmt: skip
    return ParityReport(
        batch=_distance(logits[0], at_dtype[0], exact[0]),
        packed=_distance(logits[1][0], at_dtype[1], exact[1]),
        logit_scale=max(exact[0].abs().max().item(), exact[1].abs().max().item()),
        logprobs=lp,
    )


def _actor_logprobs(
    chunks: list[torch.nn.Module], arch: ModelArch, packed: list[list[int]]
) -> torch.Tensor:
    """Token log-probs of the packed sequences as the trainer computes pi_old (collective)."""
    from megatron_mel.config import ParallelConfig
    from megatron_mel.data.packing import TrainSample
    from megatron_mel.trainer.actor import PolicyRunner

    config = chunks[0].config
    parallel = ParallelConfig(
        tp=config.tensor_model_parallel_size,
        pp=config.pipeline_model_parallel_size,
        vpp=config.virtual_pipeline_model_parallel_size,
    )
    runner = PolicyRunner(chunks, parallel, micro_batch_tokens=4096, vocab_size=arch.vocab_size,
                          max_seq_len=max(PACKED_LENGTHS))  # fmt: skip
    samples = [TrainSample(tokens=list(seq), num_context=1, term="me") for seq in packed]
    return torch.tensor([v for values in runner.compute_logprobs(samples) for v in values])


def stop_unless_parity(
    report: ParityReport | None, factor: float, floor: float, header: str
) -> None:
    """Print the report on rank 0 after ``header``; exit 1 on every rank if it failed.

    Collective: every rank calls it (``report`` is None except on global rank 0).
    """
    failed = report is not None and not report.ok(factor, floor)
    if report is not None:
        lines = [
            f"{header} max abs logit diff vs fp64 transformers:",
            f"  batch {BATCH_SHAPE[0]}x{BATCH_SHAPE[1]}: {report.batch.describe()}",
            f"  THD pack of {len(PACKED_LENGTHS)}: {report.packed.describe()}",
        ]
        if report.logprobs is not None:
            lines.append(f"  token log-probs (actor loss path): {report.logprobs.describe()}")
            lines.append(f"logprobs max abs diff {report.logprobs.vs_transformers:.3e}")
        lines.append(
            f"max |logit| {report.logit_scale:.2f}; pass when Megatron <= {factor:g} x "
            f"transformers + {floor:g}: {'FAIL' if failed else 'OK'}"
        )
        print("\n".join(lines), flush=True)
    flag = [failed]
    dist.broadcast_object_list(flag, src=0)
    if flag[0]:
        raise SystemExit(1)


def run_parity(hf_dir: str, tp: int, pp: int, dtype_name: str, factor: float, floor: float) -> None:
    """Worker body of ``megatron-mel parity``: load HF weights at (tp, pp) and compare logits
    and the actor's token log-probs with transformers.

    Every rank calls it; raises SystemExit(1) on all ranks when the check fails.
    """
    from megatron_mel import platform
    from megatron_mel.config import ModelConfig, ParallelConfig
    from megatron_mel.convert.checkpoint import load_hf_weights
    from megatron_mel.models.arch import load_arch
    from megatron_mel.models.gpt import DTYPES, attention_backend, build_model_chunks

    parallel = ParallelConfig(tp=tp, pp=pp)
    ctx = platform.init_distributed(parallel)
    try:
        arch = load_arch(hf_dir)
        model_cfg = ModelConfig(hf_dir=hf_dir, dtype=dtype_name)  # type: ignore[arg-type]
        padded = arch.padded_vocab_size(model_cfg.vocab_padding_multiple)
        chunks = build_model_chunks(arch, model_cfg, parallel)
        load_hf_weights(chunks, hf_dir, arch, padded)
        report = check_parity(chunks, arch, hf_dir, DTYPES[dtype_name], with_logprobs=True)
        header = (
            f"parity {arch.family} ({arch.num_layers} layers, {arch.num_heads}/"
            f"{arch.num_kv_heads} heads, vocab {arch.vocab_size} padded to {padded}) tp={tp} "
            f"pp={pp} dp={ctx.dp_size} {dtype_name} attention={attention_backend(model_cfg)}:"
        )
        stop_unless_parity(report, factor, floor, header)
    finally:
        platform.destroy_distributed()
