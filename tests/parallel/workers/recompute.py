"""Gradients of one global batch with and without full activation recomputation.

argv: OUT_DIR HF_DIR TP
Builds the policy twice from the same HF weights, once with ``model.recompute_activations`` on,
runs ``forward_backward`` on the same batch with both, then one ``train_step`` with recompute on.
Rank 0 writes OUT_DIR/recompute-tp<TP>.json: the loss of both runs, the largest relative
gradient difference over every rank's parameters, whether every gradient was non-zero, and the
step's metrics, and whether the gradient buffers are freed after the step and back (finite,
non-zero) after the next forward-backward.
"""

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    from megatron_mel import platform
    from megatron_mel.config import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_mel.convert.checkpoint import load_hf_weights, unwrap
    from megatron_mel.models.arch import load_arch
    from megatron_mel.models.gpt import build_model_chunks
    from megatron_mel.trainer.actor import ActorSettings, build_actor
    from tests.parallel.workers.actor_invariance import global_batch

    out, hf_dir, tp = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    parallel = ParallelConfig(tp=tp, use_distributed_optimizer=False)
    ctx = platform.init_distributed(parallel)
    arch = load_arch(hf_dir)
    settings = ActorSettings(parallel=parallel, optim=OptimConfig(lr=1e-3), num_steps=2,
                             dtype=torch.float32, vocab_size=arch.vocab_size,
                             max_seq_len=4096)  # fmt: skip
    samples = global_batch(arch.vocab_size)
    runs = {}
    for recompute in (False, True):
        model_cfg = ModelConfig(hf_dir=hf_dir, dtype="float32", max_seq_len=256,
                                recompute_activations=recompute)  # fmt: skip
        chunks = build_model_chunks(arch, model_cfg, parallel)
        load_hf_weights(chunks, hf_dir, arch, arch.padded_vocab_size(1024))
        actor = build_actor(chunks, settings, AlgorithmConfig(), response_budget=16)
        metrics = actor.forward_backward(samples, step=1, num_prompts=2)
        grads = {n: p.main_grad.detach().clone()
                 for n, p in unwrap(actor.chunks[0]).named_parameters()}  # fmt: skip
        runs[recompute] = (actor, metrics, grads)
    (_, plain, ref), (actor, recomputed, got) = runs[False], runs[True]
    worst = max(
        float((got[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in ref.items()
    )
    nonzero = all(bool(g.abs().max() > 0) for g in ref.values())
    stats = torch.tensor([worst, 0.0 if nonzero else 1.0], dtype=torch.float64)
    torch.distributed.all_reduce(stats, op=torch.distributed.ReduceOp.MAX)
    step = actor.train_step(samples, step=1, num_prompts=2)
    # Between steps the gradient buffers are freed; the next step brings them back zeroed.
    params = list(unwrap(actor.chunks[0]).parameters())
    released = all(p.main_grad.untyped_storage().nbytes() == 0 for p in params)
    again = actor.forward_backward(samples, step=2, num_prompts=2)
    restored = all(bool(torch.isfinite(p.main_grad).all()) for p in params)
    restored = restored and any(bool(p.main_grad.abs().max() > 0) for p in params)
    if ctx.rank == 0:
        (out / f"recompute-tp{tp}.json").write_text(json.dumps({
            "loss": [plain["loss"], recomputed["loss"]],
            "max_rel_grad_diff": float(stats[0]),
            "all_grads_nonzero": not bool(stats[1]),
            "step": step,
            "grads_released_between_steps": released,
            "grads_restored": restored,
            "second_loss": again["loss"],
        }))  # fmt: skip
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
