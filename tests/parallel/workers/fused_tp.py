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
            "bf16")  # fmt: skip


def main() -> None:
    dist.init_process_group("gloo")
    out_path, kernels = sys.argv[1], sys.argv[2]
    rank, size = dist.get_rank(), dist.get_world_size()
    group = dist.new_group(list(range(size)))
    results = {}
    for case in (c for c in CASES if c.name in TP_CASES):
        # An even vocabulary that is not a multiple of 128 (1006 = 2 x 503).
        case = type(case)(**{**case.__dict__, "vocab": 1006})
        data = build(case)
        kwargs = dict(case.kwargs)
        if kwargs.get("kl_coef"):
            kwargs["ref_logprobs"] = data["ref_logprobs"]
        args = (data["labels"], data["loss_type"], data["token_weight"], data["advantages"],
                data["old_logprobs"])  # fmt: skip
        full_w = data["weight"].clone().requires_grad_(True)
        hidden = data["hidden_seed"].clone().requires_grad_(True)
        ref = reference_combined_loss(hidden, full_w, *args, **kwargs)
        ref_dh, ref_dw = torch.autograd.grad(ref[0], (hidden, full_w))
        shard = full_w.detach().chunk(size)[rank].clone().requires_grad_(True)
        hidden2 = data["hidden_seed"].clone().requires_grad_(True)
        out = fused_combined_loss(hidden2, shard, *args, **kwargs, tp_group=group,
                                  kernels=kernels, chunk_bytes=4 * 503 * 7)  # fmt: skip
        dh, dw = torch.autograd.grad(out[0], (hidden2, shard))
        errors = {
            "loss": rel_err(out[0], ref[0]),
            "logprobs": rel_err(out[1], ref[1]),
            "entropy": rel_err(out.entropy, ref[2]),
            "d_hidden": rel_err(dh, ref_dh),
            "d_weight": rel_err(dw, ref_dw.chunk(size)[rank]),
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
