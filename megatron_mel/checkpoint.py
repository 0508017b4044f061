"""Training checkpoints: save, resume, atomicity, checksums, retention and the walltime guard.

    <run_dir>/checkpoints/step_000010/
        model/               megatron-core dist-checkpoint: model chunks + optimizer state
        mel_model.json, hf/  so `convert_checkpoint.py mcore-to-hf` reads it like any export
        trainer_state.json   step, weight version, sampler, dataset fingerprint, MLflow run id
        rng/rank_<r>.pt      every rank's RNG states
        meta_experiences.jsonl
        manifest.json        size and sha256 of every other file (convert/manifest.py)
    <run_dir>/checkpoints/latest          name of the newest complete checkpoint (a hint)

A checkpoint is written under ``step_N.tmp``, checksummed, and renamed when every rank has
finished; ``latest`` is replaced atomically after that, so a crash at any moment leaves the
previous checkpoint intact. Resuming does not trust ``latest``: it takes the newest
``step_N`` directory that is complete and whose files match their manifest, and skips (with a
warning naming the file) a corrupt or partial one in favour of the previous one ``keep_last``
kept. A checkpoint of another model or dataset is refused with one line, not loaded. Older
complete checkpoints beyond ``keep_last`` are removed once a newer one is complete. The
checkpointer decides when to save (interval, last step, walltime) so the loop only asks.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from megatron_mel import lifecycle
from megatron_mel.config import CheckpointConfig, ConfigError
from megatron_mel.convert import manifest
from megatron_mel.convert.checkpoint import unwrap
from megatron_mel.convert.metadata import MCORE_SUBDIR, read_mcore_metadata, write_model_metadata
from megatron_mel.models.arch import arch_from_hf_config

T = TypeVar("T")
log = logging.getLogger(__name__)
STATE_NAME = "trainer_state.json"
LATEST = "latest"
STEP_DIR = re.compile(r"^step_(\d{6,})$")
# The distributed optimizer's only format that reloads on CPU/gloo and across DP sizes.
OPTIM_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
# What must match for a checkpoint's weights to load into this run's model.
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_heads", "num_kv_heads",
                "head_dim", "vocab_size", "tie_embeddings", "qkv_bias", "qk_norm")  # fmt: skip
RESUME_FIX = "start a fresh launch.run_dir, or set checkpoint.resume=never to start over here"


@dataclass
class TrainerState:
    step: int = 0
    weight_version: int = 0
    sampler: dict[str, Any] = field(default_factory=dict)
    scheduler: dict[str, Any] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    elapsed_s: float = 0.0
    dataset: dict[str, Any] = field(default_factory=dict)
    """Fingerprint of the training prompts (count, sha256): a resume on other data is refused."""


def dataset_fingerprint(problems: list[Any]) -> dict[str, Any]:
    digest = hashlib.sha256()
    for p in problems:
        digest.update(json.dumps([p.id, p.question, p.answer]).encode())
    return {"num_problems": len(problems), "sha256": digest.hexdigest()}


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
        self.saved: Path | None = None
        """The newest complete checkpoint of this run (written or resumed from)."""

    @property
    def saved_name(self) -> str | None:
        return str(self.saved) if self.saved is not None else None

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
        """The newest complete, verified checkpoint, or None to start fresh; collective.

        ``latest`` is only a hint: every ``step_N`` directory is a candidate, newest first. One
        without trainer_state.json (partial) or failing its manifest (corrupt) is skipped with
        a warning naming the file; if there are checkpoints but none is usable, that is an error
        rather than a silent fresh start over them.
        """
        if self.cfg.resume == "never" or not self.root.is_dir():
            return None
        self._check_pointer()
        rejected = []
        for path in reversed(self._step_dirs()):
            if not (path / STATE_NAME).is_file():
                reason = f"{path / STATE_NAME} is missing (partial checkpoint)"
            else:
                try:
                    manifest.collective_verify(path)
                    self.saved = path
                    return path
                except manifest.CorruptCheckpoint as exc:
                    reason = str(exc)
            rejected.append(path.name)
            _warn_rank0(f"skipping checkpoint {path.name}: {reason}")
        if rejected:
            raise ConfigError(
                f"checkpoint.dir {self.root}: no usable checkpoint ({', '.join(rejected)} are "
                f"corrupt or partial, see the warnings); {RESUME_FIX}"
            )
        return None

    def _check_pointer(self) -> None:
        pointer = self.root / LATEST
        if pointer.is_file():
            name = pointer.read_text().strip()
            if not (self.root / name / STATE_NAME).is_file():
                _warn_rank0(
                    f"{pointer} names {name!r}, which is not a complete checkpoint; "
                    "resuming from the newest complete one instead"
                )

    def load(self, path: Path, actor: Any) -> TrainerState:
        """Restore model, optimizer, scheduler and RNG into ``actor``; collective."""
        self._check_same_model(path)
        trainer = TrainerState(**_read_json(path / STATE_NAME))
        rng_path = path / "rng" / f"rank_{dist.get_rank()}.pt"
        if not rng_path.is_file():
            raise ConfigError(
                f"{rng_path} is missing: {path.name} was saved by fewer ranks; resume with the "
                "world size it was saved with"
            )
        with torch.no_grad():
            _prime_optimizer_state(actor.optimizer)
            sharded = self._sharded_state(actor, is_loading=True)
            state = dist_checkpointing.load(sharded, str(path / MCORE_SUBDIR))
            for i, chunk in enumerate(actor.chunks):
                unwrap(chunk).load_state_dict(state[f"model{i}"], strict=True)
            actor.optimizer.load_state_dict(state["optimizer"])
        actor.scheduler.load_state_dict(trainer.scheduler)
        rng = torch.load(rng_path, weights_only=False)
        torch.set_rng_state(rng["torch"])
        return trainer

    def _check_same_model(self, path: Path) -> None:
        meta = read_mcore_metadata(path)
        theirs = arch_from_hf_config(meta["hf_config"], source=str(path))
        ours = arch_from_hf_config(self.model_meta["hf_config"], source=self.hf_dir)
        changed = [
            f"{key} {getattr(theirs, key)} -> {getattr(ours, key)}"
            for key in SHAPE_FIELDS
            if getattr(theirs, key) != getattr(ours, key)
        ]
        if meta["padded_vocab_size"] != self.model_meta["padded_vocab_size"]:
            changed.append(
                f"padded vocab {meta['padded_vocab_size']} -> {self.model_meta['padded_vocab_size']}"
            )
        if changed:
            raise ConfigError(
                f"model.hf_dir: {path} was saved for another model ({', '.join(changed)}); "
                f"resume with the model the run started with, or {RESUME_FIX}"
            )

    def restore_driver(self, driver: Any, state: TrainerState, path: Path) -> None:
        """Driver side of a resume: sampler position and meta-experience store (rank 0)."""
        ours = dataset_fingerprint(driver.sampler.problems)
        theirs = state.dataset
        if theirs and theirs != ours:
            raise ConfigError(
                f"data.train_path: {path.name} was saved for {theirs['num_problems']} training "
                f"prompts, this run has {ours['num_problems']} (or other ones: the content "
                f"fingerprint differs); resume with the dataset the run started with, or "
                f"{RESUME_FIX}"
            )
        try:
            driver.sampler.load_state_dict(state.sampler)
        except ValueError as exc:
            raise ConfigError(f"data.train_path: {path.name}: {exc}; {RESUME_FIX}") from None
        driver.store.restore_from(path)

    # -- writing ------------------------------------------------------------------------------

    def save(self, state: TrainerState, actor: Any, driver: Any) -> Path:
        """Write step ``state.step`` atomically; collective over all ranks.

        ``driver`` (the DriverHandles; its fields are None off rank 0) gives the sampler
        position, the dataset fingerprint and the meta-experience store. A failure on any rank
        (a full disk: one line naming the directory and the free space) fails every rank, and
        the previous checkpoint stays the newest.
        """
        start = time.monotonic()
        name = f"step_{state.step:06d}"
        final, tmp = self.root / name, self.root / f"{name}.tmp"
        rank = dist.get_rank()
        _shield_writer_queue()

        def prepare() -> None:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)
                (tmp / MCORE_SUBDIR).mkdir(parents=True)
                (tmp / "rng").mkdir()

        def write_shards() -> None:
            dist_checkpointing.save(
                self._sharded_state(actor, is_loading=False), str(tmp / MCORE_SUBDIR)
            )
            torch.save({"torch": torch.get_rng_state()}, tmp / "rng" / f"rank_{rank}.pt")

        def write_driver_files() -> None:
            if rank == 0:
                state.sampler = driver.sampler.state_dict()
                state.dataset = dataset_fingerprint(driver.sampler.problems)
                state.scheduler = actor.scheduler.state_dict()
                (tmp / STATE_NAME).write_text(json.dumps(asdict(state), indent=1) + "\n")
                write_model_metadata(tmp, **self.model_meta, hf_files_from=self.hf_dir)
                driver.store.save_to(tmp)

        try:
            _on_all_ranks(prepare, tmp)
            with _held_writer_errors():
                _on_all_ranks(write_shards, tmp)
            _on_all_ranks(write_driver_files, tmp)
            _on_all_ranks(lambda: manifest.collective_write(tmp), tmp)
        except BaseException:
            if rank == 0:
                shutil.rmtree(tmp, ignore_errors=True)  # give the space back
            raise
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            pointer = self.root / f"{LATEST}.tmp"
            pointer.write_text(name + "\n")
            pointer.replace(self.root / LATEST)
            self._prune(keep=name)
        dist.barrier()
        self.last_save_s = time.monotonic() - start
        self.saved = final
        return final

    def _step_dirs(self) -> list[Path]:
        """``step_N`` directories (complete or not; never ``.tmp``), oldest first."""
        found = [p for p in self.root.iterdir() if p.is_dir() and STEP_DIR.match(p.name)]
        return sorted(found, key=lambda p: int(p.name.removeprefix("step_")))

    def _prune(self, keep: str) -> None:
        for old in self._step_dirs()[: -self.cfg.keep_last]:
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


def _shield_writer_queue() -> None:
    """Start megatron-core's checkpoint-writer Manager process shielded from stop signals.

    It is a child of the rank, created at the first save; torchrun (``killpg``), ``scancel``
    or ``kill -- -PGID`` would otherwise kill it with the SIGTERM that asks for a final
    checkpoint, and that checkpoint would then fail to write. Idempotent.
    """
    try:
        from megatron.core.dist_checkpointing.strategies import filesystem_async
    except ImportError:  # pragma: no cover - another megatron-core layout: nothing to shield
        return
    if getattr(filesystem_async, "_results_queue", True) is None:
        with lifecycle.shielded_children():
            filesystem_async.get_write_results_queue()


def _warn_rank0(message: str) -> None:
    if dist.get_rank() == 0:
        log.warning(message)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: unreadable ({exc}); {RESUME_FIX}") from None


@contextlib.contextmanager
def _held_writer_errors() -> Iterator[None]:
    """Hold the ERROR records of megatron-core's checkpoint writer for the block.

    Its writer threads log a failed write (a full disk shows as "unexpected pos 704 vs 598")
    and then raise; a full disk is told once by :func:`_on_all_ranks`, and the records are
    logged as they were only for any other failure.
    """
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        held.append(record)
        return False

    logger = logging.getLogger("megatron.core.dist_checkpointing.strategies.filesystem_async")
    logger.addFilter(hold)
    try:
        yield
    except BaseException as exc:
        logger.removeFilter(hold)
        if not isinstance(exc, ConfigError):
            for record in held:
                logger.handle(record)
        raise
    finally:
        logger.removeFilter(hold)


def _on_all_ranks(fn: Callable[[], T], where: Path) -> T | None:
    """Run ``fn`` on every rank, then make every rank fail if one did (collective).

    The failing rank raises its own error (a full disk as one ConfigError line); the others
    raise a ConfigError naming it, instead of waiting for it in the next collective.
    """
    result, error = None, None
    try:
        result = fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as exc:  # torch's CheckpointException is a BaseException
        error = exc
    if error is not None and not isinstance(error, ConfigError) and _disk_full(error, where):
        usage = shutil.disk_usage(where.parent)
        error = ConfigError(
            f"checkpoint.dir: the disk is full while writing {where} ({usage.free / 2**20:.0f} "
            f"of {usage.total / 2**20:.0f} MiB free); free space or set checkpoint.dir to a "
            "larger disk (the previous checkpoint is intact)"
        )
    outcomes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(outcomes, None if error is None else str(error))
    if error is not None:
        raise error
    failed = next(((r, e) for r, e in enumerate(outcomes) if e is not None), None)
    if failed is not None:
        raise ConfigError(f"checkpoint save failed on rank {failed[0]}: {failed[1]}")
    return result


def _disk_full(exc: BaseException | None, where: Path) -> bool:
    """ENOSPC somewhere in the chain, or a disk with (almost) nothing left: megatron-core's
    writer threads report a full disk as a bare RuntimeError, without the errno."""
    with contextlib.suppress(OSError):
        usage = shutil.disk_usage(where.parent)
        if usage.free < max(16 * 2**20, 0.01 * usage.total):
            return True
    seen = 0
    while exc is not None and seen < 20:
        if getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(exc) or "Disk quota exceeded" in str(exc):
            return True
        exc, seen = exc.__cause__ or exc.__context__, seen + 1
    return False
