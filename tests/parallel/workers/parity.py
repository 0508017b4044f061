"""Megatron logits for the reference inputs, for several models and layouts in one gloo session.

argv: OUT_DIR CASES_JSON, where CASES_JSON is a list of {"name", "hf_dir", "tp", "pp"}.
Rank 0 writes OUT_DIR/<name>.pt with fp32 logits: "batch" [b, s, V] for the reference batch,
"packed" [t, V] for the THD pack of the reference sequences, and "separate" [t, V] for the same
sequences run as separate micro-batches.
"""

import json
import sys
from pathlib import Path

import torch


def main() -> None:
    from megatron_mel import platform
    from megatron_mel.config import ModelConfig, ParallelConfig
    from megatron_mel.convert.checkpoint import load_hf_weights
    from megatron_mel.convert.verify import reference_inputs
    from megatron_mel.models.arch import load_arch
    from megatron_mel.models.forward import (
        batched_micro_batch,
        forward_logits,
        packed_micro_batch,
        share_from_last_stage,
    )
    from megatron_mel.models.gpt import build_model_chunks

    out_dir, cases = Path(sys.argv[1]), json.loads(sys.argv[2])
    for case in cases:
        parallel = ParallelConfig(tp=case["tp"], pp=case["pp"])
        ctx = platform.init_distributed(parallel)
        arch = load_arch(case["hf_dir"])
        model_cfg = ModelConfig(hf_dir=case["hf_dir"], dtype="float32", max_seq_len=512)
        chunks = build_model_chunks(arch, model_cfg, parallel)
        load_hf_weights(
            chunks, case["hf_dir"], arch, arch.padded_vocab_size(model_cfg.vocab_padding_multiple)
        )
        batch, packed = reference_inputs(arch.vocab_size)
        separate = [batched_micro_batch(torch.tensor([seq])) for seq in packed]
        logits = forward_logits(
            chunks,
            [batched_micro_batch(batch), packed_micro_batch(packed), *separate],
            arch.vocab_size,
        )
        logits = share_from_last_stage(logits)
        if ctx.rank == 0:
            result = {
                "batch": logits[0],
                "packed": logits[1][0],
                "separate": torch.cat([x[0] for x in logits[2:]]),
                "dp": ctx.dp_size,
            }
            torch.save(result, out_dir / f"{case['name']}.pt")
        del chunks
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
