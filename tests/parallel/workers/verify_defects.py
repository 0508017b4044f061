"""The --verify judgement on a correct conversion and on deliberately broken ones.

argv: OUT_JSON HF_DIR TP PP DEFECTS (comma separated). For each defect the model is loaded from
the HF directory at (TP, PP), the defect is applied to the Megatron side only, and the check that
``convert_checkpoint --verify`` runs (convert.verify.check_parity) judges it. Rank 0 writes
{defect: {"ok": bool, "batch": megatron distance, "noise": transformers distance}}.

Defects (each one tensor or one constant, the kind of bug a converter has):
  none              the correct conversion
  dropped_bias      layer 0's QKV bias zeroed (a loader that skips biases)
  rope_base         rotary frequencies from a wrong base (rope_theta / 100)
  swapped_qkv       the K and V rows of query group 0 of layer 0 exchanged (a wrong interleave)
  corrupted_tensor  the rows of one MLP down-projection rolled by one (an off-by-one slice)
"""

import json
import sys

import torch


def _layers(chunks):
    return [layer for chunk in chunks for layer in chunk.decoder.layers]


def apply_defect(name, chunks, arch) -> None:
    from megatron.core import parallel_state as ps

    layers = _layers(chunks)
    first = [layer for layer in layers if layer.layer_number == 1]
    with torch.no_grad():
        if name == "dropped_bias":
            for layer in first:
                layer.self_attention.linear_qkv.bias.zero_()
        elif name == "rope_base":
            for chunk in chunks:
                rope = chunk.rotary_pos_emb
                dim = arch.head_dim
                base = arch.rope_theta / 100
                rope.inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2).float() / dim))
        elif name == "swapped_qkv":
            if ps.get_tensor_model_parallel_rank() == 0:
                for layer in first:
                    w = layer.self_attention.linear_qkv.weight
                    q_rows = arch.num_heads // arch.num_kv_heads * arch.head_dim
                    k = w[q_rows : q_rows + arch.head_dim].clone()
                    w[q_rows : q_rows + arch.head_dim] = w[
                        q_rows + arch.head_dim : q_rows + 2 * arch.head_dim
                    ]
                    w[q_rows + arch.head_dim : q_rows + 2 * arch.head_dim] = k
        elif name == "corrupted_tensor":
            middle = arch.num_layers // 2 + 1
            for layer in layers:
                if layer.layer_number == middle:
                    w = layer.mlp.linear_fc2.weight
                    w.copy_(torch.roll(w, 1, dims=0))
        elif name != "none":
            raise ValueError(name)


def main() -> None:
    from megatron_mel import platform
    from megatron_mel.config import ModelConfig, ParallelConfig
    from megatron_mel.convert.checkpoint import load_hf_weights
    from megatron_mel.convert.verify import ABS_FLOOR, NOISE_FACTOR, check_parity
    from megatron_mel.models.arch import load_arch
    from megatron_mel.models.gpt import build_model_chunks

    out, hf_dir, tp, pp, defects = (
        sys.argv[1],
        sys.argv[2],
        int(sys.argv[3]),
        int(sys.argv[4]),
        sys.argv[5],
    )
    parallel = ParallelConfig(tp=tp, pp=pp)
    ctx = platform.init_distributed(parallel)
    arch = load_arch(hf_dir)
    model_cfg = ModelConfig(hf_dir=hf_dir, dtype="float32")
    results = {}
    for defect in defects.split(","):
        chunks = build_model_chunks(arch, model_cfg, parallel)
        load_hf_weights(
            chunks, hf_dir, arch, arch.padded_vocab_size(model_cfg.vocab_padding_multiple)
        )
        apply_defect(defect, chunks, arch)
        report = check_parity(chunks, arch, hf_dir, torch.float32)
        if ctx.rank == 0:
            results[defect] = {
                "ok": report.ok(NOISE_FACTOR, ABS_FLOOR["float32"]),
                "batch": report.batch.megatron,
                "packed": report.packed.megatron,
                "noise": report.batch.noise,
                "packed_noise": report.packed.noise,
            }
            print(defect, results[defect], flush=True)
        del chunks
    if ctx.rank == 0:
        with open(out, "w") as handle:
            json.dump(results, handle, indent=1)
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
