"""One global batch trained with and without shared-prefix packing: loss, gradients, log-probs.

argv: OUT_DIR HF_DIR TP PP
The batch (actor_invariance.global_batch) holds 2 prompts x 4 responses, so sharing packs each
prompt once, and 3 meta-experiences whose contexts start with the same 12 tokens. Rank 0 writes OUT_DIR/shared-tp<TP>-pp<PP>.json: both losses, the packed token
counts, the largest relative gradient difference over every rank's parameters (main_grad, summed
over data-parallel ranks) and the largest log-prob difference.
"""

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    from megatron.core import parallel_state as ps

    from megatron_mel import platform
    from megatron_mel.config import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_mel.convert.checkpoint import load_hf_weights, unwrap
    from megatron_mel.data.packing import pack_micro_batches, shard_for_data_parallel
    from megatron_mel.models.arch import load_arch
    from megatron_mel.models.gpt import build_model_chunks
    from megatron_mel.trainer.actor import ActorSettings, build_actor
    from tests.parallel.workers.actor_invariance import global_batch

    out, hf_dir, tp, pp = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    parallel = ParallelConfig(tp=tp, pp=pp, use_distributed_optimizer=False)
    ctx = platform.init_distributed(parallel)
    arch = load_arch(hf_dir)
    chunks = build_model_chunks(arch, ModelConfig(hf_dir=hf_dir, dtype="float32"), parallel)
    load_hf_weights(chunks, hf_dir, arch, arch.padded_vocab_size(1024))
    settings = ActorSettings(parallel=parallel, optim=OptimConfig(lr=1e-3), num_steps=1,
                             dtype=torch.float32, vocab_size=arch.vocab_size,
                             max_seq_len=4096)  # fmt: skip
    algorithm = AlgorithmConfig(clip_low=0.1, clip_high=0.3, nll_coef=0.5)
    actor = build_actor(chunks, settings, algorithm, response_budget=16)

    def batch() -> list:
        """global_batch, with a common 12-token head before the meta-experience contexts (as
        the reflection template gives them): they share it, the responses their prompts."""
        from megatron_mel.data.packing import TrainSample

        head = list(range(3, 15))
        return [
            TrainSample(tokens=head + s.tokens, num_context=len(head) + s.num_context,
                        term=s.term, group_size=s.group_size, prompt_id=s.prompt_id)
            if s.term == "me" else s
            for s in global_batch(arch.vocab_size)
        ]  # fmt: skip

    runs = {}
    for share in (False, True):
        actor.share_prefixes = share
        samples = batch()
        metrics = actor.forward_backward(samples, step=1, num_prompts=2)
        mine = shard_for_data_parallel(samples, ctx.dp_rank, ctx.dp_size, share_prefixes=share)
        local = [samples[i] for i in mine]
        tokens = sum(mb.num_tokens for mb in pack_micro_batches(local, 8192, share_prefixes=share))
        grads = {n: p.main_grad.detach().clone()
                 for n, p in unwrap(actor.chunks[0]).named_parameters()}  # fmt: skip
        runs[share] = (metrics, tokens, grads, [s.train_logprobs for s in samples])
    (plain, plain_tokens, ref, ref_lp), (shared, shared_tokens, got, got_lp) = (
        runs[False],
        runs[True],
    )
    worst = max(
        float((got[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in ref.items()
    )
    logprob = max(abs(a - b) for x, y in zip(ref_lp, got_lp) for a, b in zip(x, y, strict=True))
    stats = torch.tensor([worst, logprob], dtype=torch.float64)
    torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
    tokens = torch.tensor([plain_tokens, shared_tokens])
    torch.distributed.all_reduce(tokens, group=ps.get_data_parallel_group())
    if ctx.rank == 0:
        (out / f"shared-tp{tp}-pp{pp}.json").write_text(json.dumps({
            "loss": [plain["loss"], shared["loss"]],
            "nll_loss": [plain["nll_loss"], shared["nll_loss"]],
            "tokens": tokens.tolist(),
            "max_rel_grad_diff": float(stats[0]),
            "max_logprob_diff": float(stats[1]),
            "lengths_match": all(len(a) == len(b) for a, b in zip(ref_lp, got_lp)),
        }))  # fmt: skip
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
