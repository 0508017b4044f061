"""Weight sync throughput (trainer -> embedded engine) next to a same-size memcpy.

    python benchmarks/bench_weight_sync.py [--hf-dir H] [--bucket-mb 512] [--repeats 3]

Builds the Megatron model (SmolLM2-135M-Instruct by default, fp32, one process), an embedded
engine, and runs full syncs: TP gather (trivial here), HF mapping, bucket fill, load into the
engine. The baseline copies the same number of bytes with one ``Tensor.copy_`` in the same
process. Last line: ``ratio sync/memcpy=<x>`` (sync GB/s over memcpy GB/s, best of --repeats).
"""

from __future__ import annotations

import argparse
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hf-dir", default=None)
    parser.add_argument("--bucket-mb", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch

    from megatron_mel import platform
    from megatron_mel.config import ModelConfig, ParallelConfig
    from megatron_mel.console import setup_console
    from megatron_mel.convert.checkpoint import load_hf_weights
    from megatron_mel.models.arch import load_arch
    from megatron_mel.models.gpt import build_model_chunks
    from megatron_mel.rollout.embedded import EmbeddedEngine
    from megatron_mel.rollout.weight_sync import RootTransport, WeightSynchronizer

    setup_console()
    hf_dir = args.hf_dir
    if hf_dir is None:
        from megatron_mel.assets import prepare_assets

        hf_dir = str(prepare_assets().model_dir)
    parallel = ParallelConfig()
    platform.init_distributed(parallel)
    arch = load_arch(hf_dir)
    model_cfg = ModelConfig(hf_dir=hf_dir, dtype="float32")
    chunks = build_model_chunks(arch, model_cfg, parallel)
    load_hf_weights(chunks, hf_dir, arch, arch.padded_vocab_size(model_cfg.vocab_padding_multiple))
    engine = EmbeddedEngine(arch, dtype=torch.float32, hf_dir=hf_dir)
    sync = WeightSynchronizer(chunks, arch, RootTransport(engine), engine,
                              bucket_bytes=args.bucket_mb * 2**20)  # fmt: skip
    best_sync = min(sync.sync(version=v + 1).seconds for v in range(args.repeats))
    nbytes = sync.plan.nbytes
    src = torch.randn(nbytes // 4)
    dst = torch.empty_like(src)
    copies = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        dst.copy_(src)
        copies.append(time.perf_counter() - start)
    best_copy = min(copies)
    sync_gbs, copy_gbs = nbytes / best_sync / 1e9, nbytes / best_copy / 1e9
    print(f"model {arch.family} {arch.num_layers} layers, {nbytes / 2**20:.0f} MiB in "
          f"{sum(len(s) for s in sync.plan.stages)} buckets of <= {args.bucket_mb} MiB")  # fmt: skip
    print(f"sync   {best_sync:.3f} s  {sync_gbs:.2f} GB/s")
    print(f"memcpy {best_copy:.3f} s  {copy_gbs:.2f} GB/s")
    print(f"ratio sync/memcpy={sync_gbs / copy_gbs:.2f}")
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
