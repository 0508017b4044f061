"""Named builders for the handles the training loop works with (one job each, no god object).

Each builder takes the typed sub-configs it needs. Builders marked "driver" return the object on
global rank 0 and None elsewhere: the driver owns the engine, the verifier, the tokenizer, the
sampler, the meta-experience store and the tracker.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from megatron_mel.checkpoint import Checkpointer
from megatron_mel.config import ConfigError, RunConfig, flatten, read_hf_config
from megatron_mel.convert.checkpoint import load_hf_weights
from megatron_mel.data.datasets import Problem, load_problems
from megatron_mel.data.prompts import PromptFormatter
from megatron_mel.data.sampler import PromptSampler
from megatron_mel.models.arch import ModelArch
from megatron_mel.models.gpt import DTYPES, attention_backend, build_model_chunks
from megatron_mel.reflection.service import Reflector
from megatron_mel.reflection.store import ExperienceStore
from megatron_mel.reflection.templates import ReflectionTemplates
from megatron_mel.rewards.verifier import RewardPool
from megatron_mel.rollout.engine import RolloutEngine
from megatron_mel.rollout.weight_sync import (
    RootTransport,
    Sender,
    SenderTransport,
    WeightSynchronizer,
    WeightTransport,
)
from megatron_mel.tracking import Tracker
from megatron_mel.trainer.actor import Actor, ActorSettings, PolicyRunner, build_actor


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


def load_datasets(cfg: RunConfig) -> tuple[list[Problem], dict[str, list[Problem]]]:
    """Training prompts and evaluation benchmarks; fails on bad records before anything heavy."""
    keys = dict(id_key=cfg.data.id_key, question_key=cfg.data.question_key,
                answer_key=cfg.data.answer_key)  # fmt: skip
    if not cfg.data.train_path:
        raise ConfigError("data.train_path: a training dataset is required")
    train = load_problems(cfg.data.train_path, **keys)
    limit = cfg.trainer.eval_limit
    benchmarks = {
        name: load_problems(path, **keys)[:limit] for name, path in cfg.data.eval_paths.items()
    }
    return train, benchmarks


def build_policy(cfg: RunConfig, arch: ModelArch) -> Actor:
    """Model chunks with the HF weights, wrapped for training (collective)."""
    chunks = build_model_chunks(arch, cfg.model, cfg.parallel)
    load_hf_weights(chunks, cfg.model.hf_dir, arch,
                    arch.padded_vocab_size(cfg.model.vocab_padding_multiple))  # fmt: skip
    settings = ActorSettings(parallel=cfg.parallel, optim=cfg.optim,
                             num_steps=cfg.trainer.num_steps, dtype=DTYPES[cfg.model.dtype],
                             share_prefixes=_share_prefixes(cfg))  # fmt: skip
    return build_actor(chunks, settings, cfg.algorithm, response_budget=cfg.rollout.max_new_tokens)


def build_reference(cfg: RunConfig, arch: ModelArch) -> PolicyRunner | None:
    """The frozen reference policy of a KL term (collective), or None without one.

    It holds the initial weights in the same TP/PP layout as the actor: a second model copy,
    which is why the KL term is off by default (and in the paper).
    """
    if not cfg.algorithm.kl_coef:
        return None
    chunks = build_model_chunks(arch, cfg.model, cfg.parallel)
    load_hf_weights(chunks, cfg.model.hf_dir, arch,
                    arch.padded_vocab_size(cfg.model.vocab_padding_multiple))  # fmt: skip
    for chunk in chunks:
        chunk.requires_grad_(False)
    return PolicyRunner(chunks, cfg.parallel, cfg.optim.micro_batch_tokens,
                        share_prefixes=_share_prefixes(cfg))  # fmt: skip


def _share_prefixes(cfg: RunConfig) -> bool:
    """optim.share_prefixes where the attention supports it (the local one)."""
    return cfg.optim.share_prefixes and attention_backend(cfg.model) == "local"


def build_engine(cfg: RunConfig, arch: ModelArch) -> RolloutEngine:
    """The rollout engine (driver only); weights start from model.hf_dir."""
    if cfg.rollout.engine == "embedded":
        from megatron_mel.rollout.embedded import EmbeddedEngine

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return EmbeddedEngine(
            arch, dtype=DTYPES[cfg.model.dtype], device=device, hf_dir=cfg.model.hf_dir,
            max_batch_size=cfg.rollout.embedded_max_batch_size, seed=cfg.launch.seed,
        )  # fmt: skip
    if cfg.rollout.engine == "sglang":
        from megatron_mel.rollout.sglang_engine import SGLangEngine

        return SGLangEngine(cfg.rollout, model_path=cfg.model.hf_dir, seed=cfg.launch.seed,
                            log_dir=f"{cfg.launch.run_dir}/sglang_logs")  # fmt: skip
    from megatron_mel.rollout.vllm_engine import VLLMEngine

    # vLLM reads its size from the same server knobs as SGLang (rollout.sglang.*).
    return VLLMEngine(cfg.model.hf_dir, tp=cfg.rollout.sglang.engine_tp,
                      gpu_memory_utilization=cfg.rollout.sglang.mem_fraction_static,
                      dtype=cfg.model.dtype, seed=cfg.launch.seed)  # fmt: skip


def build_sync(
    cfg: RunConfig, actor: Actor, arch: ModelArch, engine: RolloutEngine | None
) -> WeightSynchronizer:
    """Weight sync from the actor to the engine(s) (collective)."""
    if cfg.rollout.engine in ("embedded", "vllm"):
        transport: WeightTransport = RootTransport(engine)
    else:
        transport = _sglang_transport(cfg, engine)
    return WeightSynchronizer(
        actor.chunks, arch, transport, engine,
        bucket_bytes=cfg.rollout.weight_bucket_mb * 2**20, verify=cfg.rollout.verify_weights,
    )  # fmt: skip


def _sglang_transport(cfg: RunConfig, engine: RolloutEngine | None) -> WeightTransport:
    """Stage leaders push to the SGLang servers directly (collective: URLs come from rank 0)."""
    from megatron_mel.trainer.phases import from_driver

    urls = from_driver(lambda: list(engine.urls))  # type: ignore[union-attr]
    tps = [cfg.rollout.sglang.engine_tp] * len(urls)
    timeout = cfg.rollout.sglang.request_timeout_s

    def make_sender(stage: int) -> Sender:
        from megatron_mel.rollout import sglang_weights

        if cfg.rollout.placement == "colocate":
            return sglang_weights.ColocatedTensorTransport(urls, tps, timeout_s=timeout)
        return sglang_weights.DistributedTransport(urls, tps, stage=stage, timeout_s=timeout)

    return SenderTransport(engine, make_sender)


def build_driver(
    cfg: RunConfig, arch: ModelArch, train: list[Problem], benchmarks: dict[str, list[Problem]]
) -> DriverHandles:
    """Everything the driver rank owns; call on global rank 0 only."""
    formatter = PromptFormatter.from_dir(
        cfg.model.hf_dir,
        apply_chat_template=cfg.data.apply_chat_template,
        solve_template=cfg.data.prompt_template,
    )
    pool = RewardPool(cfg.reward.function, num_workers=cfg.reward.num_workers,
                      timeout_s=cfg.reward.timeout_s)  # fmt: skip
    templates = ReflectionTemplates.load(
        cfg.reflection.experience_template, cfg.reflection.replay_template
    )
    reflector = Reflector(cfg.reflection, templates, formatter, pool,
                          rollout_max_new_tokens=cfg.rollout.max_new_tokens, seed=cfg.launch.seed)  # fmt: skip
    kept = [
        p for p in train if len(formatter.solve_prompt(p.question)) <= cfg.data.max_prompt_tokens
    ]
    if not kept:
        raise ConfigError(
            f"data.max_prompt_tokens={cfg.data.max_prompt_tokens}: every prompt is longer"
        )
    return DriverHandles(
        engine=build_engine(cfg, arch),
        formatter=formatter,
        pool=pool,
        reflector=reflector,
        sampler=PromptSampler(kept, seed=cfg.launch.seed, shuffle=cfg.data.shuffle),
        store=ExperienceStore(cfg.launch.run_dir),
        benchmarks=benchmarks,
    )


def build_tracker(cfg: RunConfig, *, resume_run_id: str | None, recipe_name: str) -> Tracker:
    return Tracker(cfg.tracking, cfg.launch.run_dir, params=flatten(cfg), run_name=recipe_name,
                   total_steps=cfg.trainer.num_steps, resume_run_id=resume_run_id,
                   enabled=dist.get_rank() == 0)  # fmt: skip


def build_checkpointer(cfg: RunConfig, arch: ModelArch) -> Checkpointer:
    meta = {  # keyword arguments of convert.metadata.write_model_metadata
        "hf_config": read_hf_config(cfg.model.hf_dir),
        "dtype": cfg.model.dtype,
        "padded_vocab_size": arch.padded_vocab_size(cfg.model.vocab_padding_multiple),
        "tp": cfg.parallel.tp,
        "pp": cfg.parallel.pp,
    }
    return Checkpointer(cfg.checkpoint, cfg.launch.run_dir, num_steps=cfg.trainer.num_steps,
                        model_meta=meta, hf_dir=cfg.model.hf_dir)  # fmt: skip
