"""One global batch through the Megatron actor under several splits; gradients and metrics saved.

argv: OUT_DIR HF_DIR TP PP BUDGETS_JSON
For each micro-batch token budget in BUDGETS_JSON, rank 0 writes OUT_DIR/<label>-<budget>.pt
with the step metrics, the number of micro-batches on each data-parallel rank, and every
parameter's reduced gradient (TP=1 and PP=1 only: then main_grad holds the full gradient).
Finally one optimizer step is taken (at the last budget): <label>-step.pt holds its metrics
(grad_norm included) and, at TP=1 and PP=1, the updated parameters.
"""

import json
import sys
from pathlib import Path

import torch


def global_batch(vocab: int) -> list:
    """8 rollout responses (2 prompts x 4 samples, mixed rewards) + 3 meta-experiences."""
    from megatron_mel.data.packing import TrainSample

    gen = torch.Generator().manual_seed(1234)
    samples = []
    for prompt in range(2):
        context = torch.randint(0, vocab, (5 + 3 * prompt,), generator=gen).tolist()
        for i in range(4):
            response = torch.randint(0, vocab, (3 + 2 * i + prompt,), generator=gen).tolist()
            old = (torch.randn(len(response), generator=gen) * 0.1 - 6.0).tolist()
            samples.append(
                TrainSample(
                    tokens=context + response,
                    num_context=len(context),
                    term="pg",
                    advantage=float(torch.randn((), generator=gen)),
                    old_logprobs=old,
                    prompt_id=f"p{prompt}",
                )
            )
    for k, group in enumerate((2, 2, 1)):
        context = torch.randint(0, vocab, (9 + k,), generator=gen).tolist()
        me = torch.randint(0, vocab, (4 + 3 * k,), generator=gen).tolist()
        samples.append(
            TrainSample(tokens=context + me, num_context=len(context), term="me",
                        group_size=group, prompt_id=f"p{min(k, 1)}")
        )  # fmt: skip
    return samples


def main() -> None:
    from megatron.core import parallel_state as ps

    from megatron_mel import platform
    from megatron_mel.config import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_mel.convert.checkpoint import load_hf_weights, unwrap
    from megatron_mel.models.arch import load_arch
    from megatron_mel.models.gpt import build_model_chunks
    from megatron_mel.trainer.actor import ActorSettings, build_actor

    out, hf_dir = Path(sys.argv[1]), sys.argv[2]
    tp, pp, budgets = int(sys.argv[3]), int(sys.argv[4]), json.loads(sys.argv[5])
    parallel = ParallelConfig(tp=tp, pp=pp, use_distributed_optimizer=False)
    ctx = platform.init_distributed(parallel)
    arch = load_arch(hf_dir)
    model_cfg = ModelConfig(hf_dir=hf_dir, dtype="float32", max_seq_len=256)
    chunks = build_model_chunks(arch, model_cfg, parallel)
    load_hf_weights(chunks, hf_dir, arch, arch.padded_vocab_size(model_cfg.vocab_padding_multiple))
    settings = ActorSettings(
        # clip_grad far above the norm: the optimizer reports the global norm without clipping.
        parallel=parallel, optim=OptimConfig(lr=1e-3, clip_grad=1e9), num_steps=4,
        dtype=torch.float32, vocab_size=arch.vocab_size, max_seq_len=4096,
    )  # fmt: skip
    algorithm = AlgorithmConfig(clip_low=0.1, clip_high=0.3, nll_coef=0.5)
    actor = build_actor(chunks, settings, algorithm, response_budget=16)
    samples = global_batch(arch.vocab_size)
    label = f"tp{tp}-pp{pp}-dp{ctx.dp_size}"
    for budget in budgets:
        metrics = actor.forward_backward(samples, step=0, num_prompts=2, micro_batch_tokens=budget)
        from megatron_mel.data.packing import plan_micro_batches, shard_for_data_parallel

        local = [samples[i] for i in shard_for_data_parallel(samples, ctx.dp_rank, ctx.dp_size)]
        num_mb = len(plan_micro_batches([len(s.tokens) for s in local], budget))
        counts = [None] * ctx.world_size
        torch.distributed.all_gather_object(counts, num_mb)
        grads = {}
        if tp == 1 and pp == 1:
            for name, param in unwrap(actor.chunks[0]).named_parameters():
                grads[name] = param.main_grad.detach().clone()
        if ctx.rank == 0:
            torch.save({"metrics": metrics, "micro_batches": counts, "grads": grads},
                       out / f"{label}-{budget}.pt")  # fmt: skip
    step = actor.train_step(samples, step=0, num_prompts=2, micro_batch_tokens=budgets[-1])
    params = {}
    if tp == 1 and pp == 1:
        params = {n: p.detach().clone() for n, p in unwrap(actor.chunks[0]).named_parameters()}
    if ctx.rank == 0:
        torch.save({"metrics": step, "params": params}, out / f"{label}-step.pt")

    # A NaN weight on global rank 0 only: every rank must stop with the step and micro-batch.
    from megatron_mel.trainer.actor import NonFiniteLossError

    if ctx.rank == 0:
        with torch.no_grad():
            params = unwrap(actor.chunks[0]).named_parameters()
            next(p for n, p in params if ".mlp." in n).fill_(float("nan"))
    try:
        actor.forward_backward(samples, step=7, num_prompts=2, micro_batch_tokens=budgets[-1])
        message = "no error"
    except NonFiniteLossError as exc:
        message = str(exc)
    messages = [None] * ctx.world_size
    torch.distributed.all_gather_object(messages, message)
    if ctx.rank == 0:
        (out / f"{label}-nonfinite.json").write_text(json.dumps(messages))
    ps.destroy_model_parallel()
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
