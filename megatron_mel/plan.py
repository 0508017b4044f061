"""`megatron-mel plan`: will this recipe fit this allocation? Layout and per-GPU memory, or a refusal.

    megatron-mel plan RECIPE [--set k=v ...] [--nodes N] [--gpus-per-node G]
                             [--ranks-per-node R] [--gpu-mem-gib M] [--json]

``--nodes`` is the whole allocation (what ``sbatch --nodes`` asks for): the training nodes plus
``launch.rollout_nodes``. The layout is the one the run will use (rollout/placement.py, the
same function the trainer calls); the memory estimate is memory.py. A refusal (a layout the
model cannot be split into, engines that cannot be placed, a GPU that overflows) names its
reason and exits 2, so a job script can stop before it starts the trainer (slurm/launch.sh).

The model's shape comes from ``model.hf_dir/config.json``; on a login node where the weights
are not there yet, a shipped copy of the architecture of a known model is used instead
(megatron_mel/models/shapes/<hf_dir basename>.json), and the plan says so.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from megatron_mel.config import ConfigError, RunConfig
from megatron_mel.memory import GIB, MemoryEstimate, estimate, format_table, total_params
from megatron_mel.models.arch import ModelArch, arch_from_hf_config, load_arch
from megatron_mel.rollout.placement import Layout, Topology, engine_request, plan_layout

SHAPES_DIR = Path(__file__).parent / "models" / "shapes"


@dataclass(slots=True)
class Plan:
    arch: ModelArch
    arch_source: str
    topology: Topology | None = None
    dp: int | None = None
    layout: Layout | None = None
    memory: MemoryEstimate | None = None
    gpu_mem_gib: float | None = None
    refusal: str | None = None

    @property
    def fits(self) -> bool:
        return self.refusal is None


def plan_arch(hf_dir: str) -> tuple[ModelArch, str]:
    """The model shape and where it came from (the model's config.json, or a shipped copy)."""
    if (Path(hf_dir) / "config.json").is_file():
        return load_arch(hf_dir), str(Path(hf_dir) / "config.json")
    shipped = SHAPES_DIR / f"{Path(hf_dir).name}.json"
    if shipped.is_file():
        source = f"{shipped.name} shipped with megatron-mel ({hf_dir} is not here)"
        return arch_from_hf_config(json.loads(shipped.read_text()), source=str(shipped)), source
    known = ", ".join(sorted(p.stem for p in SHAPES_DIR.glob("*.json")))
    raise ConfigError(
        f"model.hf_dir: {hf_dir}/config.json is not here and no shipped shape is named "
        f"{Path(hf_dir).name!r} (shipped: {known}); plan needs the model's config.json"
    )


def make_plan(
    cfg: RunConfig,
    *,
    nodes: int | None = None,
    gpus_per_node: int | None = None,
    ranks_per_node: int | None = None,
    gpu_mem_gib: float | None = None,
) -> Plan:
    """The layout and memory of ``cfg`` on the allocation, or a refusal with the reason."""
    arch, source = plan_arch(cfg.model.hf_dir)
    plan = Plan(arch=arch, arch_source=source, gpu_mem_gib=gpu_mem_gib)
    launch, par = cfg.launch, cfg.parallel
    if nodes is None and launch.nodes is None:
        raise ConfigError("plan: give --nodes (the recipe has no launch.nodes)")
    total = nodes if nodes is not None else launch.nodes + launch.rollout_nodes
    gpus = gpus_per_node or launch.gpus_per_node
    if gpus is None:
        raise ConfigError("plan: give --gpus-per-node (the recipe has no launch.gpus_per_node)")
    train_nodes = total - launch.rollout_nodes
    if train_nodes < 1:
        plan.refusal = (
            f"--nodes {total} leaves no training node after launch.rollout_nodes="
            f"{launch.rollout_nodes}"
        )
        return plan
    per_node = ranks_per_node or gpus
    hosts = tuple(f"node{i}" for i in range(total))  # the nodes' own addresses at run time
    plan.topology = Topology(train_nodes=train_nodes, ranks_per_node=per_node,
                             gpus_per_node=gpus, rollout_nodes=launch.rollout_nodes, hosts=hosts)  # fmt: skip
    try:
        plan.dp = arch.validate_layout(par, train_nodes * per_node)
        tp, count = engine_request(cfg.rollout)
        sg = cfg.rollout.server
        plan.layout = plan_layout(plan.topology, mode=cfg.rollout.placement, engine_tp=tp,
                                  num_engines=count, base_port=sg.base_port, host=sg.host)  # fmt: skip
    except ConfigError as exc:
        plan.refusal = str(exc)
        return plan
    server = cfg.rollout.engine != "embedded"
    layout = plan.layout
    plan.memory = estimate(
        cfg, arch, dp=plan.dp, engine_tp=tp if server else None,
        colocated_engines=server and any(layout.engine_ranks(e) for e in layout.engines),
        separate_engines=server and any(not layout.engine_ranks(e) for e in layout.engines),
        gpu_mem_gib=gpu_mem_gib,
    )  # fmt: skip
    if plan.memory.problems:
        plan.refusal = "; ".join(plan.memory.problems)
    return plan


def describe(plan: Plan, cfg: RunConfig, recipe: str) -> str:
    arch, par = plan.arch, cfg.parallel
    params = total_params(arch, arch.padded_vocab_size(cfg.model.vocab_padding_multiple))
    flags = [name for name, on in (("sequence_parallel", par.sequence_parallel),
                                   ("recompute", cfg.model.recompute_activations),
                                   ("distributed optimizer", par.use_distributed_optimizer)) if on]  # fmt: skip
    lines = [
        f"plan for {recipe}: {arch.hf_architecture}, {params / 1e9:.2f} B parameters "
        f"(shape from {plan.arch_source})",
    ]
    if plan.dp is not None:
        lines.append(
            f"parallel: tp={par.tp} pp={par.pp} dp={plan.dp}{f' vpp={par.vpp}' if par.vpp else ''}"
            f"; {', '.join(flags) or 'no memory savers'}; {cfg.model.dtype}, "
            f"micro-batch {cfg.optim.micro_batch_tokens} tokens"
        )
    if plan.layout is not None:
        lines.append(plan.layout.describe())
    if plan.memory is not None:
        lines.append(format_table(plan.memory, plan.gpu_mem_gib))
    if plan.refusal is not None and (plan.memory is None or not plan.memory.problems):
        lines.append(f"cannot be placed: {plan.refusal}")
    return "\n".join(lines)


def to_json(plan: Plan) -> dict:
    layout = plan.layout
    return {
        "fits": plan.fits,
        "refusal": plan.refusal,
        "model": {"architecture": plan.arch.hf_architecture, "source": plan.arch_source},
        "dp": plan.dp,
        "topology": dataclasses.asdict(plan.topology) if plan.topology else None,
        "mode": layout.mode if layout else None,
        "ranks": [dataclasses.asdict(r) for r in layout.ranks] if layout else [],
        "engines": [{**dataclasses.asdict(e), "url": e.url} for e in layout.engines]
        if layout
        else [],
        "memory": plan.memory.to_dict() if plan.memory else None,
        "gpu_mem_gib": plan.gpu_mem_gib,
        "gib": GIB,
    }
