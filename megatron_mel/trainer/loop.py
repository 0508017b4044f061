"""The MEL training loop: generate, verify, reflect + validate, train, sync, save, evaluate, log.

It reads like the diagram in docs/architecture.md. Every rank runs it; the generation side runs
on the driver (global rank 0) inside ``platform.from_driver`` and its result reaches all ranks,
the training side is collective. Engines start before the trainer allocates; around training
``handoff`` frees and restores their memory when they share the training devices. With ``algorithm.meta_experience`` off (grpo, reinforce_pp, rft)
the reflection step does nothing.
"""

from __future__ import annotations

import logging
import time

from megatron_mel import lifecycle, platform
from megatron_mel.checkpoint import TrainerState
from megatron_mel.config import RunConfig, dump_yaml
from megatron_mel.data.datasets import Problem, load_run_datasets
from megatron_mel.data.packing import TrainSample
from megatron_mel.models.arch import load_arch
from megatron_mel.net.health import check_services
from megatron_mel.report import log_report
from megatron_mel.rollout.engine import SamplingParams
from megatron_mel.rollout.groups import generate_groups
from megatron_mel.rollout.handoff import Handoff
from megatron_mel.run_dir import claim_run_dir
from megatron_mel.timing import PhaseTimer
from megatron_mel.tracking import Tracker
from megatron_mel.trainer import build
from megatron_mel.trainer.actor import Actor, PolicyRunner
from megatron_mel.trainer.build import DriverHandles
from megatron_mel.trainer.evaluation import EvalSpec, evaluate, markdown_table
from megatron_mel.trainer.phases import (
    logprob_mismatch,
    policy_samples,
    verify_groups,
    with_retries,
)

log = logging.getLogger(__name__)
PROGRESS = {"reward/mean": "reward", "mel/pairs": "pairs", "mel/kept": "kept",
            "mel/retention": "retention", "train/pg_loss": "pg_loss", "train/nll_loss": "nll_loss"}  # fmt: skip


def train(cfg: RunConfig, recipe_name: str = "run") -> None:
    """Run (or resume) training as described by ``cfg``; every rank calls this."""
    arch = load_arch(cfg.model.hf_dir)
    arch.validate_layout(cfg.parallel, platform.launcher_env()[1])
    # Bad data fails before the model is built.
    train_set, benchmarks = load_run_datasets(cfg.data, eval_limit=cfg.trainer.eval_limit)
    ctx = platform.init_distributed(cfg.parallel, seed=cfg.model.init_seed)
    # Before anything is written, started or built: one run per directory, services answer.
    platform.on_driver(lambda: (claim_run_dir(cfg.launch.run_dir), check_services(cfg)))
    layout = build.build_layout(cfg.launch, cfg.rollout)
    # Engines first: the trainer has not allocated.
    servers = build.start_servers(cfg.rollout, cfg.model, cfg.launch, layout)
    driver = platform.on_driver(
        lambda: build.build_driver(cfg, arch, train_set, benchmarks, layout)
    )
    driver = driver or DriverHandles()
    actor = build.build_policy(cfg.model, cfg.parallel, cfg.optim, cfg.algorithm, arch,
                               num_steps=cfg.trainer.num_steps,
                               response_budget=cfg.rollout.max_new_tokens)  # fmt: skip
    reference = build.build_reference(cfg.model, cfg.parallel, cfg.optim, cfg.algorithm, arch)
    sync = build.build_sync(cfg.rollout, actor, arch, driver.engine, layout)
    handoff = build.build_handoff(cfg.rollout, sync, driver.engine)
    ckpt = build.build_checkpointer(cfg.checkpoint, cfg.model, cfg.parallel, arch,
                                    run_dir=cfg.launch.run_dir, num_steps=cfg.trainer.num_steps)  # fmt: skip
    state = TrainerState()
    latest = ckpt.latest()
    if latest is not None:
        state = ckpt.load(latest, actor)
        platform.from_driver(lambda: ckpt.restore_driver(driver, state, latest))
    tracker = build.build_tracker(cfg, resume_run_id=state.mlflow_run_id, recipe_name=recipe_name)
    state.mlflow_run_id = tracker.run_id
    tracker.forget_after(state.step)
    if ctx.is_main:
        dump_yaml(cfg, f"{cfg.launch.run_dir}/config.yaml")
        tracker.log_artifact(f"{cfg.launch.run_dir}/config.yaml")
    if latest is not None:
        # The engine started from the HF weights; give it the checkpoint's, under the version
        # the uninterrupted run would have had.
        sync.sync(version=state.weight_version)
    status, stop = "FAILED", lifecycle.agree_to_stop()
    try:
        for step in range(state.step + 1, cfg.trainer.num_steps + 1):
            if stop is not None:
                break
            started = time.perf_counter()
            metrics = _train_step(
                cfg, step, actor, reference, driver, handoff, state.weight_version
            )
            state.weight_version, state.step = int(metrics["sync/weight_version"]), step
            # Wall clock of the whole step (phases plus what no phase timer covers: broadcasts,
            # packing, bookkeeping); evaluation and checkpoints are not part of it.
            metrics["time/step"] = time.perf_counter() - started
            last = step == cfg.trainer.num_steps
            if cfg.trainer.eval_every and (step % cfg.trainer.eval_every == 0 or last):
                metrics.update(
                    platform.from_driver(lambda s=step: _evaluate(cfg, driver, tracker, s))
                )
            # Log before saving: a crash between the two re-runs (and re-logs) the step, while
            # the other order could leave a checkpointed step that was never logged.
            tracker.log_metrics(metrics, step)
            tracker.progress(step, metrics, PROGRESS)
            if ckpt.out_of_time(metrics["time/step"]) and step < cfg.trainer.num_steps:
                lifecycle.request_stop("walltime")
            stop = lifecycle.agree_to_stop()  # collective: all ranks stop after the same step
            if ckpt.due(step, metrics["time/step"]) or stop is not None:
                ckpt.save(state, actor, driver)
                if ctx.is_main:
                    tracker.log_artifact(driver.store.path, "meta_experiences")
        stopped = stop is not None and state.step < cfg.trainer.num_steps
        status = "KILLED" if stopped else "FINISHED"
    finally:
        if ctx.is_main:  # the report plots go to MLflow too; a failure there only warns
            log_report(tracker, cfg.launch.run_dir)
        tracker.close(status)
        sync.close()
        driver.close()
        if servers is not None:
            servers.close()
        platform.destroy_distributed()
    if ctx.is_main and tracker.tracking_uri:
        print(
            f"MLflow run {tracker.run_id} in {tracker.tracking_uri}; to browse it: "
            f"mlflow ui --backend-store-uri {tracker.tracking_uri} (needs the full `mlflow`)"
        )
    if stopped:
        raise lifecycle.RunStopped(stop, step=state.step, checkpoint=ckpt.saved_name)


def _train_step(
    cfg: RunConfig,
    step: int,
    actor: Actor,
    reference: PolicyRunner | None,
    driver: DriverHandles,
    handoff: Handoff,
    version: int,
) -> dict[str, float]:
    """One MEL cycle: generate on the engines, hand the devices to training, train, hand them
    back with the new weights; returns its metrics (same on every rank)."""
    timer = PhaseTimer()
    samples, metrics, timings = platform.from_driver(
        lambda: _generate_and_reflect(cfg, step, driver, timer)
    )
    timer.seconds.update(timings)  # the driver's phases, timed on it, for every rank
    metrics.update(handoff.to_train())
    responses = [s for s in samples if s.term in ("pg", "rft")]  # the rollout responses
    engine_logprobs = [s.old_logprobs for s in responses]
    if cfg.algorithm.recompute_old_logprobs:
        # One optimizer update per batch: pi_old is the policy at that update, whose log-probs
        # the training forward computes anyway (rho = 1 there), so no separate forward runs.
        for sample in responses:
            sample.old_logprobs = None
    if reference is not None:
        pg = [s for s in samples if s.term == "pg"]
        with timer("reference"):
            for sample, values in zip(pg, reference.compute_logprobs(pg)):
                sample.ref_logprobs = values
    with timer("train"):
        train = actor.train_step(samples, step=step, num_prompts=cfg.rollout.prompts_per_step)
    metrics.update(logprob_mismatch(engine_logprobs, [s.train_logprobs or [] for s in responses]))
    metrics.update({f"train/{k}": v for k, v in train.items()})
    metrics.update(timer.metrics())
    metrics["rollout/weight_version"] = float(version)
    metrics.update(handoff.to_rollout(version + 1))
    return metrics


def _generate_and_reflect(
    cfg: RunConfig, step: int, driver: DriverHandles, timer: PhaseTimer
) -> tuple[list[TrainSample], dict[str, float], dict[str, float]]:
    """Driver side of a step: rollouts, rewards, reflection + replay, store; no collectives.

    An engine failure re-runs the generation with the same prompts and seeds (rollout.max_retries).
    """
    problems = driver.sampler.next_batch(cfg.rollout.prompts_per_step)
    return with_retries(
        lambda: _generate_for(cfg, step, driver, timer, problems),
        cfg.rollout.max_retries,
        f"step {step} generation",
    )


def _generate_for(
    cfg: RunConfig, step: int, driver: DriverHandles, timer: PhaseTimer, problems: list[Problem]
) -> tuple[list[TrainSample], dict[str, float], dict[str, float]]:
    params = SamplingParams(n=cfg.rollout.samples_per_prompt, temperature=cfg.rollout.temperature,
                            top_p=cfg.rollout.top_p, top_k=cfg.rollout.top_k,
                            max_new_tokens=cfg.rollout.max_new_tokens,
                            stop_token_ids=driver.formatter.stop_token_ids,
                            seed=cfg.launch.seed * 1_000_003 + step)  # fmt: skip
    with timer("rollout"):
        groups = generate_groups(driver.engine, driver.formatter, problems, params,
                                 request_prefix=f"rollout/{step}")  # fmt: skip
    with timer("reward"):
        metrics = verify_groups(driver.pool, groups, score_truncated=cfg.reward.score_truncated)
    samples = policy_samples(groups, cfg.algorithm)
    metrics["tokens/rollout"] = float(sum(len(c.token_ids) for g in groups for c in g.completions))
    if cfg.algorithm.uses_meta_experience:
        outcome = driver.reflector.run(driver.engine, groups, step, timer)
        samples += outcome.samples
        metrics.update(outcome.metrics)
        metrics.update({f"tokens/{k}": float(v) for k, v in outcome.generated_tokens.items()})
        records = outcome.records
    else:
        records = []
    driver.store.append(records)  # after every generation call succeeded: retries write once
    metrics["data/epoch"] = float(driver.sampler.epoch)
    metrics["data/prompts_dropped_too_long"] = float(driver.sampler.dropped_too_long)
    return samples, metrics, dict(timer.seconds)


def _evaluate(
    cfg: RunConfig, driver: DriverHandles, tracker: Tracker, step: int
) -> dict[str, float]:
    if not driver.benchmarks:
        return {}
    spec = EvalSpec.from_config(cfg.trainer, cfg.reward, seed=cfg.launch.seed)
    results = evaluate(driver.engine, driver.formatter, driver.pool, driver.benchmarks, spec,
                       tag=f"eval/{step}")  # fmt: skip
    table = markdown_table(results)
    path = f"{cfg.launch.run_dir}/eval_step_{step:06d}.md"
    with open(path, "w") as handle:
        handle.write(table + "\n")
    tracker.log_artifact(path, "eval")
    print(table, flush=True)
    return {k: v for r in results for k, v in r.metrics().items()}
