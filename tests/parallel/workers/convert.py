"""Conversion round trips on 4 gloo ranks, for each model given.

argv: OUT_DIR MODELS_JSON ({"name": hf_dir}). For each model, rank 0 ends up with:
  OUT_DIR/<name>/roundtrip_hf   HF -> Megatron (TP2, PP2) -> dist-ckpt -> load at (TP1, PP2) -> HF
  OUT_DIR/<name>/logits.pt      {"tp2pp1": ..., "tp1pp2": ...}: logits of a checkpoint saved at
                                TP2*PP1, then loaded at TP1*PP2 (batch [b, s, V])
"""

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    from megatron_mel import platform
    from megatron_mel.config import ModelConfig, ParallelConfig
    from megatron_mel.convert import checkpoint
    from megatron_mel.convert.verify import reference_inputs
    from megatron_mel.models.arch import load_arch, read_hf_config
    from megatron_mel.models.forward import (
        batched_micro_batch,
        forward_logits,
        share_from_last_stage,
    )
    from megatron_mel.models.gpt import build_model_chunks

    out_root, models = Path(sys.argv[1]), json.loads(sys.argv[2])

    def layout(tp: int, pp: int):
        parallel = ParallelConfig(tp=tp, pp=pp)
        ctx = platform.init_distributed(parallel)
        return parallel, ctx

    def logits_of(chunks, arch):
        batch, _ = reference_inputs(arch.vocab_size)
        out = forward_logits(chunks, [batched_micro_batch(batch)], arch.vocab_size)
        return share_from_last_stage(out)[0]

    for name, hf_dir in models.items():
        out = out_root / name
        arch = load_arch(hf_dir)
        model_cfg = ModelConfig(hf_dir=hf_dir, dtype="float32", max_seq_len=512)
        padded = arch.padded_vocab_size(model_cfg.vocab_padding_multiple)
        save_kwargs = dict(
            hf_config=read_hf_config(hf_dir),
            dtype=torch.float32,
            padded_vocab=padded,
            hf_metadata_from=hf_dir,
        )

        parallel, ctx = layout(2, 2)
        chunks = build_model_chunks(arch, model_cfg, parallel)
        checkpoint.load_hf_weights(chunks, hf_dir, arch, padded)
        checkpoint.save_mcore(chunks, out / "mcore_tp2pp2", **save_kwargs)

        parallel, ctx = layout(1, 2)
        chunks = build_model_chunks(arch, model_cfg, parallel)
        checkpoint.load_mcore(chunks, out / "mcore_tp2pp2", padded)
        checkpoint.save_hf(chunks, arch, out / "roundtrip_hf", metadata_from=hf_dir)

        parallel, ctx = layout(2, 1)
        chunks = build_model_chunks(arch, model_cfg, parallel)
        checkpoint.load_hf_weights(chunks, hf_dir, arch, padded)
        checkpoint.save_mcore(chunks, out / "mcore_tp2pp1", **save_kwargs)
        saved_logits = logits_of(chunks, arch)

        parallel, ctx = layout(1, 2)
        chunks = build_model_chunks(arch, model_cfg, parallel)
        checkpoint.load_mcore(chunks, out / "mcore_tp2pp1", padded)
        loaded_logits = logits_of(chunks, arch)
        if ctx.rank == 0:
            torch.save({"tp2pp1": saved_logits, "tp1pp2": loaded_logits}, out / "logits.pt")
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
