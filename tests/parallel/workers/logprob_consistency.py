"""Engine log-probs vs the trainer's on the same weights and tokens: from a no-grad forward
(compute_logprobs) and from the training forward (forward_backward, on-policy samples).

argv: OUT_JSON HF_DIR. Rank 0 writes the rollout/train mismatch metrics of both, and the largest
difference between the two trainer paths.
"""

import json
import sys

import torch


def main() -> None:
    from megatron_mel import platform
    from megatron_mel.config import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_mel.convert.checkpoint import load_hf_weights
    from megatron_mel.data.datasets import Problem
    from megatron_mel.data.prompts import PromptFormatter
    from megatron_mel.models.arch import load_arch
    from megatron_mel.models.gpt import build_model_chunks
    from megatron_mel.platform import from_driver
    from megatron_mel.rollout.embedded import EmbeddedEngine
    from megatron_mel.rollout.engine import SamplingParams
    from megatron_mel.rollout.groups import generate_groups
    from megatron_mel.trainer.actor import ActorSettings, build_actor
    from megatron_mel.trainer.phases import logprob_mismatch

    out, hf_dir = sys.argv[1], sys.argv[2]
    parallel = ParallelConfig()
    ctx = platform.init_distributed(parallel)
    arch = load_arch(hf_dir)
    model_cfg = ModelConfig(hf_dir=hf_dir, dtype="float32")
    chunks = build_model_chunks(arch, model_cfg, parallel)
    load_hf_weights(chunks, hf_dir, arch, arch.padded_vocab_size(model_cfg.vocab_padding_multiple))
    settings = ActorSettings(
        parallel=parallel,
        optim=OptimConfig(),
        num_steps=1,
        dtype=torch.float32,
        vocab_size=arch.vocab_size,
        max_seq_len=4096,
    )
    actor = build_actor(chunks, settings, AlgorithmConfig(), response_budget=48)

    def rollouts():
        engine = EmbeddedEngine(arch, hf_dir=hf_dir, seed=0)
        formatter = PromptFormatter.from_dir(hf_dir)
        problems = [Problem(f"p{i}", q, "0", "test") for i, q in enumerate(
            ["What is 2 + 3?", "Name a prime number.", "Tom has 4 apples and eats one. How many are left?"]
        )]  # fmt: skip
        params = SamplingParams(n=2, temperature=1.0, max_new_tokens=48, seed=7)
        groups = generate_groups(engine, formatter, problems, params, request_prefix="t")
        return [(g.prompt_ids, c.token_ids, c.logprobs) for g in groups for c in g.completions]

    from megatron_mel.data.packing import TrainSample

    samples = [
        TrainSample(tokens=p + t, num_context=len(p), term="pg", old_logprobs=lp)
        for p, t, lp in from_driver(rollouts)
    ]
    engine = [s.old_logprobs for s in samples]
    recomputed = actor.compute_logprobs(samples)
    metrics = logprob_mismatch(engine, recomputed)
    # The training forward (on-policy samples, as the loop trains them) yields the same values.
    for sample in samples:
        sample.old_logprobs = None
    actor.forward_backward(samples, step=1, num_prompts=3)
    trained = [s.train_logprobs for s in samples]
    metrics.update({f"train_forward/{k}": v for k, v in logprob_mismatch(engine, trained).items()})
    no_grad_vs_train = logprob_mismatch(recomputed, trained)
    metrics["train_vs_no_grad_max_diff"] = no_grad_vs_train["rollout/train_logprob_max_diff"]
    metrics["tokens"] = sum(s.num_targets for s in samples)
    if ctx.rank == 0:
        with open(out, "w") as f:
            json.dump(metrics, f)
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
