"""Named builders for the handles the training loop works with (one job each, no god object).

Each builder takes the typed sections it needs; two take the whole RunConfig on purpose:
:func:`build_driver` composes the driver's handles from six sections (through the builders
here), and :func:`build_tracker` logs every key as a parameter. The driver (global rank 0) owns
the engine, the verifier, the tokenizer, the sampler, the meta-experience store and the tracker.
``megatron-mel eval`` (evaluate_cli.py) builds its formatter, reward pool and engine here too.
"""

from __future__ import annotations

import dataclasses
import logging
import socket
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_mel import lifecycle, platform
from megatron_mel.checkpoint import Checkpointer
from megatron_mel.config import (
    AlgorithmConfig,
    CheckpointConfig,
    ConfigError,
    DataConfig,
    LaunchConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    RewardConfig,
    RolloutConfig,
    RunConfig,
    flatten,
)
from megatron_mel.convert.checkpoint import load_hf_weights
from megatron_mel.data.datasets import Problem, drop_long_prompts
from megatron_mel.data.prompts import PromptFormatter
from megatron_mel.data.sampler import PromptSampler
from megatron_mel.models.arch import ModelArch, read_hf_config
from megatron_mel.models.gpt import DTYPES, attention_backend, build_model_chunks
from megatron_mel.reflection.service import Reflector
from megatron_mel.reflection.store import ExperienceStore
from megatron_mel.reflection.templates import ReflectionTemplates
from megatron_mel.rewards.verifier import RewardPool
from megatron_mel.rollout import placement
from megatron_mel.rollout.engine import EngineError, RolloutEngine
from megatron_mel.rollout.handoff import Handoff
from megatron_mel.rollout.placement import Layout
from megatron_mel.rollout.servers import NodeServers, wait_ready
from megatron_mel.rollout.sglang_sync import ColocatedIpcTransport, StageNcclTransport
from megatron_mel.rollout.weight_sync import RootTransport, WeightSynchronizer, WeightTransport
from megatron_mel.tracking import Tracker
from megatron_mel.trainer.actor import Actor, ActorSettings, PolicyRunner, build_actor

log = logging.getLogger(__name__)


@dataclass
class DriverHandles:
    """What only the driver rank holds (all None elsewhere)."""

    engine: RolloutEngine | None = None
    formatter: PromptFormatter | None = None
    pool: RewardPool | None = None
    reflector: Reflector | None = None
    sampler: PromptSampler | None = None
    store: ExperienceStore | None = None
    benchmarks: dict[str, list[Problem]] | None = None

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()
        if self.engine is not None:
            self.engine.shutdown()


def build_formatter(model: ModelConfig, data: DataConfig) -> PromptFormatter:
    """The tokenizer and prompt format of the run (driver, and ``megatron-mel eval``)."""
    return PromptFormatter.from_dir(model.hf_dir, apply_chat_template=data.apply_chat_template,
                                    solve_template=data.prompt_template)  # fmt: skip


def build_reward_pool(reward: RewardConfig) -> RewardPool:
    """The verifier worker pool; its workers are shielded from the rank's signals (the pool
    stops them itself)."""
    with lifecycle.shielded_children():
        return RewardPool.from_config(reward)


def _loaded_chunks(model: ModelConfig, parallel: ParallelConfig, arch: ModelArch) -> list:
    """This rank's model chunks with the HF weights of model.hf_dir (collective)."""
    chunks = build_model_chunks(arch, model, parallel)
    load_hf_weights(
        chunks, model.hf_dir, arch, arch.padded_vocab_size(model.vocab_padding_multiple)
    )
    return chunks


def _share_prefixes(model: ModelConfig, optim: OptimConfig) -> bool:
    """optim.share_prefixes where the attention supports it (the local one)."""
    return optim.share_prefixes and attention_backend(model) == "local"


def build_policy(
    model: ModelConfig,
    parallel: ParallelConfig,
    optim: OptimConfig,
    algorithm: AlgorithmConfig,
    arch: ModelArch,
    *,
    num_steps: int,
    response_budget: int,
) -> Actor:
    """Model chunks with the HF weights, wrapped for training (collective). ``num_steps`` is
    trainer.num_steps (the LR schedule), ``response_budget`` rollout.max_new_tokens."""
    settings = ActorSettings(parallel=parallel, optim=optim, num_steps=num_steps,
                             dtype=DTYPES[model.dtype], vocab_size=arch.vocab_size,
                             max_seq_len=model.max_seq_len,
                             share_prefixes=_share_prefixes(model, optim))  # fmt: skip
    chunks = _loaded_chunks(model, parallel, arch)
    return build_actor(chunks, settings, algorithm, response_budget=response_budget)


def build_reference(
    model: ModelConfig,
    parallel: ParallelConfig,
    optim: OptimConfig,
    algorithm: AlgorithmConfig,
    arch: ModelArch,
) -> PolicyRunner | None:
    """The frozen reference policy of a KL term (collective), or None without one.

    It holds the initial weights in the same TP/PP layout as the actor: a second model copy,
    which is why the KL term is off by default (and in the paper).
    """
    if not algorithm.kl_coef:
        return None
    chunks = _loaded_chunks(model, parallel, arch)
    for chunk in chunks:
        chunk.requires_grad_(False)
    return PolicyRunner(chunks, parallel, optim.micro_batch_tokens, vocab_size=arch.vocab_size,
                        max_seq_len=model.max_seq_len,
                        share_prefixes=_share_prefixes(model, optim))  # fmt: skip


def build_layout(launch: LaunchConfig, rollout: RolloutConfig) -> Layout:
    """Where every training rank and engine runs (collective: the ranks' numbering is checked,
    and node addresses are gathered when MEL_NODE_HOSTS does not give them)."""
    topology = placement.topology_from_env(launch)
    rank, _, local_rank = platform.launcher_env()
    node = rank // topology.ranks_per_node
    reported: list = [None] * dist.get_world_size()
    dist.all_gather_object(reported, (rank, node, local_rank, socket.gethostname()))
    if not topology.hosts and topology.train_nodes > 1 and not topology.rollout_nodes:
        by_node = {n: host for _, n, lr, host in reported if lr == 0}
        topology = dataclasses.replace(topology, hosts=tuple(by_node[n] for n in sorted(by_node)))
    server = rollout.server
    tp, count = placement.engine_request(rollout)
    layout = placement.plan_layout(topology, mode=rollout.placement, engine_tp=tp,
                                   num_engines=count, base_port=server.base_port,
                                   host=server.host)  # fmt: skip
    placement.check_rank_table(layout, [(r, n, lr) for r, n, lr, _ in reported])
    if dist.get_rank() == 0 and rollout.engine == "sglang":
        log.info("%s", layout.describe())
    return layout


def start_servers(
    rollout: RolloutConfig, model: ModelConfig, launch: LaunchConfig, layout: Layout
) -> NodeServers | None:
    """This node's SGLang servers, started by its launcher rank before the trainer allocates
    (collective: every rank learns whether every node's servers came up)."""
    if rollout.engine != "sglang" or rollout.server.urls:
        return None
    node = dist.get_rank() // layout.topology.ranks_per_node
    servers, error = None, None
    if layout.launcher_rank(node) == dist.get_rank() and layout.engines_on(node):
        servers = NodeServers(layout.engines_on(node), rollout, model_path=model.hf_dir,
                              seed=launch.seed, log_dir=f"{launch.run_dir}/engine_logs")  # fmt: skip
        try:
            servers.start()
        except Exception as exc:  # reported to every rank below
            error = f"node {node}: {exc}"
    errors: list = [None] * dist.get_world_size()
    dist.all_gather_object(errors, error)
    failed = [e for e in errors if e]
    if failed:
        if servers is not None:
            servers.close()
        raise EngineError("sglang", "rollout servers did not start: " + "; ".join(failed))
    return servers


def build_engine(
    model: ModelConfig,
    rollout: RolloutConfig,
    launch: LaunchConfig,
    arch: ModelArch,
    layout: Layout | None = None,
) -> RolloutEngine:
    """The rollout engine (driver only); weights start from model.hf_dir.

    Without a ``layout`` (``megatron-mel eval``, one process) SGLang servers must be given by
    ``rollout.server.urls``.
    """
    if rollout.engine == "embedded":
        from megatron_mel.rollout.embedded import EmbeddedEngine

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return EmbeddedEngine(
            arch, dtype=DTYPES[model.dtype], device=device, hf_dir=model.hf_dir,
            max_batch_size=rollout.embedded_max_batch_size, seed=launch.seed,
        )  # fmt: skip
    if rollout.engine == "sglang":
        from megatron_mel.rollout.sglang_engine import SGLangEngine

        if rollout.server.urls:
            return SGLangEngine.connect(rollout)
        if layout is None:
            raise ConfigError(
                "rollout.server.urls: evaluation with rollout.engine=sglang connects to running "
                "servers (start them with `megatron-mel serve` or SGLang itself)"
            )
        deadline = time.monotonic() + rollout.server.launch_timeout_s
        for slot in layout.engines_on_rollout_nodes():  # started by `megatron-mel serve`
            wait_ready(slot.url, deadline)
        return SGLangEngine.from_config(rollout, [e.url for e in layout.engines],
                                        [e.tp for e in layout.engines])  # fmt: skip
    from megatron_mel.rollout.vllm_engine import VLLMEngine

    if rollout.placement != "colocate" or rollout.server.num_engines not in (None, 1):
        raise ConfigError(
            "rollout.engine=vllm runs one engine beside the driver, colocated on its node's "
            "first GPUs; use rollout.engine=sglang for several engines or disaggregated placement"
        )
    # vLLM reads its size from the same server knobs as SGLang (rollout.server.*), and runs in a
    # process of its own (rollout/vllm_host.py).
    return VLLMEngine(model.hf_dir, tp=rollout.server.engine_tp,
                      gpu_memory_utilization=rollout.server.mem_fraction_static,
                      dtype=model.dtype, seed=launch.seed,
                      log_dir=f"{launch.run_dir}/engine_logs")  # fmt: skip


def build_sync(
    rollout: RolloutConfig,
    actor: Actor,
    arch: ModelArch,
    engine: RolloutEngine | None,
    layout: Layout,
) -> WeightSynchronizer:
    """Weight sync from the actor to the engine(s) (collective)."""
    if rollout.engine != "sglang":
        transport: WeightTransport = RootTransport(engine)
    elif rollout.placement == "colocate":
        if rollout.server.urls and len(rollout.server.urls) != len(layout.engines):
            raise ConfigError(
                f"rollout.server.urls: {len(rollout.server.urls)} colocated servers, but the "
                f"placement has {len(layout.engines)} engine slots; colocated servers must sit "
                "where the placement puts them (megatron-mel plan shows it)"
            )
        transport = ColocatedIpcTransport(
            layout, engine, timeout_s=rollout.server.request_timeout_s
        )
    else:
        urls = platform.from_driver(lambda: list(engine.urls))  # type: ignore[union-attr]
        node = dist.get_rank() // layout.topology.ranks_per_node
        host = layout.topology.hosts[node] if layout.topology.hosts else "127.0.0.1"
        transport = StageNcclTransport(
            urls, [rollout.server.engine_tp] * len(urls), engine, master_address=host,
            backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout_s=rollout.server.request_timeout_s,
        )  # fmt: skip
    return WeightSynchronizer(
        actor.chunks, arch, transport, engine,
        bucket_bytes=rollout.weight_bucket_mb * 2**20, verify=rollout.verify_weights,
    )  # fmt: skip


def build_handoff(
    rollout: RolloutConfig, sync: WeightSynchronizer, engine: RolloutEngine | None
) -> Handoff:
    release = rollout.release_memory and rollout.placement == "colocate"
    return Handoff(sync, engine, release=release)


def build_driver(
    cfg: RunConfig,
    arch: ModelArch,
    train: list[Problem],
    benchmarks: dict[str, list[Problem]],
    layout: Layout,
) -> DriverHandles:
    """Everything the driver rank owns; call on global rank 0 only."""
    formatter = build_formatter(cfg.model, cfg.data)
    pool = build_reward_pool(cfg.reward)
    templates = ReflectionTemplates.load(
        cfg.reflection.experience_template, cfg.reflection.replay_template
    )
    reflector = Reflector(cfg.reflection, templates, formatter, pool,
                          rollout=cfg.rollout, score_truncated=cfg.reward.score_truncated,
                          max_seq_len=cfg.model.max_seq_len, seed=cfg.launch.seed)  # fmt: skip
    kept, dropped = drop_long_prompts(train, formatter, cfg.data.max_prompt_tokens)
    return DriverHandles(
        engine=build_engine(cfg.model, cfg.rollout, cfg.launch, arch, layout),
        formatter=formatter,
        pool=pool,
        reflector=reflector,
        sampler=PromptSampler(
            kept, seed=cfg.launch.seed, shuffle=cfg.data.shuffle, dropped_too_long=dropped
        ),
        store=ExperienceStore(cfg.launch.run_dir),
        benchmarks=benchmarks,
    )


def build_tracker(cfg: RunConfig, *, resume_run_id: str | None, recipe_name: str) -> Tracker:
    return Tracker(cfg.tracking, cfg.launch.run_dir, params=flatten(cfg), run_name=recipe_name,
                   total_steps=cfg.trainer.num_steps, resume_run_id=resume_run_id,
                   enabled=dist.get_rank() == 0)  # fmt: skip


def build_checkpointer(
    checkpoint: CheckpointConfig,
    model: ModelConfig,
    parallel: ParallelConfig,
    arch: ModelArch,
    *,
    run_dir: str,
    num_steps: int,
) -> Checkpointer:
    """``run_dir`` is launch.run_dir, ``num_steps`` trainer.num_steps (the final save)."""
    meta = {  # keyword arguments of convert.metadata.write_model_metadata
        "hf_config": read_hf_config(model.hf_dir),
        "dtype": model.dtype,
        "padded_vocab_size": arch.padded_vocab_size(model.vocab_padding_multiple),
        "tp": parallel.tp,
        "pp": parallel.pp,
    }
    return Checkpointer(checkpoint, run_dir, num_steps=num_steps, model_meta=meta,
                        hf_dir=model.hf_dir)  # fmt: skip
