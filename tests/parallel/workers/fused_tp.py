"""The fused loss with a vocabulary sharded over TP=2 ranks equals the unsharded reference.

argv: OUT_JSON KERNELS. Rank 0 writes {case: {quantity: relative error}} for loss, logprobs,
entropy, d_hidden (full on every rank) and d_weight (this rank's shard vs the reference slice).
"""

import json
import sys

import torch
import torch.distributed as dist

from megatron_mel.ops import fused_combined_loss
from megatron_mel.ops.reference import reference_combined_loss
from tests.unit.loss_cases import CASES, build, rel_err

TP_CASES = ("mixed", "only-pg", "only-nll", "empty", "clip-both-sides", "dual-clip-kl-entropy",
            "bf16", "padded-vocab", "padded-all-of-shard-1")  # fmt: skip
# Padded cases: (true vocabulary, padded rows). 1006 + 18 = 1024 leaves shard 1 (rows 512..1023)
# partly padding; 400 + 624 makes shard 1 padding only (vocab 400 padded to 1024 at TP=2).
PADDED = {"padded-vocab": (1006, 18), "padded-all-of-shard-1": (400, 624)}


def main() -> None:
    dist.init_process_group("gloo")
    out_path, kernels = sys.argv[1], sys.argv[2]
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(size)))
    results = {}
    for name in TP_CASES:
        base = next(c for c in CASES if c.name == ("padded-vocab" if name in PADDED else name))
        # An even vocabulary that is not a multiple of 128 (1006 = 2 x 503).
        vocab, padding = PADDED.get(name, (1006, 0))
        case = type(base)(**{**base.__dict__, "name": name, "vocab": vocab, "padding": padding})
        data = build(case)
        params = case.params()
        kwargs = {"ref_logprobs": data["ref_logprobs"] if params.kl_coef else None}
        args = (data["labels"], data["loss_type"], data["token_weight"], data["advantages"],
                data["old_logprobs"])  # fmt: skip
        # The reference sees the real rows only; the shards hold real and padded rows.
        full_w = data["weight"][:vocab].clone().requires_grad_(True)
        hidden = data["hidden_seed"].clone().requires_grad_(True)
        ref = reference_combined_loss(hidden, full_w, *args, params, **kwargs)
        ref_dh, ref_dw = torch.autograd.grad(ref[0], (hidden, full_w))
        shard = data["weight"].chunk(size)[rank].clone().requires_grad_(True)
        start = rank * shard.shape[0]
        hidden2 = data["hidden_seed"].clone().requires_grad_(True)
        out = fused_combined_loss(hidden2, shard, *args, params, **kwargs, tp_group=group,
                                  kernels=kernels, chunk_bytes=4 * 503 * 7,
                                  vocab_size=vocab if padding else None)  # fmt: skip
        dh, dw = torch.autograd.grad(out[0], (hidden2, shard))
        real = max(0, min(shard.shape[0], vocab - start))
        errors = {
            "loss": rel_err(out[0], ref[0]),
            "logprobs": rel_err(out[1], ref[1]),
            "entropy": rel_err(out.entropy, ref[2]),
            "d_hidden": rel_err(dh, ref_dh),
            "d_weight": rel_err(dw[:real], ref_dw[start : start + real]) if real else 0.0,
            "padding_grad": float(dw[real:].abs().max()) if real < shard.shape[0] else 0.0,
        }
        gathered = [None] * size
        dist.all_gather_object(gathered, errors)
        results[case.name] = {k: max(e[k] for e in gathered) for k in errors}
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(results, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
