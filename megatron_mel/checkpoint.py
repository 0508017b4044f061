"""Training checkpoints: save, resume, atomicity, retention and the walltime guard.

    <run_dir>/checkpoints/step_000010/
        model/               megatron-core dist-checkpoint: model chunks + optimizer state
        mel_model.json, hf/  so `convert_checkpoint.py mcore-to-hf` reads it like any export
        trainer_state.json   step, weight version, sampler, scheduler, MLflow run id
        rng/rank_<r>.pt      every rank's RNG states
        meta_experiences.jsonl
    <run_dir>/checkpoints/latest          name of the newest complete checkpoint

A checkpoint is written under ``step_N.tmp`` and renamed when every rank has finished, and
``latest`` is replaced atomically after that; a crash at any moment leaves the previous
checkpoint intact and named by ``latest``. Older complete checkpoints beyond ``keep_last`` are
removed after a newer one is complete. The checkpointer decides when to save (its interval, the
last step, or a walltime about to run out) so the loop only asks.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_mel.config import CheckpointConfig
from megatron_mel.convert.checkpoint import unwrap
from megatron_mel.convert.metadata import MCORE_SUBDIR, write_model_metadata

STATE_NAME = "trainer_state.json"
LATEST = "latest"
# The distributed optimizer's only format that reloads on CPU/gloo and across DP sizes.
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


@dataclass
class TrainerState:
    step: int = 0
    weight_version: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    elapsed_s: float = 0.0


def _prime_optimizer_state(optimizer: Any) -> None:
    """Create the inner torch optimizers' state (step, moments) so a checkpoint loads into it.

    dist-checkpointing loads in place, and torch's Adam creates its state only on the first
    step; without Apex/TE fused Adam, Megatron's distributed optimizer then finds no ``step``
    to describe. A step with zero gradients at lr 0 creates the state and changes no weight
    (AdamW's decay is scaled by lr too); the checkpoint then overwrites all of it.
    """
    members = getattr(optimizer, "chained_optimizers", [optimizer])
    for member in members:
        inner = getattr(member, "optimizer", None)
        if inner is None or len(inner.state) > 0:
            continue
        saved_lr = [group["lr"] for group in inner.param_groups]
        for group in inner.param_groups:
            group["lr"] = 0.0
            for param in group["params"]:
                param.grad = torch.zeros_like(param)
        inner.step()
        for group, lr in zip(inner.param_groups, saved_lr):
            group["lr"] = lr
            for param in group["params"]:
                param.grad = None


def _deadline(cfg: CheckpointConfig, started: float) -> float | None:
    """The earlier of the two walltime limits, on the monotonic clock; None without either."""
    limits = []
    if cfg.walltime_minutes is not None:
        limits.append(started + cfg.walltime_minutes * 60)
    if cfg.job_end_time is not None:
        limits.append(started + cfg.job_end_time - time.time())
    return min(limits) if limits else None


class Checkpointer:
    def __init__(
        self,
        cfg: CheckpointConfig,
        run_dir: str | Path,
        *,
        num_steps: int,
        model_meta: dict[str, Any],
        hf_dir: str,
    ) -> None:
        self.cfg = cfg
        self.root = Path(cfg.dir or Path(run_dir) / "checkpoints")
        self.num_steps = num_steps
        self.model_meta = model_meta
        self.hf_dir = hf_dir
        self.started = time.monotonic()
        self.deadline = _deadline(cfg, self.started)
        self.last_save_s = 0.0

    # -- decisions ----------------------------------------------------------------------------

    def due(self, step: int, step_seconds: float) -> bool:
        """Save after this step? (interval, last step, or the walltime would not fit another)."""
        return (
            step % self.cfg.save_every == 0
            or step == self.num_steps
            or self.out_of_time(step_seconds)
        )

    def out_of_time(self, step_seconds: float) -> bool:
        """True when another step plus a save would overrun ``checkpoint.walltime_minutes``."""
        if self.deadline is None:
            return False
        margin = 1.5 * step_seconds + 2.0 * self.last_save_s + 30.0
        return time.monotonic() + margin > self.deadline

    # -- reading ------------------------------------------------------------------------------

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if self.cfg.resume == "never" or not pointer.is_file():
            return None
        path = self.root / pointer.read_text().strip()
        if not (path / STATE_NAME).is_file():
            raise RuntimeError(f"{pointer} names {path}, which is not a complete checkpoint")
        return path

    def load(self, path: Path, actor: Any) -> TrainerState:
        """Restore model, optimizer, scheduler and RNG into ``actor``; collective."""
        with torch.no_grad():
            _prime_optimizer_state(actor.optimizer)
            sharded = self._sharded_state(actor, is_loading=True)
            state = dist_checkpointing.load(sharded, str(path / MCORE_SUBDIR))
            for i, chunk in enumerate(actor.chunks):
                unwrap(chunk).load_state_dict(state[f"model{i}"], strict=True)
            actor.optimizer.load_state_dict(state["optimizer"])
        trainer = TrainerState(**json.loads((path / STATE_NAME).read_text()))
        actor.scheduler.load_state_dict(trainer.scheduler)
        rng = torch.load(path / "rng" / f"rank_{dist.get_rank()}.pt", weights_only=False)
        torch.set_rng_state(rng["torch"])
        return trainer

    # -- writing ------------------------------------------------------------------------------

    def save(self, state: TrainerState, actor: Any, store: Any) -> Path:
        """Write step ``state.step`` atomically; collective over all ranks."""
        start = time.monotonic()
        name = f"step_{state.step:06d}"
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        rank = dist.get_rank()
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / MCORE_SUBDIR).mkdir(parents=True)
            (tmp / "rng").mkdir()
        dist.barrier()
        dist_checkpointing.save(
            self._sharded_state(actor, is_loading=False), str(tmp / MCORE_SUBDIR)
        )
        torch.save({"torch": torch.get_rng_state()}, tmp / "rng" / f"rank_{rank}.pt")
        dist.barrier()
        if rank == 0:
            state.scheduler = actor.scheduler.state_dict()
            (tmp / STATE_NAME).write_text(json.dumps(asdict(state), indent=1) + "\n")
            write_model_metadata(tmp, **self.model_meta, hf_files_from=self.hf_dir)
            store.save_to(tmp)
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            pointer = self.root / f"{LATEST}.tmp"
            pointer.write_text(name + "\n")
            pointer.replace(self.root / LATEST)
            self._prune(keep=name)
        dist.barrier()
        self.last_save_s = time.monotonic() - start
        return final

    def _prune(self, keep: str) -> None:
        complete = sorted(p for p in self.root.glob("step_*") if p.suffix != ".tmp")
        for old in complete[: -self.cfg.keep_last]:
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    @staticmethod
    def _sharded_state(actor: Any, *, is_loading: bool) -> dict[str, Any]:
        model = {f"model{i}": unwrap(c).sharded_state_dict() for i, c in enumerate(actor.chunks)}
        # The optimizer maps its parameters to sharded tensors by identity; prefix the chunk
        # index so module-local keys of different virtual stages do not overwrite each other.
        flat_model = {f"{i}.{k}": v for i, sub in enumerate(model.values()) for k, v in sub.items()}
        optim = actor.optimizer.sharded_state_dict(
            flat_model, is_loading=is_loading, metadata=OPTIM_METADATA
        )
        return {**model, "optimizer": optim}
