"""Record every tensor collective of a TP2 x PP2 x DP2 step (train step, log-prob recompute, weight
sync into the embedded engine) with the devices of its tensors and who chose them.

argv: OUT_DIR HF_DIR
Every rank writes OUT_DIR/rank_<r>.json: one record per collective call with the call site (the
first frame outside torch.distributed), the op, the group's backend, the rule's device for that
group, the devices of the tensors, and whether each tensor was made or checked by
megatron_mel.platform's rule. A last record comes from a probe that breaks the rule on purpose
(a plain torch.tensor from a megatron_mel module), so the test can see the audit catch it.
"""

import functools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

OPS = ("all_reduce", "broadcast", "all_gather", "all_gather_into_tensor", "reduce_scatter",
       "reduce_scatter_tensor", "reduce", "send", "recv", "gather", "scatter",
       "all_to_all", "all_to_all_single")  # fmt: skip


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dist.P2POp):
        yield value.tensor


def _site() -> tuple[str, str]:
    frame = sys._getframe(2)
    while frame is not None and frame.f_globals.get("__name__", "").startswith("torch"):
        frame = frame.f_back
    if frame is None:
        return "?", "?"
    return frame.f_globals.get("__name__", "?"), f"{frame.f_code.co_filename}:{frame.f_lineno}"


def install(records: list) -> None:
    """Wrap the collectives (isend/irecv stay as they are: P2POp checks them by identity; the
    pipeline's P2P goes through batch_isend_irecv, which is recorded)."""
    from megatron_mel import platform

    def wrap(name, original):
        @functools.wraps(original)
        def recorded(*args, **kwargs):
            group = kwargs.get("group")
            if name == "batch_isend_irecv":
                group = args[0][0].group if args and args[0] else None
            tensors = list(_tensors(args)) + list(_tensors(list(kwargs.values())))
            module, where = _site()
            records.append({
                "op": name, "module": module, "site": where,
                "backend": str(dist.get_backend(group)),
                "rule_device": str(platform.collective_device(group)),
                "devices": [str(t.device) for t in tensors],
                "rule_tensors": [platform.is_rule_tensor(t) for t in tensors],
            })  # fmt: skip
            return original(*args, **kwargs)

        return recorded

    for name in (*OPS, "batch_isend_irecv"):
        if hasattr(dist, name):
            setattr(dist, name, wrap(name, getattr(dist, name)))


def main() -> None:
    from megatron_mel import platform
    from megatron_mel.config import AlgorithmConfig, ModelConfig, OptimConfig, ParallelConfig
    from megatron_mel.convert.checkpoint import load_hf_weights
    from megatron_mel.models.arch import load_arch
    from megatron_mel.models.gpt import build_model_chunks
    from megatron_mel.rollout.embedded import EmbeddedEngine
    from megatron_mel.rollout.sglang_sync import agree_on_failure
    from megatron_mel.rollout.weight_sync import RootTransport, WeightSynchronizer
    from megatron_mel.trainer.actor import ActorSettings, build_actor
    from tests.parallel.workers.actor_invariance import global_batch

    out, hf_dir = Path(sys.argv[1]), sys.argv[2]
    parallel = ParallelConfig(tp=2, pp=2)
    ctx = platform.init_distributed(parallel)
    assert ctx.dp_size == 2
    arch = load_arch(hf_dir)
    model_cfg = ModelConfig(hf_dir=hf_dir, dtype="float32", max_seq_len=256)
    padded = arch.padded_vocab_size(model_cfg.vocab_padding_multiple)
    chunks = build_model_chunks(arch, model_cfg, parallel)
    load_hf_weights(chunks, hf_dir, arch, padded)
    settings = ActorSettings(parallel=parallel, optim=OptimConfig(lr=1e-3), num_steps=2,
                             dtype=torch.float32)  # fmt: skip
    actor = build_actor(chunks, settings, AlgorithmConfig(), response_budget=16)
    engine = EmbeddedEngine(arch, dtype=torch.float32, hf_dir=hf_dir) if ctx.rank == 0 else None
    sync = WeightSynchronizer(actor.chunks, arch, RootTransport(engine), engine,
                              bucket_bytes=64 * 1024, verify=True)  # fmt: skip

    records: list = []
    install(records)
    batch = global_batch(arch.vocab_size)
    actor.compute_logprobs([s for s in batch if s.term == "pg"])
    actor.train_step(batch, step=1, num_prompts=2)
    sync.sync(version=1)
    agree_on_failure(None, "audit")

    count = len(records)
    code = compile("dist.all_reduce(torch.tensor([1.0]))", "megatron_mel/probe.py", "exec")
    exec(code, {"__name__": "megatron_mel.probe", "dist": dist, "torch": torch})
    report = {"records": records[:count], "probe": records[count:]}
    (out / f"rank_{ctx.rank}.json").write_text(json.dumps(report))
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
