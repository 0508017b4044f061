"""Weight sync on gloo after an optimizer step: trainer (TP/PP) -> buckets -> embedded engine.

argv: OUT_DIR HF_DIR TP PP
Rank 0 writes OUT_DIR/engine.pt (every engine tensor by HF name after the sync),
OUT_DIR/metrics.json (sync metrics and the verification outcomes), and the trainer's
dist-checkpoint goes to OUT_DIR/mcore for the converter to export.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main() -> None:
    from megatron_mel import platform
    from megatron_mel.config import (
        AlgorithmConfig,
        ModelConfig,
        OptimConfig,
        ParallelConfig,
    )
    from megatron_mel.convert.checkpoint import load_hf_weights, save_mcore
    from megatron_mel.convert.mapping import expected_hf_names
    from megatron_mel.models.arch import load_arch, read_hf_config
    from megatron_mel.models.gpt import build_model_chunks
    from megatron_mel.rollout.embedded import EmbeddedEngine
    from megatron_mel.rollout.engine import WeightBucket
    from megatron_mel.rollout.weight_sync import (
        RootTransport,
        WeightSyncError,
        WeightSynchronizer,
    )
    from megatron_mel.trainer.actor import ActorSettings, build_actor
    from tests.parallel.workers.actor_invariance import global_batch

    out, hf_dir = Path(sys.argv[1]), sys.argv[2]
    tp, pp = int(sys.argv[3]), int(sys.argv[4])
    parallel = ParallelConfig(tp=tp, pp=pp)
    ctx = platform.init_distributed(parallel)
    arch = load_arch(hf_dir)
    model_cfg = ModelConfig(hf_dir=hf_dir, dtype="float32", max_seq_len=256)
    padded = arch.padded_vocab_size(model_cfg.vocab_padding_multiple)
    chunks = build_model_chunks(arch, model_cfg, parallel)
    load_hf_weights(chunks, hf_dir, arch, padded)
    settings = ActorSettings(parallel=parallel, optim=OptimConfig(lr=1e-2), num_steps=2,
                             dtype=torch.float32, vocab_size=arch.vocab_size, max_seq_len=4096)  # fmt: skip
    actor = build_actor(chunks, settings, AlgorithmConfig(), response_budget=16)
    actor.train_step(global_batch(arch.vocab_size), step=0, num_prompts=2)

    engine = EmbeddedEngine(arch, dtype=torch.float32, hf_dir=hf_dir) if ctx.rank == 0 else None
    sync = WeightSynchronizer(actor.chunks, arch, RootTransport(engine), engine,
                              bucket_bytes=64 * 1024, verify=True)  # fmt: skip
    metrics = sync.sync(version=1)
    save_mcore(actor.chunks, out / "mcore", hf_config=read_hf_config(hf_dir),
               dtype=torch.float32, padded_vocab=padded, hf_metadata_from=hf_dir)  # fmt: skip
    if ctx.rank == 0:
        print("sync metrics:", json.dumps(metrics.as_dict()), flush=True)
        torch.save(engine.get_weights(expected_hf_names(arch)), out / "engine.pt")

    # A transport that corrupts one tensor must stop training: every rank raises.
    if ctx.rank == 0:
        original = engine._load_weights

        def corrupting(buckets):
            original(buckets)
            names = expected_hf_names(arch)
            current = engine.get_weights(names)
            current[names[-1]] = current[names[-1]] + 1e-3
            original([WeightBucket.from_tensors([(n, current[n]) for n in names])])

        engine._load_weights = corrupting
    try:
        sync.sync(version=2)
        outcome = "no error"
    except WeightSyncError as exc:
        outcome = str(exc)
    outcomes = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, outcome)
    if ctx.rank == 0:
        (out / "metrics.json").write_text(
            json.dumps({"sync": metrics.as_dict(), "corrupted": outcomes}, indent=1)
        )
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
