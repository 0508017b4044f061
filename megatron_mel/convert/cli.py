"""``convert_checkpoint``: HF <-> Megatron dist-checkpoint conversion, with logit verification.

    python tools/convert_checkpoint.py hf-to-mcore --hf-dir H --out-dir M --tp T --pp P [--verify]
    python tools/convert_checkpoint.py mcore-to-hf --mcore-dir M --out-dir H2 \
        [--hf-config-from H] [--tp T --pp P] [--verify]
    (both: [--overwrite] to replace a non-empty --out-dir)

Both run on T x P ranks: under torchrun/srun on the launched ranks, otherwise on local workers
spawned here (gloo on CPU). Inputs are validated in the parent before any worker starts.
``--verify`` runs a fixed batch and a THD pack through Megatron (loaded from the written/read
checkpoint) and through transformers (from the HF side) at the checkpoint dtype and in fp64, and
exits 1 unless Megatron is as close to the fp64 logits as transformers itself is:
``max|Megatron - fp64| <= --noise-factor x max|transformers - fp64| + --tolerance``
(see megatron_mel/convert/verify.py for why a fixed tolerance cannot work).

The output is written beside ``--out-dir`` (``.<name>.partial-<job>``) and renamed into place
when complete, so a failed conversion leaves nothing half-written. A non-empty ``--out-dir`` is
refused unless ``--overwrite``, which replaces the directory as a whole: no shard or index of
the old contents survives. Megatron checkpoints carry a checksum manifest, verified on read.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from dataclasses import dataclass, replace
from pathlib import Path

from megatron_mel.config import ConfigError, ModelConfig, ParallelConfig
from megatron_mel.convert.verify import ABS_FLOOR, NOISE_FACTOR
from megatron_mel.models.arch import ModelArch, load_arch, read_hf_config

DTYPE_NAMES = tuple(ABS_FLOOR)


@dataclass(frozen=True, slots=True)
class ConvertJob:
    direction: str  # hf-to-mcore | mcore-to-hf
    hf_dir: str  # source (hf-to-mcore) or metadata source (mcore-to-hf)
    mcore_dir: str
    out_dir: str
    """Where the workers write (a staging directory beside ``publish_dir``)."""
    publish_dir: str
    """The --out-dir the result is renamed to."""
    tp: int
    pp: int
    dtype: str
    verify: bool
    noise_factor: float
    tolerance: float
    """Absolute floor added to the noise bound."""


def _hf_dtype(hf_cfg: dict) -> str:
    name = str(hf_cfg.get("dtype") or hf_cfg.get("torch_dtype") or "float32")
    return name if name in ABS_FLOOR else "float32"


def plan_job(args: argparse.Namespace) -> tuple[ConvertJob, ModelArch]:
    """Validate the command line cheaply (no megatron import) and describe the job."""
    for flag, value in (("--tp", args.tp), ("--pp", args.pp)):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be >= 1 (ranks to run with)")
    if args.direction == "hf-to-mcore":
        from megatron_mel.convert.hf_io import HFCheckpointReader

        arch = load_arch(args.hf_dir)
        HFCheckpointReader(args.hf_dir)  # a truncated or missing weight file, named now
        dtype = args.dtype or _hf_dtype(read_hf_config(args.hf_dir))
        hf_dir, mcore_dir = args.hf_dir, args.out_dir
    else:
        from megatron_mel.convert.metadata import (
            HF_META_SUBDIR,
            arch_of_checkpoint,
            read_mcore_metadata,
        )

        meta = read_mcore_metadata(args.mcore_dir)
        arch = arch_of_checkpoint(args.mcore_dir)
        dtype = args.dtype or meta["dtype"]
        hf_dir = args.hf_config_from or str(Path(args.mcore_dir) / HF_META_SUBDIR)
        if not (Path(hf_dir) / "config.json").is_file():
            raise ConfigError(
                f"{hf_dir}: no config.json to copy into the HF export; pass --hf-config-from"
            )
        mcore_dir = args.mcore_dir
    source = args.hf_dir if args.direction == "hf-to-mcore" else args.mcore_dir
    check_out_dir(Path(args.out_dir), Path(source), overwrite=args.overwrite)
    arch.validate_layout(ParallelConfig(tp=args.tp, pp=args.pp), args.tp * args.pp)
    tolerance = args.tolerance if args.tolerance is not None else ABS_FLOOR[dtype]
    job = ConvertJob(
        direction=args.direction,
        hf_dir=str(hf_dir),
        mcore_dir=str(mcore_dir),
        out_dir=str(args.out_dir),
        publish_dir=str(args.out_dir),
        tp=args.tp,
        pp=args.pp,
        dtype=dtype,
        verify=args.verify,
        noise_factor=args.noise_factor,
        tolerance=tolerance,
    )
    return job, arch


def check_out_dir(out: Path, source: Path, *, overwrite: bool) -> None:
    """Refuse an --out-dir that is a file, holds the input, or is non-empty without --overwrite."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {out}: is a file, not a directory")
    src, dst = source.resolve(), out.resolve()
    if src == dst or dst in src.parents:
        raise ConfigError(f"--out-dir {out}: contains the input {source}; write somewhere else")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        names = sorted(p.name for p in out.iterdir())
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        raise ConfigError(
            f"--out-dir {out}: not empty ({len(names)} entries: {shown}); pass --overwrite to "
            "replace it as a whole, or choose an empty directory"
        )


def staged(job: ConvertJob, job_id: str, *, leader: bool) -> ConvertJob:
    """The job writing into a staging directory beside its --out-dir (emptied by the leader,
    before any rank can write: every writer waits for it in a barrier first)."""
    out = Path(job.publish_dir)
    staging = out.parent / f".{out.name}.partial-{job_id}"
    if leader:
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
    return replace(job, out_dir=str(staging))


def publish(job: ConvertJob, job_id: str) -> None:
    """Put the finished staging directory in place of --out-dir (the old one as a whole)."""
    staging, out = Path(job.out_dir), Path(job.publish_dir)
    old = out.parent / f".{out.name}.old-{job_id}"
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def run_job(job: ConvertJob, arch: ModelArch) -> None:
    """Worker body: every rank calls it (see module docstring)."""
    from megatron_mel import platform
    from megatron_mel.convert import checkpoint
    from megatron_mel.models.gpt import DTYPES, build_model_chunks

    parallel = ParallelConfig(tp=job.tp, pp=job.pp)
    platform.init_distributed(parallel)
    model_cfg = ModelConfig(hf_dir=job.hf_dir, dtype=job.dtype)  # type: ignore[arg-type]
    padded = arch.padded_vocab_size(model_cfg.vocab_padding_multiple)
    try:
        chunks = build_model_chunks(arch, model_cfg, parallel)
        if job.direction == "hf-to-mcore":
            checkpoint.load_hf_weights(chunks, job.hf_dir, arch, padded)
            checkpoint.save_mcore(
                chunks,
                job.out_dir,
                hf_config=read_hf_config(job.hf_dir),
                dtype=DTYPES[job.dtype],
                padded_vocab=padded,
                hf_metadata_from=job.hf_dir,
            )
            _say(f"saved Megatron checkpoint to {job.publish_dir} (tp={job.tp} pp={job.pp})")
            if job.verify:
                fresh = build_model_chunks(arch, model_cfg, parallel)
                checkpoint.load_mcore(fresh, job.out_dir, padded)
                _verify(fresh, arch, job.hf_dir, job)
        else:
            checkpoint.load_mcore(chunks, job.mcore_dir, padded)
            checkpoint.save_hf(chunks, arch, job.out_dir, metadata_from=job.hf_dir)
            _say(f"saved HF checkpoint to {job.publish_dir}")
            if job.verify:
                _verify(chunks, arch, job.out_dir, job)
    finally:
        platform.destroy_distributed()


def _verify(chunks: list, arch: ModelArch, hf_dir: str, job: ConvertJob) -> None:
    """Compare Megatron and transformers logits on fixed inputs (collective)."""

    from megatron_mel.convert.verify import check_parity, stop_unless_parity
    from megatron_mel.models.gpt import DTYPES

    report = check_parity(chunks, arch, hf_dir, DTYPES[job.dtype])
    header = f"verify: tp={job.tp} pp={job.pp} dtype={job.dtype}:"
    stop_unless_parity(report, job.noise_factor, job.tolerance, header)


def _say(message: str) -> None:
    import torch.distributed as dist

    if dist.get_rank() == 0:
        print(message, flush=True)


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(
        prog="convert_checkpoint", description=__doc__.split("\n\n")[0]
    )
    sub = parser.add_subparsers(dest="direction", required=True)
    to_mcore = sub.add_parser("hf-to-mcore", help="HF directory -> Megatron dist-checkpoint")
    to_mcore.add_argument("--hf-dir", required=True)
    to_mcore.add_argument("--out-dir", required=True)
    to_hf = sub.add_parser("mcore-to-hf", help="Megatron dist-checkpoint -> HF directory")
    to_hf.add_argument("--mcore-dir", required=True)
    to_hf.add_argument("--out-dir", required=True)
    to_hf.add_argument(
        "--hf-config-from",
        default=None,
        help="HF dir whose config/tokenizer files to copy (default: the checkpoint's hf/ copy)",
    )
    for p in (to_mcore, to_hf):
        p.add_argument("--tp", type=int, default=1, help="tensor-parallel ranks to run with")
        p.add_argument("--pp", type=int, default=1, help="pipeline-parallel ranks to run with")
        p.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None)
        p.add_argument("--verify", action="store_true", help="compare logits with transformers")
        add_noise_arguments(p)
        p.add_argument(
            "--overwrite",
            action="store_true",
            help="replace a non-empty --out-dir as a whole (written aside, then renamed)",
        )
    return parser


def add_noise_arguments(parser: argparse.ArgumentParser) -> None:
    """The verification bound's two knobs (shared with ``megatron-mel parity``)."""
    parser.add_argument(
        "--noise-factor", type=float, default=NOISE_FACTOR,
        help="pass when max|Megatron - fp64| <= this x max|transformers - fp64| + --tolerance",
    )  # fmt: skip
    parser.add_argument(
        "--tolerance", type=float, default=None,
        help=f"absolute floor added to the bound (default per dtype: {ABS_FLOOR})",
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from megatron_mel.console import setup_console

    setup_console()
    args = build_parser().parse_args(argv)
    from megatron_mel.launch import WorkerFailed, run_id, run_workers
    from megatron_mel.platform import launcher_env

    leader = launcher_env()[0] == 0  # under torchrun every rank runs this; rank 0 publishes
    job_id = run_id()
    job = None
    try:
        job, arch = plan_job(args)
        job = staged(job, job_id, leader=leader)
        run_workers(run_job, job.tp * job.pp, job, arch)
        if leader:
            publish(job, job_id)
    except ConfigError as exc:
        if leader:
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except WorkerFailed as exc:
        return exc.exit_code
    finally:
        if leader and job is not None:
            shutil.rmtree(job.out_dir, ignore_errors=True)  # a failed attempt leaves nothing
    return 0
